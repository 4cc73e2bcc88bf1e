"""Unpacking untrusted zip archives (zipped DICOM series, released bundles) within a size budget."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from ..errors import MedfmError
from ..limits import positive_setting

__all__ = ["ArchiveError", "MAX_UNPACKED_GIB_ENV", "safe_extract_zip"]

#: Environment variable with the most an archive may unpack to, in GiB (all members together).
MAX_UNPACKED_GIB_ENV = "MEDFM_MAX_UNPACKED_GIB"
DEFAULT_MAX_UNPACKED_GIB = 8.0
#: Most an archive may expand (declared bytes over the archive's size): DICOM deflates a few times, a zip bomb
#: a thousand; only checked once the members declare more than :data:`RATIO_CHECKED_ABOVE` bytes.
MAX_EXPANSION = 100
RATIO_CHECKED_ABOVE = 64 * 2**20
_CHUNK = 1 << 20


class ArchiveError(MedfmError):
    """An archive that cannot be unpacked safely, explained in one line naming it."""


def max_unpacked_bytes() -> int:
    """The unpacking budget from ``$MEDFM_MAX_UNPACKED_GIB`` (default 8 GiB)."""
    return int(positive_setting(MAX_UNPACKED_GIB_ENV, DEFAULT_MAX_UNPACKED_GIB, "GiB") * 2**30)


def safe_extract_zip(archive: str | os.PathLike, target: str | os.PathLike, max_bytes: int | None = None) -> Path:
    """Extract ``archive`` into ``target`` and return ``target``.

    Refused before anything is written: members that would land outside ``target``, symbolic
    links, two members of one name (which one a reader sees would depend on the tool), archives
    whose members declare more than ``max_bytes`` together (default ``$MEDFM_MAX_UNPACKED_GIB``) or
    more than :data:`MAX_EXPANSION` times the archive's size (a zip bomb within the budget). Members
    are then copied in chunks and stopped as soon as one yields more bytes than it declared, so a
    forged header cannot fill the disk either.
    """
    budget = max_unpacked_bytes() if max_bytes is None else max_bytes
    target = Path(target).resolve()
    try:
        with zipfile.ZipFile(archive) as opened:
            members = opened.infolist()
            declared = 0
            seen: set[Path] = set()
            for member in members:
                destination = (target / member.filename).resolve()
                if destination in seen and not member.is_dir():
                    raise ArchiveError(f"{archive}: refused: archive member {member.filename!r} appears twice; which "
                                       "copy is the real one cannot be told")
                seen.add(destination)
                if destination != target and target not in destination.parents:
                    raise ArchiveError(f"{archive}: refused: archive member {member.filename!r} would be written outside the extraction folder")
                if (member.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ArchiveError(f"{archive}: refused: archive member {member.filename!r} is a symbolic link")
                declared += member.file_size
            if declared > budget:
                raise ArchiveError(f"{archive}: refused: its members unpack to {declared / 2**30:.2f} GiB, over the "
                                   f"{budget / 2**30:.2f} GiB limit (${MAX_UNPACKED_GIB_ENV})")
            packed = max(os.path.getsize(archive), 1)
            if declared > RATIO_CHECKED_ABOVE and declared > MAX_EXPANSION * packed:
                raise ArchiveError(f"{archive}: refused: {packed / 2**20:.1f} MiB would expand to {declared / 2**30:.2f} "
                                   f"GiB ({declared / packed:.0f} times; scans compress at most a few tens of times): "
                                   "a zip bomb")
            for member in members:
                _extract_member(opened, member, target, archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as error:
        raise ArchiveError(f"{archive}: not a readable zip archive ({error})") from None
    return target


def _extract_member(opened: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, archive) -> None:
    destination = target / member.filename
    if member.is_dir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with opened.open(member) as source, open(destination, "wb") as out:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > member.file_size:
                raise ArchiveError(f"{archive}: refused: archive member {member.filename!r} holds more than the "
                                   f"{member.file_size} bytes its header declares")
            out.write(chunk)
