"""Writing files so that a failure never leaves a truncated file under the final name, and clearing what killed
runs left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "process_alive", "remove_abandoned_staging"]


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
