"""``--report FILE.json``: what one ``medfm infer`` or ``medfm embed`` run did, written for failed runs too.

The report names the software (medfm, MONAI, torch, Python), the bundle and the weights (id and
sha256), the device, the inputs (with their DICOM series UIDs where the run read them), the
warnings medfm logged (contract deviations among them), seconds per stage, the outputs written,
and the error that ended the run, if one did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from .errors import MedfmError, describe_error
from .io.atomic import atomic_path

__all__ = ["RunReport", "check_report_target", "run_report", "warnings_collected"]


class _Warnings(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def warnings_collected(messages: list[str]) -> Iterator[list[str]]:
    """Add each distinct warning medfm logs in the block to ``messages`` (DataLoader workers' included)."""
    collector = _Warnings(messages)
    package_logger = logging.getLogger("medfm")
    package_logger.addHandler(collector)
    try:
        yield messages
    finally:
        package_logger.removeHandler(collector)


class RunReport:
    """The facts of one run, filled in as it goes (``stage``, ``inputs``, ``outputs``) and written by :func:`run_report`.

    A :meth:`discarded` report (no ``--report``) skips the work of gathering them, hashing the weights among it.
    """

    def __init__(self, command: str, arguments: Sequence[str], enabled: bool = True) -> None:
        self.enabled = enabled
        from .io.dicomweb import redact_credentials

        self.data: dict = {"command": command, "arguments": [redact_credentials(a) for a in arguments], "status": "running",
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "software": _software() if enabled else {}, "bundle": None, "weights": None, "device": None, "inputs": [],
                           "warnings": [], "seconds": {}, "outputs": [], "stored": None, "error": None}

    @classmethod
    def discarded(cls) -> RunReport:
        return cls("", [], enabled=False)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the stage ``name`` (seconds, added up when a stage runs more than once)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = self.data["seconds"]
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    def describe_bundle(self, bundle_dir: Path, checkpoint: str | os.PathLike | None, device: str | None = None) -> None:
        """Bundle name, version and folder; the weights the run loads from ``checkpoint`` (the config's
        ``ckpt_path``; None: random initialisation); the device (a ``device`` override, else the bundles' rule)."""
        from .weights.records import checkpoint_weights_id

        if not self.enabled:
            return
        from .bundles import Bundle

        bundle = Bundle.find(bundle_dir)
        self.data["bundle"] = {"name": bundle.name, "version": bundle.metadata.get("version"), "folder": str(bundle.root)}
        weights_id, digest = checkpoint_weights_id(bundle_dir, checkpoint)
        self.data["weights"] = {"id": weights_id, "file": None if checkpoint is None else str(checkpoint), "sha256": digest}
        self.data["device"] = str(device) if device else _device()

    def inputs(self, rows: Sequence[dict]) -> None:
        """The inputs as the run read them: path, DICOM series UID (empty for other files), region, and
        the embedding file or the error where there is one."""
        self.data["inputs"] = [{"input": row["input"], "series_uid": row.get("series_uid", ""), "region": row.get("region", ""),
                                **{key: row[key] for key in ("embedding", "error") if row.get(key)}} for row in rows]

    def outputs(self, paths: Sequence[str | os.PathLike]) -> None:
        self.data["outputs"] = [str(path) for path in paths]

    def stored(self, server: str, sop_instance_uids: Sequence[str]) -> None:
        """The DICOM outputs a server stored (STOW-RS): its URL and the SOP instance UIDs."""
        self.data["stored"] = {"server": server, "sop_instance_uids": list(sop_instance_uids)}


def _software() -> dict:
    from . import __version__

    versions = {"medfm": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for module in ("monai", "torch"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return versions


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    return "cpu"


def _write(report: RunReport, target: Path) -> None:
    try:
        with atomic_path(target) as temporary:
            temporary.write_text(json.dumps(report.data, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise MedfmError(f"{target}: the run report could not be written ({error.strerror or error})") from None


#: Keys every run report has: a file without them is not one, and --report does not replace it.
_REPORT_KEYS = {"command", "arguments", "status", "software", "inputs", "outputs"}


def _is_run_report(path: Path) -> bool:
    try:
        if path.stat().st_size > 64 * 2**20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and _REPORT_KEYS <= set(data)


def check_report_target(target: Path, inputs: Sequence[str | os.PathLike | None] = (), out: str | os.PathLike | None = None) -> None:
    """Refuse a ``--report`` path that is, or is inside, an input or the output folder, or that names a file
    which is not a run report: a report never replaces a scan, a table or anything else medfm did not write."""
    from .io.dicomweb import is_dicomweb_url

    resolved = target.resolve()
    if out is not None:
        out_dir = Path(out).expanduser().resolve()
        if resolved == out_dir or out_dir in resolved.parents:
            raise MedfmError(f"{target}: --report is inside --out {out}, where medfm writes its outputs; put it elsewhere")
    for given in inputs:
        if given is None or is_dicomweb_url(given):
            continue
        source = Path(given).expanduser().resolve()
        if resolved == source or source in resolved.parents:
            raise MedfmError(f"{target}: --report is the input {given}{' (or inside it)' if source.is_dir() else ''}; "
                             "put it elsewhere")
    if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise MedfmError(f"{target}: --report must be a file in an existing, writable folder")
    if target.exists() and not _is_run_report(target):
        raise MedfmError(f"{target}: exists and is not a medfm run report; --report replaces only an earlier report")


@contextlib.contextmanager
def run_report(path: str | os.PathLike | None, command: str, arguments: Sequence[str],
               inputs: Sequence[str | os.PathLike | None] = (), out: str | os.PathLike | None = None) -> Iterator[RunReport | None]:
    """A :class:`RunReport` written to ``path`` when the block ends, with ``status`` ``ok``, ``failed``
    (and the error's one line) or ``interrupted``; None and nothing written when ``path`` is None. A report
    that cannot be written after a failed run is a warning: the run's own error is the one raised.
    ``inputs`` (files and folders the run reads) and ``out`` are what the report may not be or be inside
    (:func:`check_report_target`, before any work)."""
    if path is None:
        yield None
        return
    target = Path(path).expanduser()
    check_report_target(target, inputs, out)
    report = RunReport(command, arguments)
    start = time.perf_counter()

    def finish(status: str, error: str | None) -> None:
        report.data["status"], report.data["error"] = status, error
        report.data["seconds"]["total"] = round(time.perf_counter() - start, 3)

    try:
        with warnings_collected(report.data["warnings"]):
            yield report
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            finish("interrupted", "interrupted")
        else:
            finish("failed", str(error) if isinstance(error, MedfmError) else describe_error(error))
        try:
            _write(report, target)
        except MedfmError as unwritten:
            print(f"medfm: warning: {unwritten}", file=sys.stderr)
        raise
    finish("ok", None)
    _write(report, target)
