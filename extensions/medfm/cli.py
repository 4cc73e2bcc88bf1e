"""The ``medfm`` command line (python-fire).

Errors a user can fix are printed as one line on stderr with exit status 1, without a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import fire

from .errors import MedfmError, describe_error

__all__ = ["main", "infer", "embed", "demo", "download", "finetune", "info", "label_bundle", "list_bundles", "release"]


def infer(bundle: str, *inputs: str, out: str = "medfm_output", verbose: bool = False, report: str | None = None,
          store: str | None = None, preview: bool = False, statistics: bool = False, progress: bool = True,
          num_workers: int | None = None, **overrides) -> None:
    """Run a bundle's inference: a task bundle on any number of scans, a foundation bundle on one.

    Inputs: NIfTI/NRRD/MHA files, DICOM series folders or .zip, DICOMweb series or study URLs
    (``http(s)://HOST/PREFIX/studies/<UID>[/series/<UID>]``), and ``.csv`` lists of them. Credentials for a
    DICOMweb server come from the environment: MEDFM_DICOMWEB_TOKEN (bearer), or MEDFM_DICOMWEB_USER and
    MEDFM_DICOMWEB_PASSWORD (basic).

    A task bundle (``medfm finetune``, ``medfm label-bundle``) runs all inputs with the network loaded once:
    segmentations (NIfTI on each input's grid, DICOM-SEG for DICOM inputs) indexed in ``segmentations.csv``, or
    ``predictions.csv``; a failing input is reported, listed in ``failed.csv`` and skipped (exit 1 at the end);
    the same command again skips what is done; ``torchrun --nproc_per_node N -m medfm infer ...`` shares the
    inputs out. A foundation bundle restores and embeds one scan.

    Args:
        bundle: bundle name (repository ``bundles/`` or ``$MEDFM_HOME/bundles``) or folder path.
        inputs: the scans.
        out: output folder.
        verbose: show the workflow's log (MONAI / ignite progress) instead of only the results (one scan).
        report: write a JSON run report there, for a failed run too (versions, bundle, weights and their sha256,
            device, inputs with series UIDs, warnings, seconds per stage, outputs, the error).
        store: send the DICOM outputs (DICOM-SEG) to this DICOMweb server with STOW-RS (its root URL).
        preview: one scan: also write INPUT_preview.png (its three middle planes, a segmentation overlaid or a
            restoration beneath); a task bundle: OUT/preview.png, every scan as the network saw it.
        statistics: segmentation task bundles: also write OUT/statistics.csv: per input and label the voxel count,
            volume (ml), mean, std, min and max of the input's intensity inside the label (HU for CT) and the
            label's world bounding box (mm, LPS).
        progress: task bundles: show a progress bar.
        num_workers: task bundles: DataLoader processes reading and preprocessing the next scans.
        overrides: further ``--key value`` pairs passed to the bundle config (e.g. ``--sw_batch_size 2``).
    """
    from .inference import infer as run_inference
    from .run_report import run_report

    if not inputs:
        raise MedfmError("no inputs given: medfm infer BUNDLE SCAN [SCAN ...]")
    with run_report(report if _is_rank_zero() else None, "infer", _arguments, inputs, out) as record:
        result = run_inference(bundle, inputs, out=out, verbose=verbose, report=record, store=store, preview=preview,
                               statistics=statistics, progress=progress, num_workers=num_workers, **overrides)
        if isinstance(result, list):
            for path in result:
                print(path)
        else:
            _end_cohort_run(result, tables=True)


def embed(bundle: str, *inputs: str, out: str = "medfm_embeddings", index: str = "embeddings.csv",
          progress: bool = True, num_workers: int | None = None, amp: bool = False, points: str | None = None,
          mask: str | None = None, report: str | None = None, preview: bool = False, **overrides) -> None:
    """Embeddings of many inputs in one run of the bundle's embedding workflow (configs/embed.json).

    Args:
        bundle: bundle name or folder.
        inputs: scans (files, DICOM folders or .zip, DICOMweb series URLs; a study URL means each of its
            image series) and/or ``.csv`` lists of them (column ``image``, else the first column;
            relative paths are relative to the list).
        out: output folder: one ``.npy`` per input, the index ``out/INDEX`` and ``failed.csv``.
        index: the index file name (``.csv``, or ``.parquet`` with the parquet extra).
        progress: show progress bars.
        num_workers: DataLoader processes reading and preprocessing the next scans.
        amp: bfloat16 mixed precision on CUDA.
        points: CSV of seed points (``image, x, y, z`` in mm, LPS, optional ``id``): one embedding per point
            from a crop of the model's input size centred there (no other inputs).
        mask: label image (NIfTI, NRRD, MHA or DICOM-SEG) of the one input: one embedding per label.
        report: write a JSON run report there (rank 0), for a failed run too; see ``medfm infer --help``.
        preview: also write OUT/preview.png (more pages as preview_2.png...): every scan's middle planes as
            the network saw them, so a misoriented or wrongly scaled scan stands out.
        overrides: further ``--key value`` pairs for the bundle config.

    Resumable: inputs already in the index are skipped. A failing input is reported and skipped;
    the command exits 1 at the end when any failed. Under ``torchrun --nproc_per_node N -m medfm
    embed ...`` each process embeds its own share and rank 0 writes the one index.
    """
    from .inference import embed as run_embedding
    from .run_report import run_report

    with run_report(report if _is_rank_zero() else None, "embed", _arguments, [*inputs, points, mask], out) as record:
        summary = run_embedding(bundle, inputs, out=out, index=index, progress=progress, num_workers=num_workers,
                                amp=amp, points=points, mask=mask, report=record,
                                preview=preview, **overrides)
        _end_cohort_run(summary)


def probe(bundles: str, table: str, out: str = "medfm_probe", task: str = "classification",
          fractions: str = "0.05,0.1,0.25,0.5,1", folds: int = 5, repeats: int = 3, label_column: str = "label",
          group_column: str | None = None, seed: int = 0, progress: bool = True) -> None:
    """Frozen-feature probes of one or more bundles on a labelled table, with baselines and label fractions.

    Args:
        bundles: bundle names or folders, comma-separated.
        table: CSV with ``image`` and a label column (paths relative to the table), or a Decathlon
            ``dataset.json`` whose training labels are classes or values. With ``x, y, z`` columns
            (mm, LPS) each row is a point in its scan, embedded from a crop centred there.
        out: output folder: probe_folds.csv, probe_summary.csv, probe.md, probe.png, probe_record.json,
            and the embeddings (reused by the next run).
        task: ``classification`` (AUC, balanced accuracy) or ``regression`` (R^2, MAE).
        fractions: fractions of each training fold's labels to fit on.
        folds, repeats: k-fold cross-validation, repeated with other seeds.
        label_column: the label column.
        group_column: subjects: no subject is ever on both sides of a split.
        seed: seeds the splits, the label fractions, the random initialisation and the permuted control.
        progress: show progress bars.
    """
    from .probe import probe as run_probe

    values = fractions if isinstance(fractions, (tuple, list)) else str(fractions).split(",")
    try:
        parsed = [float(value) for value in values]
    except ValueError:
        raise MedfmError(f"--fractions must be numbers separated by commas, got {fractions!r}") from None
    names = bundles if isinstance(bundles, (tuple, list)) else str(bundles).split(",")
    run_probe(names, table, out=out, task=task, fractions=parsed, folds=int(folds), repeats=int(repeats),
              label_column=label_column, group_column=group_column, seed=int(seed), progress=progress,
              command=["medfm", *sys.argv[1:]])
    print(Path(out) / "probe_summary.csv")
    print(Path(out) / "probe.md")
    print(Path(out) / "probe.png")


def _end_cohort_run(summary, tables: bool = False) -> None:
    """Rank 0 says what the run did (and the tables it wrote); a run with failed inputs ends with exit status 1."""
    from .workflows.cohort import FAILED_FILE

    if _is_rank_zero():
        for line in summary.lines():
            print(line)
        for table in summary.tables if tables else ():
            print(table)
    if summary.failed:
        total = summary.processed + summary.already_done + len(summary.failed)
        raise MedfmError(f"{len(summary.failed)} of {total} inputs failed (listed above and in "
                         f"{summary.index.parent / FAILED_FILE}); the others are in {summary.index}")


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def demo(out: str = "demo_output", bundle: str = "models_genesis_chest_ct") -> None:
    """Restoration + embedding of the embedded sample CT, as NIfTI and as a DICOM series, with a montage."""
    from .demo import run_demo

    for line in run_demo(Path(out), bundle):
        print(line)


def list_bundles() -> None:
    """Table of the bundles found: task, modality, weights installed and registered, licences."""
    from .catalog import bundle_summaries

    rows, broken = bundle_summaries()
    for problem in broken:
        print(f"medfm: warning: {problem}", file=sys.stderr)
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


def schema(bundle: str) -> None:
    """Path of medfm's copy of the model zoo schema the bundle's metadata names, for offline
    ``python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath "$(medfm schema .)"``."""
    from .bundles import metadata_schema

    print(metadata_schema(bundle))


def release(*bundles: str, out: str = "dist", base_url: str = "", own_weights: bool = False) -> None:
    """Build ``<name>_v<version>.zip`` archives for ``monai.bundle.download`` and their ``model_info.json``.

    Args:
        bundles: bundle names or folders (default: every bundle found).
        out: output folder.
        base_url: where the archives will be served (recorded as each archive's ``source``); a
            GitHub release is ``https://github.com/OWNER/REPO/releases/download/TAG``.
        own_weights: pack task bundles' fine-tuned weights (yours to share), refused where the weights they
            were fine-tuned from may not be redistributed.
    """
    from .release import MODEL_INFO, release_bundles

    for item in release_bundles(out, list(bundles), base_url, own_weights):
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
    from .bundles import Bundle
    from .task_bundle import make_label_bundle

    target = make_label_bundle(bundle, labels, out, pretrained=pretrained, force=force)
    metadata = Bundle.find(target).metadata
    channels = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    print(f"{target}: {metadata['name']} ({', '.join(f'{k}: {v}' for k, v in channels.items())}), "
          f"weights: {metadata['task_bundle']['source_weights']}")


def finetune(bundle: str, out: str, dataset_dir: str | None = None, task: str | None = None, pretrained: bool = True,
             run_dir: str | None = None, force: bool = False, **overrides) -> None:
    """Fine-tune BUNDLE on labelled scans and package the best checkpoint as a task bundle OUT.

    The training is BUNDLE's own fine-tuning config for the task, the workflow ``python -m monai.bundle run``
    runs (so ``torchrun --nproc_per_node N -m medfm finetune ...``, ``--resume True``, ``--amp True`` and
    ``--accumulate N`` work as there). OUT segments, classifies or regresses: ``medfm infer OUT scans...``.

    Args:
        bundle: the foundation bundle (name or folder).
        out: the task bundle's folder; its name is the bundle's name.
        dataset_dir: the labelled data: a Decathlon folder (dataset.json) for segmentation, a folder with
            dataset.csv (image, label) for classification and regression.
        task: segmentation, classification or regression (default: the bundle's first fine-tuning task).
        pretrained: start from BUNDLE's installed weights (``False``: from scratch, the baseline).
        run_dir: the training's output folder (default OUT_training): logs, checkpoints, training state.
        force: replace an existing OUT.
        overrides: ``--key value`` for the fine-tuning config (``--max_epochs 50``, ``--patch_size [96,96,64]``);
            ``--from RUN_DIR`` packages a run made with ``python -m monai.bundle run`` instead of training.
    """
    from .bundles import Bundle
    from .task_bundle import finetune as run_finetuning
    from .workflows.distributed import end_torchrun_worker

    target = run_finetuning(bundle, out, dataset_dir=dataset_dir, task=task, pretrained=pretrained, run_dir=run_dir,
                            from_run=overrides.pop("from", None), force=force, **overrides)
    if target is not None:
        metadata = Bundle.find(target).metadata
        made = metadata["task_bundle"]
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in made["validation_metrics"].items())
        print(f"{target}: {metadata['name']}, {made['task']} of {', '.join(made['labels'])} "
              f"(epoch {made['epoch']}: {metrics or 'no metrics'}), from {made['source_bundle']} {made['source_weights']}")
    sys.stdout.flush()
    end_torchrun_worker()  # a distributed run's DDP threads would race the interpreter's teardown


def _weights_commands() -> dict:
    def fetch(bundle: str, weights: str | None = None, url: str | None = None, progress: bool = True) -> None:
        """Download a bundle's registered weights (sha256 checked), then import them into models/model.pt."""
        from .weights import fetch_weights

        for line in fetch_weights(bundle, weights=weights, url=url, progress=progress).lines():
            print(line)

    def import_(bundle: str, file: str, weights: str | None = None, in_channels: int | None = None,
                dtype: str = "float32", strict: bool = True, strip_objects: bool = False, stage: str | None = None) -> None:
        """Import a checkpoint (upstream layout or plain state dict) into BUNDLE/models/model.pt.

        ``--strict False`` imports a partial match (missing keys keep their fresh values) and
        lists what did not match. ``--strip_objects`` imports a file that pickles objects beyond
        tensors (e.g. an mmcv config in its meta) by keeping only its tensors; none of the
        objects' code runs. ``--stage tokenizer`` (spad_vit_base) imports the authors' tokenizer
        into the file the masked-image-modelling pre-training reads (pretrain/models/tokenizer.pt).
        """
        from .weights import import_weights

        report = import_weights(bundle, file, weights=weights, in_channels=in_channels, dtype=dtype, strict=strict,
                                strip_objects=strip_objects, stage=stage)
        for line in report.lines():
            print(line)
        for kind, keys in (("missing", report.missing_keys), ("unexpected", report.unexpected_keys)):
            if keys:
                print(f"{kind}: {', '.join(keys)}")

    def verify(bundle: str) -> None:
        """Check that BUNDLE/models/model.pt loads strictly and say which weights it holds."""
        from .weights import verify_bundle_weights

        for line in verify_bundle_weights(bundle):
            print(line)

    return {"fetch": fetch, "import": import_, "verify": verify}


def commands() -> dict:
    """The ``medfm`` commands by name (``weights`` holds its own)."""
    return {"list": list_bundles, "info": info, "schema": schema, "infer": infer, "embed": embed, "probe": probe, "demo": demo,
            "download": download, "release": release, "finetune": finetune, "label-bundle": label_bundle, "weights": _weights_commands()}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medfm`` console script; the exit status (also when called in-process)."""
    # SIGINT and SIGTERM (Ctrl-C, a scheduler's kill, `timeout`) unwind the run, so staging folders are removed
    received = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {stop: signal.signal(stop, interrupt) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(argv, received)
    finally:  # a caller in the same process (a notebook, a test) gets its own handlers back
        for stop, handler in previous.items():
            signal.signal(stop, handler)


#: The arguments of the command being run (what ``--report`` records), also when called in-process.
_arguments: list[str] = []


def _run(argv: list[str] | None, received: list[int]) -> int:
    _arguments[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        fire.Fire(commands(), command=argv, name="medfm")
        sys.stdout.flush()  # a closed pipe is reported here, inside the handlers below, not at interpreter exit
    except KeyboardInterrupt:
        return _end_interrupted(received)
    except MedfmError as error:
        if received:  # the interrupt landed inside a library (an import, say) that wrapped it in its own error
            return _end_interrupted(received)
        print(f"medfm: error: {_redacted(str(error))}", file=sys.stderr)
        return 1
    except fire.core.FireExit as exit_:
        return int(exit_.code or 0)
    except BrokenPipeError:  # `medfm info | head` closed the pipe: stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141
    except Exception as error:  # anything else still gets one line, with its type to help a bug report
        if received:
            return _end_interrupted(received)
        print(f"medfm: error: {_redacted(describe_error(error))}", file=sys.stderr)
        return 1
    return 0


def _redacted(message: str) -> str:
    """A message without URL credentials: the last guard, should a URL with them reach an error unadopted."""
    from .io.dicomweb import redact_credentials

    return redact_credentials(message)


def _end_interrupted(received: list[int]) -> int:
    """One line, then end by the signal received, as Unix tools do, so a calling shell loop or
    scheduler sees it (cleanup already ran while the run unwound)."""
    print("medfm: interrupted", file=sys.stderr)
    sys.stderr.flush()
    stop = received[0] if received else signal.SIGINT
    signal.signal(stop, signal.SIG_DFL)
    os.kill(os.getpid(), stop)
    return 128 + stop


if __name__ == "__main__":
    sys.exit(main())
