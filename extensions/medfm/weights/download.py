"""HTTP(S) downloads with a progress bar, resume, sha256 verification and no half files left in place."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import WeightsError

__all__ = ["download"]

CHUNK = 1 << 20


def download(url: str, destination: str | os.PathLike, sha256: str | None = None, size: int | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` and return its path.

    Bytes go to ``destination + '.part'`` first; an interrupted download resumes from there when
    the server honours HTTP ranges. Only a file whose size and sha256 (or published sha256 prefix)
    match is renamed into place; a mismatching one is deleted and reported.
    """
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
            total = done + int(length) if length else size
            with open(partial, "ab" if done else "wb") as out, tqdm(
                total=total, initial=done, unit="B", unit_scale=True, desc=destination.name, disable=not progress
            ) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
    actual = digest.hexdigest()
    if size is not None and done != size:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{url}: size mismatch: expected {size} bytes, got {done}; the download was discarded")
    if sha256 is not None and not actual.startswith(sha256.lower()):
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{url}: sha256 mismatch: expected {sha256}, got {actual}; the download was discarded")
    os.replace(partial, destination)
    return destination
