"""Running a bundle over inputs: the one place behind ``medfm infer``, ``medfm embed``, ``medfm demo``
and the Python API (``medfm.infer(...)``, ``medfm.embed(...)``).

A task bundle's ``infer`` and every bundle's ``embed`` configure the bundle's cohort runner
(:class:`~medfm.workflows.CohortRunner`: ``configs/inference.json``'s ``runner``, or
``configs/embed.json``'s ``embedder``) and run it once over all inputs: resumable, one bad input
never stopping the rest, on one process or under ``torchrun``. A foundation bundle's ``infer``
runs its full inference workflow (restoration and embedding) on one scan and moves its outputs
into place only when the whole run succeeded.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .bundles import Bundle
from .errors import MedfmError, describe_error, innermost
from .io.atomic import remove_abandoned_staging
from .io.dicomweb import absolute_input, is_dicomweb_url, service_root, store_instances
from .io.embeddings import check_index_file, is_index_file, read_index_rows, write_index_rows
from .io.input_list import expand_inputs
from .io.tables import merge_rows_by_input
from .io.regions import label_regions, read_points
from .preview import write_input_preview
from .run_report import RunReport, warnings_collected
from .weights.records import MODEL_FILE, demo_weights_warning
from .workflows.cohort import CohortSummary

__all__ = ["EMBED_CONFIG", "embed", "infer", "require_embedding_workflow", "warnings_once"]

#: The embedding overlay every bundle has, applied on top of its ``inference.json``.
EMBED_CONFIG = "embed.json"
#: Every medfm module logs under it; its warnings reach the user (contract deviations, reader fallbacks).
package_logger = logging.getLogger("medfm")


def _workflow(bundle_dir: Path, configs: list[str], logging_file: str | bool, **overrides):
    from monai.bundle import ConfigWorkflow

    config_files = [str(bundle_dir / "configs" / name) for name in configs]
    workflows_logger = logging.getLogger("monai.bundle.workflows")
    level = workflows_logger.level
    if logging_file is False:  # MONAI warns that it leaves logging alone, which is the point here
        workflows_logger.setLevel(logging.ERROR)
    try:
        return ConfigWorkflow(config_file=config_files if len(config_files) > 1 else config_files[0],
                              meta_file=str(bundle_dir / "configs" / "metadata.json"), logging_file=logging_file,
                              workflow_type="inference", bundle_root=str(bundle_dir), **overrides)
    finally:
        workflows_logger.setLevel(level)


def _check_out_folder(out_dir: Path) -> None:
    """Refuse an ``--out`` that exists as something other than a folder, before any work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MedfmError(f"{out_dir}: exists and is not a folder; give --out a folder")


def _warn_of_demo_weights(bundle_dir: Path, overrides: dict) -> None:
    """Say in the run's own output, once it made its outputs, when the installed weights are demo weights
    (never with another ``ckpt_path``)."""
    warning = None if "ckpt_path" in overrides else demo_weights_warning(bundle_dir)
    if warning:
        package_logger.warning(warning)


def refuse_fine_tuned_checkpoint(bundle_dir: Path, overrides: dict) -> None:
    """A ``ckpt_path`` saved by a fine-tuning run has another head than a foundation bundle's network: say what to do
    with it (package the run as a task bundle) instead of failing on a truncated state-dict error."""
    from .workflows.handlers import FINE_TUNING_RECORD

    checkpoint = overrides.get("ckpt_path")
    if not checkpoint or Bundle.find(bundle_dir).runs_cohorts:
        return
    run_dir = Path(str(checkpoint)).expanduser().resolve().parent.parent
    if (run_dir / FINE_TUNING_RECORD).is_file():
        raise MedfmError(f"{checkpoint}: a fine-tuned checkpoint (its run: {run_dir}), which {bundle_dir.name}'s own network "
                         f"does not take; package the run as a task bundle with `medfm finetune {bundle_dir.name} --from "
                         f"{run_dir} --out TASK` and run that: `medfm infer TASK ...`")


def check_overrides(bundle_dir: Path, configs: list[str], overrides: dict) -> None:
    """Refuse override keys the bundle's configs do not have (a misspelt ``--sw_batchsize 2`` would
    otherwise be added as a new key and silently do nothing). A new argument of a component
    (``network_def#new_argument``, whose parent has a ``_target_``) is allowed."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle_dir / "configs" / name) for name in configs])
    for key in overrides:
        if key in parser:
            continue
        parent = key.rpartition("#")[0]
        if parent and parent in parser and isinstance(parser[parent], dict) and "_target_" in parser[parent]:
            continue
        known = sorted(k for k in parser.config if not k.startswith("_"))
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise MedfmError(f"{bundle_dir.name}: {', '.join(configs)} has no key {key!r}; {hint}its keys are {', '.join(known)}")


def infer(bundle: str | os.PathLike, inputs: Sequence[str | os.PathLike] | str | os.PathLike,
          out: str | os.PathLike = "medfm_output", verbose: bool = False, report: RunReport | None = None,
          store: str | None = None, preview: bool = False, statistics: bool = False, progress: bool = True,
          num_workers: int | None = None, **overrides) -> list[str] | CohortSummary:
    """Run a bundle's inference on scans (NIfTI/NRRD/MHA files, DICOM series folders or .zip, DICOMweb series or
    study URLs, :mod:`medfm.io.dicomweb`, and ``.csv`` lists of them).

    A task bundle (``medfm finetune``, ``medfm label-bundle``) runs all inputs in one cohort run
    (:class:`~medfm.workflows.CohortRunner`): the network built and the weights loaded once, resumable, a failing
    input listed in ``out/failed.csv`` and skipped; it returns the run's :class:`~medfm.workflows.CohortSummary`.
    A foundation bundle runs its full inference workflow (restoration, embedding) on one scan and returns the
    paths written.

    Args:
        bundle: bundle name (repository ``bundles/`` or ``$MEDFM_HOME/bundles``) or folder path.
        inputs: the scans (one, or a sequence).
        out: output folder; a foundation bundle's results appear there only when the whole run succeeded.
        verbose: show the workflow's log (MONAI / ignite progress) instead of only the results.
        report: filled in with the run's facts (:mod:`medfm.run_report`).
        store: a DICOMweb server (its root, or a study/series URL on it) to send the run's DICOM outputs
            to with STOW-RS, once they are in ``out`` (e.g. a segmentation's DICOM-SEG).
        preview: a foundation bundle: also write ``<input>_preview.png``: the input's three middle planes, with a
            segmentation output overlaid and other outputs on the input's grid (a restoration) in rows beneath.
            A task bundle: ``out/preview.png``, every scan's middle planes as the network saw them.
        statistics: a segmentation task bundle: also write ``statistics.csv`` (per input and label: voxels,
            volume, intensity in the input's units, world bounding box).
        progress: a task bundle's progress bar.
        num_workers: a task bundle's DataLoader processes reading the next scans.
        overrides: further config values (e.g. ``sw_batch_size=2``).

    Contract deviations are printed as ``medfm: warning:`` lines.
    """
    found = Bundle.find(bundle)
    bundle_dir = found.root
    listed = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if found.runs_cohorts:
        return _infer_cohort(bundle_dir, listed, out, report, store, preview, statistics, progress, num_workers, overrides)
    if statistics:
        raise MedfmError(f"{bundle_dir.name}: --statistics applies to segmentation task bundles (medfm finetune, "
                         "medfm label-bundle); this bundle's inference restores and embeds")
    if len(listed) != 1 or str(listed[0]).lower().endswith(".csv"):
        raise MedfmError(f"{bundle_dir.name}: its inference (restoration and embedding) takes one scan at a time, got "
                         f"{len(listed)} inputs; for many scans use `medfm embed`, or a task bundle (`medfm finetune`)")
    return _infer_one(bundle_dir, listed[0], out, verbose, report, store, preview, overrides)


def _infer_one(bundle_dir: Path, input: str | os.PathLike, out: str | os.PathLike, verbose: bool,
               report: RunReport | None, store: str | None, preview: bool, overrides: dict) -> list[str]:
    """One scan through a foundation bundle's full inference workflow; its outputs move into ``out`` when it succeeded."""
    report = report or RunReport.discarded()
    report.describe_bundle(bundle_dir, overrides.get("ckpt_path", bundle_dir / MODEL_FILE), overrides.get("device"))
    check_overrides(bundle_dir, ["inference.json"], overrides)
    refuse_fine_tuned_checkpoint(bundle_dir, overrides)
    source = absolute_input(input)
    report.inputs([{"input": source}])
    if not is_dicomweb_url(source) and not os.path.exists(source):
        raise MedfmError(f"{source}: no such file or folder")
    store_root = service_root(store) if store else None
    out_dir = Path(out).expanduser().resolve()
    _check_out_folder(out_dir)
    check_index_file(out_dir / str(overrides.get("embeddings_index", "embeddings.csv")))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-{os.getpid()}-", dir=out_dir.parent))
    try:
        warnings: list[str] = []
        with _output_captured(verbose) as log, warnings_collected(warnings):
            try:
                with report.stage("configure"):
                    workflow = _workflow(bundle_dir, ["inference.json"], str(bundle_dir / "configs" / "logging.conf"),
                                         input_image=source, output_dir=str(staging), **overrides)
                    workflow.initialize()
                with report.stage("run"):
                    workflow.run()
                    workflow.finalize()
                if preview:
                    with report.stage("preview"):
                        write_input_preview(bundle_dir, source, staging, overrides.get("series_uid"))
                _warn_of_demo_weights(bundle_dir, overrides)
            except Exception as error:
                cause = innermost(error)
                if isinstance(cause, MedfmError):  # the input's own problem: the line says it all, no log kept
                    raise MedfmError(str(cause)) from error
                log.keep = True
                raise MedfmError(f"{source}: {bundle_dir.name} inference failed: {describe_error(error)} "
                                 f"(full log: {log.path})") from error
        if not verbose:  # verbose output already holds them
            for warning in warnings:
                _print_warning(warning)
        written = sorted(p for p in staging.iterdir() if not p.name.startswith("."))
        if not written:
            raise MedfmError(f"{source}: the {bundle_dir.name} inference wrote no output")
        out_dir.mkdir(exist_ok=True)
        results = []
        for path in written:
            target = out_dir / path.name
            if is_index_file(path):
                report.inputs(read_index_rows(path))  # the rows name the DICOM series read
            if target.exists() and is_index_file(path):  # one index accumulates across runs, a row per output
                added = read_index_rows(path)
                replaced = {row["embedding"] for row in added}
                write_index_rows(target, [row for row in read_index_rows(target) if row["embedding"] not in replaced] + added)
            elif not (target.exists() and merge_rows_by_input(path, target)):
                path.replace(target)
            results.append(str(target))
        report.outputs(results)
        if store_root:
            _store(store_root, results, report)
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _infer_cohort(bundle_dir: Path, inputs: list, out: str | os.PathLike, report: RunReport | None, store: str | None,
                  preview: bool, statistics: bool, progress: bool, num_workers: int | None, overrides: dict) -> CohortSummary:
    """All inputs through a task bundle's cohort runner (``configs/inference.json``: ``runner``)."""
    report = report or RunReport.discarded()
    report.describe_bundle(bundle_dir, overrides.get("ckpt_path", bundle_dir / MODEL_FILE), overrides.get("device"))
    settings = {"output_dir": str(Path(out).expanduser()), "progress": bool(progress), "preview": bool(preview)}
    if statistics:
        settings["statistics"] = True
    if num_workers is not None:
        settings["num_workers"] = int(num_workers)
    check_overrides(bundle_dir, ["inference.json"], {**settings, **overrides})
    store_root = service_root(store) if store else None
    _check_out_folder(Path(out).expanduser())
    sources = [str(source) for source in expand_inputs(inputs)]
    if not sources:
        raise MedfmError("no inputs given")
    report.inputs([{"input": absolute_input(source)} for source in sources])
    summary = _run_cohort(bundle_dir, ["inference.json"], report, inputs=sources, **settings, **overrides)
    asked = {entry["input"] for entry in report.data["inputs"]}
    done = [row for row in summary.rows if row["input"] in asked]
    report.inputs(done + [{"input": image, "error": error} for (image, _), error in summary.failed.items()])
    outputs = [summary.index.parent / row[column] for row in done for column in ("segmentation", "dicom_seg") if row.get(column)]
    report.outputs(summary.tables + outputs + summary.previews)
    if store_root:
        _store(store_root, [str(path) for path in outputs], report)
    return summary


def _run_cohort(bundle_dir: Path, configs: list[str], report: RunReport, **settings) -> CohortSummary:
    """Configure and run a bundle workflow whose ``run`` is a cohort runner; medfm's warnings printed as they come."""
    with _warnings_printed():
        try:
            with report.stage("configure"):
                workflow = _workflow(bundle_dir, configs, False, **settings)
                workflow.initialize()
            with report.stage("run"):
                summary = workflow.run()[0]
            _warn_of_demo_weights(bundle_dir, settings)
        except Exception as error:
            cause = innermost(error)
            if isinstance(cause, MedfmError):
                raise MedfmError(str(cause)) from error
            raise MedfmError(f"{bundle_dir.name} run failed: {describe_error(error)}") from error
    workflow.finalize()
    return summary


def _store(root: str, outputs: list[str], report: RunReport) -> None:
    """Send the DICOM outputs to ``root`` (STOW-RS); they stay in ``--out`` whatever the server answers."""
    dicom = [path for path in outputs if path.lower().endswith(".dcm")]
    if not dicom:
        raise MedfmError(f"--store {root}: the run wrote no DICOM output to send (its outputs are in the output "
                         "folder); DICOM-SEG comes from segmenting bundles run on DICOM input")
    try:
        report.stored(root, store_instances(root, dicom))
    except MedfmError as error:
        raise MedfmError(f"{error} (the outputs are in {Path(dicom[0]).parent}, not stored)") from None
    print(f"medfm: stored {len(dicom)} DICOM file(s) at {root}", file=sys.stderr)


def require_embedding_workflow(bundle: Bundle) -> None:
    """Refuse, in one line, a bundle without ``configs/embed.json``."""
    if bundle.config(EMBED_CONFIG).is_file():
        return
    source = (bundle.metadata.get("task_bundle") or {}).get("source_bundle")
    hint = (f"; this task bundle was packaged by a medfm older than task bundles' embedding workflow: package its run "
            f"again (medfm finetune {source} --from RUN_DIR --out NEW)") if source else ""
    raise MedfmError(f"{bundle.root}: has no configs/{EMBED_CONFIG} (no embedding workflow){hint}")


def embed(bundle: str | os.PathLike, inputs: Sequence[str | os.PathLike] | str | os.PathLike = (),
          out: str | os.PathLike = "medfm_embeddings", index: str = "embeddings.csv", progress: bool = True,
          num_workers: int | None = None, amp: bool = False, points: str | os.PathLike | None = None,
          mask: str | os.PathLike | None = None, report: RunReport | None = None, preview: bool = False,
          **overrides) -> CohortSummary:
    """Embed many inputs in one run of the bundle's embedding workflow.

    Args:
        bundle: bundle name or folder.
        inputs: scans (files, DICOM folders or .zip, DICOMweb series URLs; a study URL stands for each of
            its image series) and/or ``.csv`` lists of them (column ``image``, else the first column;
            relative paths are relative to the list).
        out: output folder: one ``.npy`` per input, the index ``out/INDEX`` (one row per input) and,
            when inputs failed, ``failed.csv``.
        index: the index file name (``.csv``, or ``.parquet`` with the parquet extra).
        progress: progress bars (per input; per window for big sliding-window scans).
        num_workers: DataLoader processes reading the next scans (default: the bundle's ``num_workers``).
        amp: bfloat16 mixed precision (CUDA only).
        points: a CSV of seed points (``image, x, y, z`` in mm, LPS, optional ``id``): one embedding per
            point from a crop of the model's input size centred there; the scans come from its ``image``
            column (give no ``inputs``).
        mask: a label image (NIfTI/NRRD/MHA, or a DICOM-SEG) for the one scan in ``inputs``: one
            embedding per label, from a crop centred on the label's centroid.
        report: filled in with the run's facts (:mod:`medfm.run_report`).
        preview: also write ``out/preview.png`` (and further pages): a contact sheet of every scan's middle
            planes as the network saw them, so a misoriented or wrongly scaled scan stands out.
        overrides: further config values (e.g. ``sw_batch_size=8``).

    Inputs already in the index (with their ``.npy`` present) are skipped, so running the same call
    again continues an interrupted run. Failing inputs are reported on stderr, skipped, and listed in
    the summary's ``failed`` (and ``out/failed.csv``); nothing is raised for them. Under ``torchrun``
    every process calls this with the same arguments and gets the same summary.
    """
    report = report or RunReport.discarded()
    found = Bundle.find(bundle)
    bundle_dir = found.root
    report.describe_bundle(bundle_dir, overrides.get("ckpt_path", bundle_dir / MODEL_FILE), overrides.get("device"))
    require_embedding_workflow(found)
    check_overrides(bundle_dir, ["inference.json", EMBED_CONFIG], overrides)
    refuse_fine_tuned_checkpoint(bundle_dir, overrides)
    _check_out_folder(Path(out).expanduser())
    sources = expand_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    if points is not None and (sources or mask is not None):
        raise MedfmError("--points names its scans in its image column: give no other inputs and no --mask")
    if points is not None:
        items = read_points(points)
    elif mask is not None:
        if len(sources) != 1:
            raise MedfmError(f"--mask labels one scan: give exactly one input, not {len(sources)}")
        items = label_regions(mask, sources[0])
    else:
        items = [str(source) for source in sources]
    if not items:
        raise MedfmError("no inputs given")
    report.inputs([{"input": absolute_input(item["image"] if isinstance(item, dict) else item),
                    "region": item.get("region", "") if isinstance(item, dict) else ""} for item in items])
    settings = {"embed_inputs": items, "output_dir": str(Path(out).expanduser()),
                "embeddings_index": index, "progress": bool(progress), "amp": bool(amp), "preview": bool(preview)}
    if num_workers is not None:
        settings["num_workers"] = int(num_workers)
    summary = _run_cohort(bundle_dir, ["inference.json", EMBED_CONFIG], report, **settings, **overrides)
    asked = {(entry["input"], entry["region"]) for entry in report.data["inputs"]}
    done = [row for row in summary.rows if (row["input"], row["region"]) in asked]
    report.inputs(done + [{"input": image, "region": region, "error": error}
                          for (image, region), error in summary.failed.items()])
    report.outputs([summary.index] + [summary.index.parent / row["embedding"] for row in done] + summary.previews)
    return summary


#: The warnings printed so far by the enclosing :func:`warnings_once` block, innermost last.
_printed_once: list[set[str]] = []


@contextlib.contextmanager
def warnings_once() -> Iterator[None]:
    """Within the block each distinct warning is printed once: for a command made of several runs (the demo)."""
    _printed_once.append(set())
    try:
        yield
    finally:
        _printed_once.pop()


def _print_warning(message: str) -> None:
    """One ``medfm: warning:`` line, above any progress bar (none inside :func:`warnings_once` if printed already)."""
    from tqdm import tqdm

    if _printed_once:
        if message in _printed_once[-1]:
            return
        _printed_once[-1].add(message)
    tqdm.write(f"medfm: warning: {message}", file=sys.stderr)


class _WarningPrinter(logging.Handler):
    """Prints each warning as it is logged (:func:`_print_warning`)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        _print_warning(record.getMessage())


@contextlib.contextmanager
def _warnings_printed() -> Iterator[None]:
    """medfm's warnings printed as they happen (DataLoader workers inherit the handler)."""
    printer = _WarningPrinter()
    package_logger.addHandler(printer)
    propagate, package_logger.propagate = package_logger.propagate, False
    try:
        yield
    finally:
        package_logger.removeHandler(printer)
        package_logger.propagate = propagate


class _CapturedLog:
    """Where a captured workflow log lives, and whether to keep it for the user."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keep = False


@contextlib.contextmanager
def _output_captured(verbose: bool) -> Iterator[_CapturedLog]:
    """Send everything written to stdout and stderr (Python, logging, C libraries) to a log file.

    MONAI and ignite log progress and full tracebacks; they are shown only with ``verbose``.
    On failure (``keep``) the file stays and the error names it.
    """
    handle, name = tempfile.mkstemp(prefix="medfm-", suffix=".log")
    log = _CapturedLog(Path(name))
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    for fd in saved:
        os.dup2(handle, fd)
    try:
        yield log
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        os.close(handle)
        if not log.keep:
            if verbose:
                sys.stdout.write(log.path.read_text(errors="replace"))
            log.path.unlink(missing_ok=True)
