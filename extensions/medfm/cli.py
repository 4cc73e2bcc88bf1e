"""The ``medfm`` command line (python-fire).

Errors a user can fix are printed as one line on stderr with exit status 1, without a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import fire

from .bundles import find_bundle
from .errors import MedfmError, first_line, innermost
from .io.embeddings import append_index_rows, is_index_file, read_index_rows
from .transforms.contract import logger as contract_logger

__all__ = ["main", "infer", "embed", "demo", "download", "info", "label_bundle", "list_bundles", "release"]


def infer(bundle: str, input: str, out: str = "medfm_output", verbose: bool = False, **overrides) -> list[str]:
    """Run a bundle's inference workflow on one scan (NIfTI/NRRD/MHA file or DICOM series folder).

    Args:
        bundle: bundle name (repository ``bundles/`` or ``$MEDFM_HOME/bundles``) or folder path.
        input: the scan to process.
        out: output folder; results appear there only when the whole run succeeded.
        verbose: show the workflow's log (MONAI / ignite progress) instead of only the results.
        overrides: further ``--key value`` pairs passed to the bundle config (e.g. ``--sw_batch_size 2``).

    Returns the paths written.
    """
    from monai.bundle import ConfigWorkflow

    bundle_dir = find_bundle(bundle)
    source = Path(input).expanduser()
    if not source.exists():
        raise MedfmError(f"{source}: no such file or folder")
    out_dir = Path(out).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        warnings = _Collector()
        contract_logger.addHandler(warnings)
        with _output_captured(verbose) as log:
            try:
                workflow = ConfigWorkflow(
                    config_file=str(bundle_dir / "configs" / "inference.json"),
                    meta_file=str(bundle_dir / "configs" / "metadata.json"),
                    logging_file=str(bundle_dir / "configs" / "logging.conf"),
                    workflow_type="inference",
                    bundle_root=str(bundle_dir),
                    input_image=str(source.resolve()),
                    output_dir=str(staging),
                    **overrides,
                )
                workflow.initialize()
                workflow.run()
                workflow.finalize()
            except Exception as error:
                log.keep = True
                cause = innermost(error)
                message = str(cause) if isinstance(cause, MedfmError) else (
                    f"{source}: {bundle_dir.name} inference failed: {describe(error)}")
                raise MedfmError(f"{message} (full log: {log.path})") from error
            finally:
                contract_logger.removeHandler(warnings)
        if not verbose:  # verbose output already holds them
            for warning in dict.fromkeys(warnings.messages):
                print(f"medfm: warning: {warning}", file=sys.stderr)
        written = sorted(p for p in staging.iterdir() if not p.name.startswith("."))
        if not written:
            raise MedfmError(f"{source}: the {bundle_dir.name} inference wrote no output")
        out_dir.mkdir(exist_ok=True)
        results = []
        for path in written:
            target = out_dir / path.name
            if target.exists() and is_index_file(path):  # one index accumulates across runs
                append_index_rows(target, read_index_rows(path))
            else:
                path.replace(target)
            results.append(str(target))
        return results

    finally:
        shutil.rmtree(staging, ignore_errors=True)


def embed(bundle: str, *inputs: str, out: str = "medfm_embeddings", index: str = "embeddings.csv",
          progress: bool = True, verbose: bool = False, **overrides) -> None:
    """Embeddings of many inputs with a bundle's inference workflow, resumable, one bad input never stopping the rest.

    Args:
        bundle: bundle name or folder.
        inputs: scans (files, DICOM folders or .zip) and/or ``.csv`` lists of them (column ``image``,
            else the first column; relative paths are relative to the list).
        out: output folder; the index ``out/INDEX`` gets one row per embedding.
        index: the index file name (``.csv``, or ``.parquet`` with the parquet extra).
        progress: show a progress bar.
        verbose: show each workflow's log.
        overrides: further ``--key value`` pairs for the bundle config.

    Inputs already in the index (with their ``.npy`` present) are skipped, so a rerun continues
    an interrupted one. A failing input is reported on stderr and skipped; the command still
    exits 1 at the end when any failed.
    """
    from tqdm import tqdm

    sources = _expand_inputs(inputs)
    if not sources:
        raise MedfmError("no inputs given")
    out_dir = Path(out).expanduser().resolve()
    index_file = out_dir / index
    done = {row["input"] for row in read_index_rows(index_file) if (out_dir / str(row["embedding"])).is_file()} \
        if index_file.is_file() else set()
    embedded, skipped, failed = 0, 0, []
    for source in tqdm(sources, desc="embedding", unit="input", disable=not progress):
        if str(source.resolve()) in done:
            skipped += 1
            continue
        try:
            infer(bundle, str(source), out=str(out_dir), verbose=verbose, embeddings_index=index, **overrides)
            embedded += 1
        except MedfmError as error:
            failed.append(source)
            tqdm.write(f"medfm: skipped: {error}", file=sys.stderr)  # the message names the input
    print(f"{embedded} embedded, {skipped} already in {index_file}, {len(failed)} failed")
    if failed:
        raise MedfmError(f"{len(failed)} of {len(sources)} inputs failed (listed above); the others are in {index_file}")


def _expand_inputs(inputs: tuple[str, ...]) -> list[Path]:
    """Scans named directly, and those listed in ``.csv`` files (column ``image`` or the first)."""
    import csv

    sources = []
    for item in inputs:
        path = Path(str(item)).expanduser()
        if path.suffix.lower() != ".csv":
            sources.append(path)
            continue
        try:
            with open(path, newline="") as stream:
                rows = list(csv.reader(stream))
        except OSError as error:
            raise MedfmError(f"{path}: cannot be read ({error.strerror})") from None
        if not rows:
            raise MedfmError(f"{path}: empty input list")
        column = rows[0].index("image") if "image" in rows[0] else 0
        body = rows[1:] if "image" in rows[0] else rows
        sources += [(path.parent / row[column]).resolve() if not Path(row[column]).is_absolute() else Path(row[column])
                    for row in body if row and row[column].strip()]
    return sources


class _CapturedLog:
    """Where a captured workflow log lives, and whether to keep it for the user."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keep = False


class _Collector(logging.Handler):
    """Keeps the messages of the warnings logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _output_captured(verbose: bool):
    """Send everything written to stdout and stderr (Python, logging, C libraries) to a log file.

    MONAI and ignite log progress and full tracebacks; the CLI shows them only with ``verbose``.
    On failure (``keep``) the file stays and the CLI prints one line naming it.
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


def demo(out: str = "demo_output", bundle: str = "models_genesis_chest_ct") -> None:
    """Restoration + embedding of the embedded sample CT, as NIfTI and as a DICOM series, with a montage."""
    from .demo import run_demo

    for line in run_demo(Path(out), bundle):
        print(line)


def list_bundles() -> None:
    """Table of the bundles found: task, modality, weights installed and registered, licences."""
    from .catalog import bundle_summaries

    rows = bundle_summaries()
    if not rows:
        raise MedfmError("no bundles found (repository bundles/ or $MEDFM_HOME/bundles)")
    for row in rows:
        print(f"{row['bundle']} {row['version']}: {row['task']}")
        for key in ("modality", "installed weights", "registered weights", "code licence", "weights licence"):
            print(f"    {key + ':':<20}{row[key]}")


def info(bundle: str) -> None:
    """Metadata, input contract, weights and their provenance, and citation of one bundle."""
    from .catalog import bundle_info

    for line in bundle_info(bundle):
        print(line)


def release(*bundles: str, out: str = "dist", base_url: str = "") -> None:
    """Build ``<name>_v<version>.zip`` archives for ``monai.bundle.download`` and their ``model_info.json``.

    Args:
        bundles: bundle names or folders (default: every bundle found).
        out: output folder.
        base_url: where the archives will be served (recorded as each archive's ``source``); a
            GitHub release is ``https://github.com/OWNER/REPO/releases/download/TAG``.
    """
    from .release import MODEL_INFO, release_bundles

    for item in release_bundles(out, list(bundles), base_url):
        print(f"{item.file}  {item.size:>11,} bytes  sha256 {item.sha256[:16]}...  weights: {item.weights}")
    print(f"index: {Path(out) / MODEL_INFO}")


def download(bundle: str, index: str, version: str | None = None, bundle_dir: str | None = None,
             progress: bool = True) -> None:
    """Download a released bundle listed in a ``model_info.json`` (URL or path); size and sha256 checked.

    The bundle lands in ``bundle_dir`` (default ``$MEDFM_HOME/bundles``, where ``medfm`` finds
    bundles by name).
    """
    from .release import download_bundle

    print(download_bundle(bundle, index, version=version, bundle_dir=bundle_dir, progress=progress))


def label_bundle(bundle: str, labels: str, out: str, pretrained: bool = True, force: bool = False) -> None:
    """Make a MONAI-Label-ready segmentation bundle from BUNDLE's pretrained network.

    Args:
        bundle: a bundle whose network can segment (Models Genesis, Universal Model, VDT, SPAD-ViT).
        labels: comma-separated structure names, e.g. ``liver,spleen`` (channel 0 is background).
        out: the new bundle's folder, e.g. ``apps/monaibundle/model/<bundle>_seg``; its name is the
            model name MONAI Label shows.
        pretrained: start from BUNDLE's installed weights (``False``: from scratch).
        force: replace an existing OUT.
    """
    from .label_bundle import make_label_bundle

    target = make_label_bundle(bundle, labels, out, pretrained=pretrained, force=force)
    metadata = json.loads((target / "configs" / "metadata.json").read_text())
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    print(f"{target}: {metadata['name']} ({', '.join(f'{k}: {v}' for k, v in channels.items())}), "
          f"weights: {metadata['label_bundle']['source_weights']}")


def _weights_commands() -> dict:
    from .weights import fetch_weights, import_weights, verify_bundle_weights

    def fetch(bundle: str, weights: str | None = None, url: str | None = None, progress: bool = True) -> None:
        """Download a bundle's registered weights (sha256 checked), then import them into models/model.pt."""
        for line in fetch_weights(bundle, weights=weights, url=url, progress=progress).lines():
            print(line)

    def import_(bundle: str, file: str, weights: str | None = None, in_channels: int | None = None,
                dtype: str = "float32", strict: bool = True, strip_objects: bool = False) -> None:
        """Import a checkpoint (upstream layout or plain state dict) into BUNDLE/models/model.pt.

        ``--strict False`` imports a partial match (missing keys keep their fresh values) and
        lists what did not match. ``--strip_objects`` imports a file that pickles objects beyond
        tensors (e.g. an mmcv config in its meta) by keeping only its tensors; none of the
        objects' code runs.
        """
        report = import_weights(bundle, file, weights=weights, in_channels=in_channels, dtype=dtype, strict=strict,
                                strip_objects=strip_objects)
        for line in report.lines():
            print(line)
        for kind, keys in (("missing", report.missing_keys), ("unexpected", report.unexpected_keys)):
            if keys:
                print(f"{kind}: {', '.join(keys)}")

    def verify(bundle: str) -> None:
        """Check that BUNDLE/models/model.pt loads strictly and say which weights it holds."""
        for line in verify_bundle_weights(bundle):
            print(line)

    return {"fetch": fetch, "import": import_, "verify": verify}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medfm`` console script."""
    commands = {"list": list_bundles, "info": info, "infer": infer, "embed": embed, "demo": demo, "download": download, "release": release,
                "label-bundle": label_bundle, "weights": _weights_commands()}
    try:
        fire.Fire(commands, command=argv, name="medfm")
    except MedfmError as error:
        print(f"medfm: error: {error}", file=sys.stderr)
        return 1
    except fire.core.FireExit as exit_:
        return int(exit_.code or 0)
    except Exception as error:  # anything else still gets one line, with its type to help a bug report
        print(f"medfm: error: {describe(error)}", file=sys.stderr)
        return 1
    return 0


def describe(error: BaseException) -> str:
    """One line for an unexpected exception: the innermost cause (MONAI wraps config errors)."""
    cause = innermost(error)
    return f"{type(cause).__name__}: {first_line(cause) if str(cause).strip() else 'no details'}"


if __name__ == "__main__":
    sys.exit(main())
