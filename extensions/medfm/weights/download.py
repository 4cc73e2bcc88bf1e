"""HTTP(S) downloads with a progress bar, resume, sha256 verification and no half files left in place."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import WeightsError
from ..limits import positive_setting

__all__ = ["download", "DOWNLOAD_DEADLINE_ENV", "DOWNLOAD_STALL_ENV"]

CHUNK = 1 << 16
#: Environment variable with the most seconds one download may take as a whole.
DOWNLOAD_DEADLINE_ENV = "MEDFM_DOWNLOAD_DEADLINE_S"
DEFAULT_DOWNLOAD_DEADLINE_S = 4 * 3600.0
#: Environment variable with the window, in seconds, over which a download must receive :data:`STALL_MIN_BYTES`.
DOWNLOAD_STALL_ENV = "MEDFM_DOWNLOAD_STALL_S"
DEFAULT_DOWNLOAD_STALL_S = 60.0
#: Fewer bytes than this over a whole stall window is a stalled transfer (a server dripping a byte at a time).
STALL_MIN_BYTES = 64 * 1024


def _deadline_seconds() -> float:
    return positive_setting(DOWNLOAD_DEADLINE_ENV, DEFAULT_DOWNLOAD_DEADLINE_S, "seconds")


def _chunks(response, url: str):
    """The body as it arrives (``read1`` returns what one read gave: a dripping server is seen drip by drip)."""
    while True:
        try:
            chunk = response.read1(CHUNK)
        except OSError as error:  # timeouts and resets: the .part file stays for a resumed attempt
            raise WeightsError(f"cannot download {url}: {error or type(error).__name__} (run the command again to resume)") from None
        if not chunk:
            return
        yield chunk


def download(url: str, destination: str | os.PathLike, sha256: str | None = None, size: int | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` and return its path.

    Bytes go to ``destination + '.part'`` first; an interrupted download resumes from there when
    the server honours HTTP ranges. Only a file whose size and sha256 (or published sha256 prefix)
    match is renamed into place; a mismatching one is deleted and reported. ``timeout`` bounds
    each network read; the whole download is bounded by ``$MEDFM_DOWNLOAD_DEADLINE_S`` (default
    4 hours), a transfer that receives fewer than 64 KiB over ``$MEDFM_DOWNLOAD_STALL_S`` (default 60 s)
    is stopped as stalled, so a server that drips bytes cannot hold it for hours, and reading stops as
    soon as more than ``size`` bytes arrive.
    """
    deadline = time.monotonic() + _deadline_seconds()
    stall_window = positive_setting(DOWNLOAD_STALL_ENV, DEFAULT_DOWNLOAD_STALL_S, "seconds")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    done = 0
    if partial.exists():
        with open(partial, "rb") as existing:
            for chunk in iter(lambda: existing.read(CHUNK), b""):
                digest.update(chunk)
                done += len(chunk)
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and done:  # the partial file is already complete
            response = None
        else:
            raise WeightsError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise WeightsError(f"cannot download {url}: {reason} (no network? use a mirror or a local file)") from None
    if response is not None:
        with response:
            if done and response.status != 206:  # server ignored the range: start over
                digest, done = hashlib.sha256(), 0
            length = response.headers.get("Content-Length")
            total = done + int(length) if length and length.isdigit() else size
            with open(partial, "ab" if done else "wb") as out, tqdm(
                total=total, initial=done, unit="B", unit_scale=True, desc=destination.name, disable=not progress
            ) as bar:
                window_start, window_bytes = time.monotonic(), 0
                for chunk in _chunks(response, url):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
                    window_bytes += len(chunk)
                    if time.monotonic() - window_start >= stall_window:
                        if window_bytes < STALL_MIN_BYTES:  # the .part file stays: a later attempt resumes it
                            raise WeightsError(f"cannot download {url}: stalled: {window_bytes} bytes in the last "
                                               f"{time.monotonic() - window_start:.0f} s (${DOWNLOAD_STALL_ENV}="
                                               f"{stall_window:g}); run the command again to resume")
                        window_start, window_bytes = time.monotonic(), 0
                    if size is not None and done > size:
                        break  # reported as a size mismatch below
                    if time.monotonic() > deadline:
                        out.close()
                        partial.unlink(missing_ok=True)
                        raise WeightsError(f"cannot download {url}: not complete within ${DOWNLOAD_DEADLINE_ENV}="
                                           f"{_deadline_seconds():g} s; the download was discarded")
    actual = digest.hexdigest()
    if size is not None and done != size:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{url}: size mismatch: expected {size} bytes, got {'more' if done > size else done}; the download was discarded")
    if sha256 is not None and not actual.startswith(sha256.lower()):
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{url}: sha256 mismatch: expected {sha256}, got {actual}; the download was discarded")
    os.replace(partial, destination)
    return destination
