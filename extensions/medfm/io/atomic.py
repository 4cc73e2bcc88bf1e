"""Writing files so that a failure never leaves a truncated file under the final name, and clearing what killed
runs left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "atomic_path", "folder_lock", "process_alive", "remove_abandoned_staging"]

#: Held by the run writing a folder (see :func:`folder_lock`).
LOCK_FILE = ".medfm.lock"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The file gets the usual permissions for new files (``0o666`` less the umask).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def remove_abandoned_staging(out_dir: Path) -> None:
    """Remove staging folders beside ``out_dir`` left by runs that were killed (their process is gone):
    SIGKILL gives a run no chance to clean up, so the next run into the same ``--out`` does it."""
    for folder in out_dir.parent.glob(f".{out_dir.name}.staging-*-*"):
        pid = folder.name[len(f".{out_dir.name}.staging-"):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for one run: a second run asking for it meanwhile is refused at once, in one line.

    An advisory ``flock`` on ``folder/.medfm.lock``, which the system drops when its holder ends, however it
    ends (SIGKILL too), so a killed run never blocks the run that resumes it. The holder removes the file.
    """
    from ..errors import MedfmError

    path = Path(folder) / LOCK_FILE
    stream = open(path, "a+", encoding="utf-8")
    try:
        import fcntl

        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.seek(0)
        holder = stream.read().strip() or "unknown"
        stream.close()
        raise MedfmError(f"{folder}: another medfm run (process {holder}) is writing to this folder; wait for it to "
                         "end, or choose another --out") from None
    try:
        stream.seek(0)
        stream.truncate()
        stream.write(f"{os.getpid()}\n")
        stream.flush()
        yield
    finally:
        path.unlink(missing_ok=True)
        stream.close()
