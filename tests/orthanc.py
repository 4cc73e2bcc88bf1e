"""A real Orthanc PACS (Debian's ``orthanc`` and ``orthanc-dicomweb``) for the DICOMweb tests.

Each server gets a free port on loopback, a temporary storage folder, its DICOM (DIMSE) port off
and remote access refused (Orthanc 1.10 has no bind-address setting: it listens on every
interface and answers loopback only). It is stopped by its PID. Series go in through Orthanc's
REST API (``POST /instances``), as a hospital's import tool would put them there.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_FOLDERS = ["/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins"]
START_TIMEOUT_S = 60


def dicomweb_plugin() -> str | None:
    found = [path for folder in PLUGIN_FOLDERS for path in glob.glob(f"{folder}/libOrthancDicomWeb.so*")]
    return found[0] if found else None


def missing() -> str | None:
    """Why no Orthanc can be started here (None when one can)."""
    if not os.access(ORTHANC, os.X_OK):
        return "Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; `make orthanc` does it as root)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """One Orthanc server: ``with Orthanc(folder) as pacs: pacs.upload(series_folder)``; ``pacs.dicomweb``
    is its DICOMweb root. ``users`` (name: password) turns on HTTP basic authentication."""

    def __init__(self, folder: Path, users: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.users = users or {}
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def __enter__(self) -> Orthanc:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medfm-tests", "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "StorageDirectory": str(storage), "IndexDirectory": str(storage), "Plugins": [dicomweb_plugin()],
            "AuthenticationEnabled": bool(self.users), "RegisteredUsers": self.users,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "HttpTimeout": 60,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.log = self.folder / "orthanc.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if self.request("GET", "/system")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server by its PID (and wait, so its port and storage are free afterwards)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def request(self, method: str, path: str, data: bytes | None = None, content_type: str = "application/dicom",
                accept: str = "application/json") -> tuple[int, bytes]:
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.users:
            user, password = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def upload(self, *files: Path) -> list[str]:
        """Store DICOM files through the REST API; returns their Orthanc instance ids."""
        ids = []
        for path in files:
            paths = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
            for file in paths:
                status, body = self.request("POST", "/instances", file.read_bytes())
                assert status == 200, f"Orthanc refused {file}: {status} {body[:300]!r}"
                ids.append(json.loads(body)["ID"])
        return ids

    def series_url(self, study_uid: str, series_uid: str) -> str:
        return f"{self.dicomweb}/studies/{study_uid}/series/{series_uid}"
