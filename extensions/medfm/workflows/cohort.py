"""One run of a network over a cohort: the runner behind ``medfm embed`` and ``medfm infer`` of task bundles.

The network is built and its weights loaded and hashed once per run; a DataLoader's worker
processes read and preprocess the next scans while the network runs. What is written per input
is the writer's business (:mod:`medfm.workflows.writers`: embeddings, segmentations, predictions);
the runner owns everything around it. Every file is written under a temporary name and renamed
into place before the input's row is appended (and synced) to the run's index, so a run killed at
any moment leaves no partial file and no row without its files; the same run started again skips
what is done. Under ``torchrun`` each process takes a disjoint share of the inputs, and rank 0
merges the shares into one set of tables at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import list_data_collate
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer, SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval  # MONAI's own window layout, counted the same way
from monai.utils import ensure_tuple_rep, fall_back_tuple
from torch.utils.data import DataLoader, Dataset

from ..bundles import bundle_name
from ..errors import MedfmError, describe_error, innermost
from ..io.atomic import folder_lock
from ..io.dicomweb import absolute_input
from ..io.embeddings import output_stem
from ..io.tables import drop_partial_line, durable_append, read_table, table_columns, write_table
from ..transforms.region import CropAtWorldPoint, PointOutsideScanError
from ..weights import checkpoint_weights_id, load_checkpoint, sha256_of
from .precision import mixed_precision

__all__ = ["CohortRunner", "CohortSummary", "CohortWriter", "FAILED_COLUMNS", "FAILED_FILE", "ROW_COLUMNS",
           "inference_device", "sliding_window_of", "window_count"]

logger = logging.getLogger(__name__)

#: Columns of ``failed.csv``: the inputs (and regions) that have no output yet, and why.
FAILED_COLUMNS = ("input", "region", "error")
FAILED_FILE = "failed.csv"
#: The columns every row of every table starts with: which input, and which model with which weights made it.
ROW_COLUMNS = ("input", "series_uid", "model", "weights")
#: Sliding-window scans with more window batches than this also get a per-window progress bar.
WINDOW_PROGRESS_MIN_BATCHES = 16


class CohortWriter:
    """What a cohort run writes for each input: its files in the output folder and its rows in the run's tables.

    ``tables`` maps each table's file name to its columns; the first is the run's index, one row
    per finished input (and region), whose ``file_columns`` name the files the row stands for. A
    row in the index means the input is done: a rerun skips it while its files are there.
    """

    tables: dict[str, tuple[str, ...]] = {}
    file_columns: tuple[str, ...] = ()
    integer_columns: tuple[str, ...] = ()
    #: the past tense of what the run does to an input ("embedded", "segmented"), for the summary line
    action: str = "done"
    #: whether the writer needs each input as read, before preprocessing (``source`` of :meth:`__call__`)
    needs_source: bool = False

    @property
    def index(self) -> str:
        return next(iter(self.tables))

    def result(self, image, output, name: str):
        """The result for one input, in memory (what :meth:`__call__` writes): ``image`` is the preprocessed
        (possibly cropped) input ``(C, *spatial)`` MetaTensor, ``output`` what the inferer returned for it (batch
        of one), ``name`` the input's name for messages."""
        raise NotImplementedError

    def __call__(self, item: dict, image, output, source, output_dir: Path, row: dict) -> dict[str, list[dict]]:
        """Write the outputs of one input and return its rows by table name.

        ``source``: the input as read (``needs_source``) or None; ``row``: the cells every row starts with
        (:data:`ROW_COLUMNS`, ``region`` and its centre); the rest as for :meth:`result`.
        """
        raise NotImplementedError


def sliding_window_of(inferer: Inferer) -> SlidingWindowInferer | None:
    """The ``SlidingWindowInferer`` that ``inferer`` is or wraps (through ``.inferer``), if any."""
    while inferer is not None and not isinstance(inferer, SlidingWindowInferer):
        inferer = getattr(inferer, "inferer", None)
    return inferer


def window_count(spatial_shape: Sequence[int], window: SlidingWindowInferer) -> int:
    """How many windows MONAI's sliding window lays over a scan of ``spatial_shape`` (padded up to the window)."""
    roi = fall_back_tuple(window.roi_size, spatial_shape)
    padded = [max(size, r) for size, r in zip(spatial_shape, roi)]
    interval = _get_scan_interval(padded, roi, len(padded), ensure_tuple_rep(window.overlap, len(padded)))
    return len(dense_patch_slices(padded, roi, interval))


def inference_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is present (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class CohortSummary:
    """What one run did, over all processes.

    ``failed`` maps ``(input, region)`` to the error of this run's failures; ``rows`` is the whole
    index after the run; ``per_process`` counts what each process did.
    """

    index: Path
    action: str = "done"
    processed: int = 0
    already_done: int = 0
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    per_process: list[int] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        shares = f" (by {len(self.per_process)} processes: {', '.join(map(str, self.per_process))})" \
            if len(self.per_process) > 1 else ""
        return [f"{self.processed} {self.action}{shares}, {self.already_done} already in {self.index}, {len(self.failed)} failed"]


def _item(entry: str | os.PathLike | Mapping) -> dict:
    """An input as ``{"image": absolute path, "region": "", "center_lps": None}``; mappings may name a
    region (``point:<id>``, ``label:<value>``) and its centre in mm (LPS)."""
    item = dict(entry) if isinstance(entry, Mapping) else {"image": entry}
    item["image"] = absolute_input(item["image"])
    item.setdefault("region", "")
    center = item.get("center_lps")
    item["center_lps"] = tuple(float(c) for c in center) if center is not None else None
    return item


def _caption(source: str) -> str:
    """A scan's name on a contact sheet, its end kept when long (a path's file, a URL's series UID)."""
    text = source.rstrip("/")
    return text if len(text) <= 90 else "..." + text[-87:]


def _key(item: Mapping) -> tuple[str, str]:
    return str(item["image"]), str(item.get("region", ""))


def _key_of_row(row: Mapping) -> tuple[str, str]:
    return str(row["input"]), str(row.get("region") or "")


def _failure_message(source: str, error: BaseException) -> str:
    """One line naming the input: medfm's own messages already do; others get the input in front."""
    cause = innermost(error)
    if isinstance(cause, MedfmError):
        return str(cause).splitlines()[0]
    return f"{source}: {describe_error(error)}"


def _by_scan(items: Sequence[dict]) -> list[dict]:
    """Items grouped per scan, in input order: ``{"image": path, "items": [...]}`` (a scan is read once for all its regions)."""
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item["image"], []).append(item)
    return [{"image": image, "items": members} for image, members in groups.items()]


class _Preprocessed(Dataset):
    """Scans run through the bundle's preprocessing (and read as they are, when ``reader`` is given); a failing
    scan comes back with ``"failure"``: its message."""

    def __init__(self, scans: Sequence[dict], preprocessing: Callable, reader: Callable | None = None) -> None:
        self.scans = list(scans)
        self.preprocessing = preprocessing
        self.reader = reader

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> dict:
        if torch.utils.data.get_worker_info() is None:
            return self._prepared(self.scans[index])
        with _warnings_kept() as warnings:  # a worker's: the main process logs them, where reports collect them
            prepared = self._prepared(self.scans[index])
        return {**prepared, "warnings": warnings}

    def _prepared(self, scan: dict) -> dict:
        try:
            data = self.preprocessing({"image": scan["image"]})
            source = self.reader(scan["image"], data["image"]) if self.reader is not None else None
            return {**scan, "data": data, "source": source}
        except Exception as error:  # reported per input by the main process; the run goes on
            return {**scan, "failure": _failure_message(scan["image"], error)}


@contextlib.contextmanager
def _warnings_kept() -> Iterator[list[str]]:
    """medfm's warnings logged in the block, kept in a list instead of handled (printed) here."""
    from ..run_report import warnings_collected

    package = logging.getLogger("medfm")
    handlers, propagate = package.handlers[:], package.propagate
    package.handlers[:], package.propagate = [], False
    try:
        with warnings_collected([]) as kept:
            yield kept
    finally:
        package.handlers[:], package.propagate = handlers, propagate


def _one(batch: list) -> dict:
    """DataLoader collate for single items (collated for the network in the main process)."""
    return batch[0]


def _read_as_loaded(path: str, preprocessed) -> object:
    """The input as read, with the series the preprocessing read (a DICOM folder may hold several)."""
    from ..io.reading import LoadScan

    return LoadScan(preprocessed.meta.get("SeriesInstanceUID") or None)(path)


class CohortRunner:
    """Run one network over many inputs, resumably, on one process or several, with a writer per input.

    Args:
        inputs: scan paths (files, DICOM folders, ``.zip``, DICOMweb URLs), or mappings with ``image`` and
            optionally ``region`` (``point:<id>`` / ``label:<value>``) and ``center_lps`` (mm, LPS): the
            region is run from a ``region_size`` crop centred there (:class:`~medfm.transforms.CropAtWorldPoint`).
        preprocessing: the bundle's dictionary preprocessing, called on ``{"image": path}``.
        network: the network, already on ``device``.
        inferer: called as ``inferer(batch, network)`` on a ``(1, C, *spatial)`` MetaTensor.
        writer: what is written per input (:class:`CohortWriter`).
        output_dir: where the outputs, the tables and ``failed.csv`` go.
        weights_file: loaded strictly into ``network`` (``None``: keep its weights).
        bundle_root: the bundle folder (its name and weights identity go into every row).
        model: model name for the tables (default: the bundle's name).
        region_size: the crop (voxels, after preprocessing) for regions; ``None``: the bundle has no
            region inputs (a model of whole registered volumes).
        device: where the network runs.
        num_workers: DataLoader worker processes reading and preprocessing ahead.
        progress: per-input progress bar (and per-window for big sliding-window scans) on rank 0.
        amp: bfloat16 autocast on CUDA (refused on the CPU, where it is slower and untested).
        preview: also write ``preview.png`` (pages ``preview_2.png``...): a contact sheet of every scan's
            middle planes as the network saw them (after preprocessing), from one tile per scan kept in
            ``preview/`` (:mod:`medfm.preview`).
        timeout_hours: how long the processes of a distributed run wait for the slowest one.
    """

    def __init__(self, inputs: Sequence, preprocessing: Callable, network: torch.nn.Module, inferer: Inferer,
                 writer: CohortWriter, output_dir: str | os.PathLike, weights_file: str | os.PathLike | None = None,
                 bundle_root: str | os.PathLike | None = None, model: str | None = None,
                 region_size: Sequence[int] | None = None, device: torch.device | str | None = None, num_workers: int = 0,
                 progress: bool = True, amp: bool = False, preview: bool = False, timeout_hours: float = 24.0) -> None:
        self.items = [_item(entry) for entry in inputs]
        self.preprocessing = preprocessing
        self.network = network
        self.inferer = inferer
        self.writer = writer
        self.output_dir = Path(output_dir).expanduser().absolute()
        self.weights_file = Path(weights_file) if weights_file else None
        self.bundle_root = Path(bundle_root).absolute() if bundle_root else None
        self.model = model or (bundle_name(self.bundle_root) if self.bundle_root else "")  # a renamed copy keeps it
        self.index = self.output_dir / writer.index
        self.cropper = CropAtWorldPoint(region_size) if region_size is not None else None
        if self.cropper is None and any(item["center_lps"] is not None for item in self.items):
            raise MedfmError(f"{self.model or 'this bundle'} has no region inputs (it takes whole registered "
                             "volumes; its config sets no region_size): --points and --mask do not apply")
        self.device = torch.device(device) if device is not None else inference_device()
        self.num_workers = int(num_workers)
        self.progress = progress
        self.amp = mixed_precision(amp, self.device)
        self.preview = bool(preview)
        self.timeout = datetime.timedelta(hours=timeout_hours)

    # ---- files of a run ------------------------------------------------------------------------
    @property
    def _parts_dir(self) -> Path:
        return self.output_dir / f".{self.index.name}.parts"

    def _part(self, kind: str, rank: int) -> Path:
        return self._parts_dir / f"{kind}.rank{rank}.csv"

    def _row_part(self, table: str, row: Mapping) -> Path:
        """Where one input's rows of a further table wait for the merge (rewritten whole when the input is redone)."""
        return self._parts_dir / f"{Path(table).stem}.rows" / f"{output_stem(row['input'], row.get('region') or '')}.csv"

    def _complete(self, row: Mapping) -> bool:
        return all((self.output_dir / str(row[column])).is_file() for column in self.writer.file_columns if row.get(column))

    def _recorded_rows(self) -> tuple[list[dict], list[dict]]:
        """Rows of the index and of unmerged parts (an earlier run's, or this run's at its end) whose files are present."""
        part_rows = [row for part in sorted(self._parts_dir.glob("index.rank*.csv")) for row in read_table(part)]
        return tuple([row for row in rows if self._complete(row)] for rows in (read_table(self.index), part_rows))

    def _check_tables(self) -> None:
        """Never append to a file of another kind that happens to have a table's name."""
        for name, columns in self.writer.tables.items():
            path = self.output_dir / name
            if path.exists() and table_columns(path) != list(columns):
                raise MedfmError(f"{path}: exists and is not this run's {name} (its columns are not {', '.join(columns)}); "
                                 "choose another --out folder")

    def _repair_after_a_crash(self) -> None:
        """Remove the files a killed run was writing (``atomic_path`` temporaries) and cut the row it was appending."""
        for folder in (self.output_dir, *(p for p in self._parts_dir.rglob("*") if p.is_dir())):
            for stale in folder.glob(".*.part"):
                stale.unlink(missing_ok=True)
        for part in self._parts_dir.glob("*.csv"):
            drop_partial_line(part)

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> CohortSummary:
        started_group = self._start_process_group()
        try:
            with contextlib.ExitStack() as self._held:  # the output folder's lock, once rank 0 takes it
                return self._run()
        finally:
            if started_group:
                dist.destroy_process_group()

    def _start_process_group(self) -> bool:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
            return False
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=self.timeout)
        return True

    def _run(self) -> CohortSummary:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        weights_id = self.load_weights()  # weights that do not fit leave no output folder behind
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._held.enter_context(folder_lock(self.output_dir))  # two runs into one folder would mix their parts
            self._check_tables()
            self._parts_dir.mkdir(exist_ok=True)
            self._repair_after_a_crash()
        self._barrier()
        recorded = [row for rows in self._recorded_rows() for row in rows]
        self._refuse_other_weights(recorded, weights_id)
        done = {_key_of_row(row) for row in recorded}
        unique = list({_key(item): item for item in self.items}.values())
        pending = [item for item in unique if _key(item) not in done]
        self._barrier()  # every process has read the same done set before any of them writes
        processed = self._run_share(_by_scan(pending)[rank::world], rank, weights_id)
        per_process = [processed]
        if world > 1:
            per_process = [0] * world
            dist.all_gather_object(per_process, processed)  # also waits for the slowest process
        summary = self._merge(order={_key(item): position for position, item in enumerate(unique)}) if rank == 0 else None
        if world > 1:
            box = [summary]
            dist.broadcast_object_list(box, src=0)
            summary = box[0]
        summary.processed, summary.per_process = sum(per_process), per_process
        summary.already_done = len(unique) - len(pending)
        return summary

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _refuse_other_weights(self, recorded: list[dict], weights_id: str) -> None:
        """A folder holds one model's outputs with one set of weights: a rerun with other weights would
        otherwise skip the inputs already there and mix two models' results in one table."""
        other = next((row for row in recorded if (row["model"], row["weights"]) != (self.model, weights_id)), None)
        if other is not None:
            raise MedfmError(f"{self.index}: holds outputs of {other['model']} with weights {other['weights']}, "
                             f"this run is {self.model} with weights {weights_id}; one folder holds one model's "
                             "outputs: choose another --out")

    def load_weights(self) -> str:
        """Load ``weights_file`` strictly (once per run) and return the weights' identity for the tables."""
        if self.weights_file is None:
            return "none"
        state = load_checkpoint(self.weights_file)
        try:
            self.network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = " ".join(line.strip() for line in str(error).splitlines()[:2])
            raise MedfmError(f"{self.weights_file}: does not load into the network: {first[:300]} (a "
                             "fine-tuned checkpoint goes into a task bundle: medfm finetune BUNDLE --from RUN_DIR)") from None
        if self.bundle_root is None:
            return f"unregistered:{sha256_of(self.weights_file)[:16]}"
        return checkpoint_weights_id(self.bundle_root, self.weights_file)[0]  # the file's own id, wherever it lies

    def _run_share(self, scans: list[dict], rank: int, weights_id: str) -> int:
        """Run this process's scans (each read once for all its regions); returns how many inputs were
        written (failures go to its part file)."""
        from tqdm import tqdm

        reader = _read_as_loaded if self.writer.needs_source else None
        loader = DataLoader(_Preprocessed(scans, self.preprocessing, reader), batch_size=1, shuffle=False,
                            num_workers=self.num_workers, collate_fn=_one, pin_memory=self.device.type == "cuda")
        self.network.eval()
        processed = 0
        bar = tqdm(loader, total=len(scans), desc=self.writer.action, unit="scan", disable=not self.progress or rank != 0,
                   file=sys.stderr)
        for scan in bar:
            for message in scan.get("warnings", ()):
                logging.getLogger("medfm").warning(message)
            if self.preview and scan.get("failure") is None:
                self._write_tile(scan)
            for item in scan["items"]:
                message = scan.get("failure")
                if message is None:
                    try:
                        self._run_item(item, scan["data"]["image"], scan["source"], rank, weights_id)
                        processed += 1
                        continue
                    except PointOutsideScanError as error:
                        message = f"{item['image']} ({item['region']}): {error}"
                    except Exception as error:
                        message = _failure_message(item["image"], error)
                tqdm.write(f"medfm: skipped: {message}", file=sys.stderr)
                durable_append(self._part("failed", rank), FAILED_COLUMNS,
                               {"input": item["image"], "region": item["region"], "error": message})
        return processed

    def _run_item(self, item: dict, image, source, rank: int, weights_id: str) -> None:
        """Run the network on the whole preprocessed scan, or the crop at the item's point; the writer writes
        its outputs, then its rows go to the parts (the index row last: it marks the input done)."""
        row = {"input": item["image"], "series_uid": str(image.meta.get("SeriesInstanceUID", "")), "model": self.model,
               "weights": weights_id, "region": item["region"], "center_lps": None}
        if item["center_lps"] is not None:
            image = self.cropper(image, item["center_lps"])
            row["center_lps"] = image.meta["region_center_lps"]
        rows = self.writer(item, image, self.infer(image), source, self.output_dir, row)
        for table, columns in list(self.writer.tables.items())[1:]:
            write_table(self._row_part(table, row), columns, rows.get(table, []))
        for index_row in rows[self.writer.index]:
            durable_append(self._part("index", rank), self.writer.tables[self.writer.index], index_row)

    def infer(self, image) -> object:
        """The inferer's output for one preprocessed image ``(C, *spatial)``: a batch of one, on ``device``."""
        batch = list_data_collate([{"image": image}])["image"].to(self.device)
        self._window_progress(batch)
        self.network.eval()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return self.inferer(batch, self.network)

    def _window_progress(self, image: torch.Tensor) -> None:
        """Show a per-window bar for scans with many sliding windows (rank 0, progress on)."""
        window = sliding_window_of(self.inferer)
        if window is None:
            return
        batches = window_count(image.shape[2:], window) // max(1, window.sw_batch_size)
        window.progress = bool(self.progress and batches > WINDOW_PROGRESS_MIN_BATCHES
                               and (not dist.is_initialized() or dist.get_rank() == 0))

    # ---- previews ------------------------------------------------------------------------------
    @property
    def _tiles_dir(self) -> Path:
        return self.output_dir / "preview"

    def _tile(self, image: str) -> Path:
        return self._tiles_dir / f"{output_stem(image)}.png"

    def _write_tile(self, scan: dict) -> None:
        """The scan's middle planes as the network sees them (first channel), for the contact sheet."""
        from ..preview import write_plane_tile

        image = scan["data"]["image"]
        if image.ndim != 4:  # a model input that is not one (C, X, Y, Z) volume has no three planes
            return
        self._tiles_dir.mkdir(exist_ok=True)
        write_plane_tile(self._tile(scan["image"]), image[0].detach().cpu().numpy(), image.affine.numpy())

    def _write_contact_sheet(self, rows: list[dict]) -> list[Path]:
        """The contact sheet of every scan in the index that has a tile, in index order."""
        from ..preview import write_contact_sheet

        scans = list(dict.fromkeys(row["input"] for row in rows))
        tiles = [(_caption(scan), tile) for scan in scans if (tile := self._tile(scan)).is_file()]
        if len(tiles) < len(scans):
            logger.warning("%s: %d of %d scans have no preview tile (run without --preview)",
                           self.index, len(scans) - len(tiles), len(scans))
        return write_contact_sheet(self.output_dir / "preview.png", tiles) if tiles else []

    # ---- the end of a run ------------------------------------------------------------------------
    def _merge(self, order: Mapping[tuple[str, str], int]) -> CohortSummary:
        """Rank 0 once every process is done: the index (each input once: earlier rows first, then this
        run's in input order), every further table (the rows of the inputs in the index), ``failed.csv``
        (what still has no output), and no parts left."""
        earlier, new = self._recorded_rows()
        new.sort(key=lambda row: order.get(_key_of_row(row), -1))
        done = {_key_of_row(row): row for row in earlier + new}
        rows = list(done.values())
        tables = [self.index]
        write_table(self.index, self.writer.tables[self.writer.index], rows, self.writer.integer_columns)
        redone = {_key_of_row(row) for row in new}
        for table, columns in list(self.writer.tables.items())[1:]:
            kept = [row for row in read_table(self.output_dir / table) if _key_of_row(row) in done and _key_of_row(row) not in redone]
            fresh = [row for index_row in new for row in read_table(self._row_part(table, index_row))]
            write_table(self.output_dir / table, columns, kept + fresh, self.writer.integer_columns)
            tables.append(self.output_dir / table)
        this_run = {(r["input"], r["region"]): r["error"] for part in sorted(self._parts_dir.glob("failed.rank*.csv"))
                    for r in read_table(part)}
        failed_file = self.output_dir / FAILED_FILE
        earlier_failures = {(r["input"], r["region"]): r["error"] for r in read_table(failed_file)}
        still_failing = {key: error for key, error in {**earlier_failures, **this_run}.items() if key not in done}
        if still_failing:
            write_table(failed_file, FAILED_COLUMNS, [dict(zip(FAILED_COLUMNS, (*key, error))) for key, error in still_failing.items()])
        else:
            failed_file.unlink(missing_ok=True)
        shutil.rmtree(self._parts_dir)
        previews = self._write_contact_sheet(rows) if self.preview else []
        return CohortSummary(index=self.index, action=self.writer.action, rows=rows, tables=tables, previews=previews,
                             failed={k: e for k, e in this_run.items() if k not in done})
