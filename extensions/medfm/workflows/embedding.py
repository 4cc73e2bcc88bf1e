"""One embedding run over many inputs: the workflow behind every bundle's ``configs/embed.json``.

The network is built and its weights loaded and hashed once per run; a DataLoader's worker
processes read and preprocess the next scans while the network runs. Every ``.npy`` is written
under a temporary name and renamed into place before its index row is appended (and synced), so
a run killed at any moment leaves no partial file and no row without its embedding; the same run
started again skips what is done. Under ``torchrun`` each process embeds a disjoint share of the
inputs, and rank 0 merges the shares into one index at the end.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.data import list_data_collate
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer, SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval  # MONAI's own window layout, counted the same way
from monai.utils import ensure_tuple_rep, fall_back_tuple
from torch.utils.data import DataLoader, Dataset

from ..errors import MedfmError, describe_error, innermost
from ..io.atomic import atomic_path
from ..io.dicomweb import absolute_input
from ..transforms.region import CropAtWorldPoint, PointOutsideScanError
from ..io.embeddings import (INDEX_COLUMNS, check_index_file, embedding_file_name, index_row, output_stem,
                             read_index_rows, save_vector, write_index_rows)
from ..bundles import bundle_name
from ..weights import installed_weights_id, load_checkpoint, sha256_of
from .precision import mixed_precision

__all__ = ["EmbeddingRunner", "EmbeddingSummary", "FAILED_COLUMNS", "embedding_device", "sliding_window_of", "window_count"]

logger = logging.getLogger(__name__)

#: Columns of ``failed.csv``: the inputs (and regions) that have no embedding yet, and why.
FAILED_COLUMNS = ("input", "region", "error")
FAILED_FILE = "failed.csv"
#: Sliding-window scans with more window batches than this also get a per-window progress bar.
WINDOW_PROGRESS_MIN_BATCHES = 16


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


def embedding_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is present (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass
class EmbeddingSummary:
    """What one run did, over all processes.

    ``failed`` maps ``(input, region)`` to the error of this run's failures; ``rows`` is the whole
    index after the run; ``per_process`` counts what each process embedded.
    """

    index: Path
    embedded: int = 0
    already_done: int = 0
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    per_process: list[int] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        shares = f" (by {len(self.per_process)} processes: {', '.join(map(str, self.per_process))})" \
            if len(self.per_process) > 1 else ""
        return [f"{self.embedded} embedded{shares}, {self.already_done} already in {self.index}, {len(self.failed)} failed"]


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
    """Scans run through the bundle's preprocessing; a failing scan comes back with ``"failure"``: its message."""

    def __init__(self, scans: Sequence[dict], preprocessing: Callable) -> None:
        self.scans = list(scans)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> dict:
        scan = self.scans[index]
        try:
            return {**scan, "data": self.preprocessing({"image": scan["image"]})}
        except Exception as error:  # reported per input by the main process; the run goes on
            return {**scan, "failure": _failure_message(scan["image"], error)}


def _one(batch: list) -> dict:
    """DataLoader collate for single items (collated for the network in the main process)."""
    return batch[0]


def _durable_append(path: Path, columns: Sequence[str], row: Mapping) -> None:
    """Append one CSV row and sync it, so a row on disk is a whole row (header first when new)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    writer.writerow({column: row.get(column, "") for column in columns})
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, buffer.getvalue().encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _drop_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a process killed while writing it)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as stream:
            stream.truncate(data.rfind(b"\n") + 1)


def _csv_rows(path: Path) -> list[dict]:
    """Rows of a CSV file written here (none when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


class EmbeddingRunner:
    """Embed many inputs with one network, resumably, one process or several.

    Args:
        inputs: scan paths (files, DICOM folders, ``.zip``), or mappings with ``image`` and optionally
            ``region`` (``point:<id>`` / ``label:<value>``) and ``center_lps`` (mm, LPS): the region is
            embedded from a ``region_size`` crop centred there (:class:`~medfm.transforms.CropAtWorldPoint`).
        preprocessing: the bundle's dictionary preprocessing, called on ``{"image": path}``.
        network: the network, already on ``device``.
        inferer: called as ``inferer(batch, network)`` on a ``(1, C, *spatial)`` MetaTensor.
        output_dir: where ``.npy`` files, the index and ``failed.csv`` go.
        weights_file: ``models/model.pt``, loaded strictly into ``network`` (``None``: keep its weights).
        bundle_root: the bundle folder (its name and weights identity go into every index row).
        model: model name for the index (default: the bundle folder's name).
        output_key: for inferers returning a dict, the key holding the embedding.
        pooling: applied to the one item's output (e.g. global average pooling of a feature map).
        index_file: index name in ``output_dir`` (``.csv`` or ``.parquet``).
        region_size: the crop (voxels, after preprocessing) for regions; ``None``: the bundle has no
            region embeddings (a model of whole registered volumes).
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
                 output_dir: str | os.PathLike, weights_file: str | os.PathLike | None = None,
                 bundle_root: str | os.PathLike | None = None, model: str | None = None, output_key: str | None = None,
                 pooling: Callable | None = None, index_file: str = "embeddings.csv",
                 region_size: Sequence[int] | None = None,
                 device: torch.device | str | None = None, num_workers: int = 0, progress: bool = True,
                 amp: bool = False, preview: bool = False, timeout_hours: float = 24.0) -> None:
        self.items = [_item(entry) for entry in inputs]
        self.preprocessing = preprocessing
        self.network = network
        self.inferer = inferer
        self.output_dir = Path(output_dir).expanduser().absolute()
        self.weights_file = Path(weights_file) if weights_file else None
        self.bundle_root = Path(bundle_root).absolute() if bundle_root else None
        self.model = model or (bundle_name(self.bundle_root) if self.bundle_root else "")  # a renamed copy keeps it
        self.output_key = output_key
        self.pooling = pooling
        self.index = self.output_dir / index_file
        self.cropper = CropAtWorldPoint(region_size) if region_size is not None else None
        if self.cropper is None and any(item["center_lps"] is not None for item in self.items):
            raise MedfmError(f"{self.model or 'this bundle'} has no region embeddings (it embeds whole registered "
                             "volumes; its embed.json sets no region_size): --points and --mask do not apply")
        self.device = torch.device(device) if device is not None else embedding_device()
        self.num_workers = int(num_workers)
        self.progress = progress
        self.amp = mixed_precision(amp, self.device)
        self.preview = bool(preview)
        self.timeout = datetime.timedelta(hours=timeout_hours)
        if self.index.suffix.lower() not in (".csv", ".parquet") or Path(index_file).name != str(index_file):
            raise MedfmError(f"{index_file}: the index must be a file name (no folders) ending in .csv or .parquet")

    # ---- files of a run ------------------------------------------------------------------------
    @property
    def _parts_dir(self) -> Path:
        return self.output_dir / f".{self.index.name}.parts"

    def _part(self, kind: str, rank: int) -> Path:
        return self._parts_dir / f"{kind}.rank{rank}.csv"

    def _recorded_rows(self) -> tuple[list[dict], list[dict]]:
        """Rows of the index and of unmerged parts (an earlier run's, or this run's at its end) whose ``.npy`` is present."""
        index_rows = read_index_rows(self.index) if self.index.is_file() else []
        part_rows = [row for part in sorted(self._parts_dir.glob("index.rank*.csv")) for row in _csv_rows(part)]
        return tuple([row for row in rows if (self.output_dir / str(row["embedding"])).is_file()]
                     for rows in (index_rows, part_rows))

    def _repair_after_a_crash(self) -> None:
        """Remove the files a killed run was writing (``atomic_path`` temporaries) and cut the row it was appending."""
        for pattern in (".*_embedding.npy.*.part", f".{self.index.name}.*.part", f".{FAILED_FILE}.*.part"):
            for stale in self.output_dir.glob(pattern):
                stale.unlink(missing_ok=True)
        for part in self._parts_dir.glob("*.csv"):
            _drop_partial_line(part)

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> EmbeddingSummary:
        started_group = self._start_process_group()
        try:
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

    def _run(self) -> EmbeddingSummary:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            check_index_file(self.index)
            self._parts_dir.mkdir(exist_ok=True)
            self._repair_after_a_crash()
        self._barrier()
        weights_id = self._load_weights()
        recorded = [row for rows in self._recorded_rows() for row in rows]
        self._refuse_other_weights(recorded, weights_id)
        done = {_key_of_row(row) for row in recorded}
        unique = list({_key(item): item for item in self.items}.values())
        pending = [item for item in unique if _key(item) not in done]
        self._barrier()  # every process has read the same done set before any of them writes
        embedded = self._embed_share(_by_scan(pending)[rank::world], rank, weights_id)
        per_process = [embedded]
        if world > 1:
            per_process = [0] * world
            dist.all_gather_object(per_process, embedded)  # also waits for the slowest process
        summary = self._merge(order={_key(item): position for position, item in enumerate(unique)}) if rank == 0 else None
        if world > 1:
            box = [summary]
            dist.broadcast_object_list(box, src=0)
            summary = box[0]
        summary.embedded, summary.per_process = sum(per_process), per_process
        summary.already_done = len(unique) - len(pending)
        return summary

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _refuse_other_weights(self, recorded: list[dict], weights_id: str) -> None:
        """An index holds one model's embeddings with one set of weights: a rerun with other weights
        would otherwise skip the inputs already there and mix two feature spaces in one table."""
        other = next((row for row in recorded if (row["model"], row["weights"]) != (self.model, weights_id)), None)
        if other is not None:
            raise MedfmError(f"{self.index}: holds embeddings of {other['model']} with weights {other['weights']}, "
                             f"this run is {self.model} with weights {weights_id}; one index holds one model's "
                             "embeddings: choose another --out")

    def _load_weights(self) -> str:
        """Load ``weights_file`` strictly (once per run) and return the weights' identity for the index."""
        if self.weights_file is None:
            return "none"
        state = load_checkpoint(self.weights_file)
        try:
            self.network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise MedfmError(f"{self.weights_file}: does not load into the network: {str(error).splitlines()[0]}") from None
        digest = sha256_of(self.weights_file)
        return installed_weights_id(self.bundle_root, digest) if self.bundle_root else f"unregistered:{digest[:16]}"

    def _embed_share(self, scans: list[dict], rank: int, weights_id: str) -> int:
        """Embed this process's scans (each read once for all its regions); returns how many embeddings
        were written (failures go to its part file)."""
        from tqdm import tqdm

        loader = DataLoader(_Preprocessed(scans, self.preprocessing), batch_size=1, shuffle=False,
                            num_workers=self.num_workers, collate_fn=_one, pin_memory=self.device.type == "cuda")
        self.network.eval()
        embedded = 0
        bar = tqdm(loader, total=len(scans), desc="embedding", unit="scan", disable=not self.progress or rank != 0,
                   file=sys.stderr)
        for scan in bar:
            if self.preview and scan.get("failure") is None:
                self._write_tile(scan)
            for item in scan["items"]:
                message = scan.get("failure")
                if message is None:
                    try:
                        self._embed_item(item, scan["data"]["image"], rank, weights_id)
                        embedded += 1
                        continue
                    except PointOutsideScanError as error:
                        message = f"{item['image']} ({item['region']}): {error}"
                    except Exception as error:
                        message = _failure_message(item["image"], error)
                tqdm.write(f"medfm: skipped: {message}", file=sys.stderr)
                _durable_append(self._part("failed", rank), FAILED_COLUMNS,
                                {"input": item["image"], "region": item["region"], "error": message})
        return embedded

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
            logger.warning("%s: %d of %d scans have no preview tile (embedded by a run without --preview)",
                           self.index, len(scans) - len(tiles), len(scans))
        return write_contact_sheet(self.output_dir / "preview.png", tiles) if tiles else []

    def _embed_item(self, item: dict, image, rank: int, weights_id: str) -> None:
        """Embed the whole preprocessed scan, or the crop at the item's point, and save it with its row."""
        center = None
        region = image
        if item["center_lps"] is not None:
            region = self.cropper(image, item["center_lps"])
            center = region.meta["region_center_lps"]
        vector = self._embedding(item, region)
        name = embedding_file_name(item["image"], item["region"])
        save_vector(self.output_dir / name, vector)
        row = index_row(item["image"], str(image.meta.get("SeriesInstanceUID", "")), self.model, weights_id, name,
                        int(vector.size), region=item["region"], center_lps=center)
        _durable_append(self._part("index", rank), INDEX_COLUMNS, row)

    def _embedding(self, item: dict, image) -> np.ndarray:
        """The embedding vector of one preprocessed image ``(C, *spatial)`` (float32); non-finite values are an error."""
        batch = list_data_collate([{"image": image}])["image"].to(self.device)
        self._window_progress(batch)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            output = self.inferer(batch, self.network)
        if self.output_key is not None:
            output = output[self.output_key]
        output = output[0].float()
        if self.pooling is not None:
            output = self.pooling(output)
        vector = torch.as_tensor(output).detach().cpu().numpy().astype(np.float32).reshape(-1)
        if not np.isfinite(vector).all():
            where = f"{item['image']}" + (f" ({item['region']})" if item["region"] else "")
            raise MedfmError(f"{where}: the embedding holds {int((~np.isfinite(vector)).sum())} non-finite "
                             f"values of {vector.size} (NaN or Inf); not written")
        return vector

    def _window_progress(self, image: torch.Tensor) -> None:
        """Show a per-window bar for scans with many sliding windows (rank 0, progress on)."""
        window = sliding_window_of(self.inferer)
        if window is None:
            return
        batches = window_count(image.shape[2:], window) // max(1, window.sw_batch_size)
        window.progress = bool(self.progress and batches > WINDOW_PROGRESS_MIN_BATCHES
                               and (not dist.is_initialized() or dist.get_rank() == 0))

    def _merge(self, order: Mapping[tuple[str, str], int]) -> EmbeddingSummary:
        """Rank 0 once every process is done: one index (each input once: earlier rows first, then this
        run's in input order), ``failed.csv`` (what still has no embedding), and no parts left."""
        earlier, new = self._recorded_rows()
        new.sort(key=lambda row: order.get(_key_of_row(row), -1))
        done = {_key_of_row(row): row for row in earlier + new}
        rows = list(done.values())
        write_index_rows(self.index, rows)
        failed_file = self.output_dir / FAILED_FILE
        this_run: dict[tuple[str, str], str] = {}
        for part in sorted(self._parts_dir.glob("failed.rank*.csv")):
            this_run.update({(r["input"], r["region"]): r["error"] for r in _csv_rows(part)})
        earlier_failures = {(r["input"], r["region"]): r["error"] for r in _csv_rows(failed_file)}
        still_failing = {key: error for key, error in {**earlier_failures, **this_run}.items() if key not in done}
        if still_failing:
            with atomic_path(failed_file) as temporary:
                with open(temporary, "w", newline="", encoding="utf-8") as stream:
                    writer = csv.writer(stream, lineterminator="\n")
                    writer.writerow(FAILED_COLUMNS)
                    writer.writerows([*key, error] for key, error in still_failing.items())
        else:
            failed_file.unlink(missing_ok=True)
        for part in self._parts_dir.glob("*.csv"):
            part.unlink()
        self._parts_dir.rmdir()
        previews = self._write_contact_sheet(rows) if self.preview else []
        return EmbeddingSummary(index=self.index, failed={k: e for k, e in this_run.items() if k not in done}, rows=rows,
                                previews=previews)
