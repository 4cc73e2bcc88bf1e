import hashlib
import http.server
import socket
import threading
import time

import pytest

from medfm.errors import MedfmError, WeightsError
from medfm.weights import download
from tests.conftest import LoopbackServer


def _payload(http_root, name="weights.bin", size=3_000_001):
    data = bytes((i * 7) % 251 for i in range(size))
    (http_root / name).write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def test_download_verifies_hash_and_leaves_no_part_file(server, http_root, tmp_path):
    data, digest = _payload(http_root)
    target = download(server.url("weights.bin"), tmp_path / "cache" / "w.bin", sha256=digest, size=len(data), progress=False)
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["w.bin"]


def test_hash_prefix_is_accepted(server, http_root, tmp_path):
    data, digest = _payload(http_root)
    assert download(server.url("weights.bin"), tmp_path / "w.bin", sha256=digest[:8], progress=False).is_file()


def test_hash_mismatch_discards_the_download(server, http_root, tmp_path):
    _payload(http_root)
    with pytest.raises(WeightsError, match="sha256 mismatch: expected 0{64}, got [0-9a-f]{64}; the download was discarded"):
        download(server.url("weights.bin"), tmp_path / "w.bin", sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "served"]


def test_size_mismatch_is_reported(server, http_root, tmp_path):
    data, digest = _payload(http_root)
    with pytest.raises(WeightsError, match="size mismatch"):
        download(server.url("weights.bin"), tmp_path / "w.bin", sha256=digest, size=len(data) + 1, progress=False)
    assert not (tmp_path / "w.bin").exists() and not (tmp_path / "w.bin.part").exists()


def test_interrupted_download_resumes_with_a_range_request(server, http_root, tmp_path):
    data, digest = _payload(http_root)
    (tmp_path / "w.bin.part").write_bytes(data[:1_000_000])
    target = download(server.url("weights.bin"), tmp_path / "w.bin", sha256=digest, progress=False)
    assert target.read_bytes() == data
    assert server.requests[-1] == ("/weights.bin", "bytes=1000000-")


def test_server_without_ranges_restarts_from_zero(http_root, tmp_path):
    data, digest = _payload(http_root)
    (tmp_path / "w.bin.part").write_bytes(b"x" * 500)
    with LoopbackServer(http_root, ranges=False) as plain:
        target = download(plain.url("weights.bin"), tmp_path / "w.bin", sha256=digest, progress=False)
    assert target.read_bytes() == data


def test_http_error_and_unreachable_host(server, tmp_path):
    with pytest.raises(WeightsError, match="HTTP 404"):
        download(server.url("absent.bin"), tmp_path / "w.bin", progress=False)
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(WeightsError, match="cannot download http://127.0.0.1:.*no network"):
        download(f"http://127.0.0.1:{port}/w.bin", tmp_path / "w.bin", progress=False)
    assert not (tmp_path / "w.bin").exists()


class _DrippingHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1000 bytes and sends one every 50 ms: each read succeeds, the whole never ends in time."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client gave up, as it should
            pass


@pytest.mark.parametrize("setting, message, left", [
    ("MEDFM_DOWNLOAD_DEADLINE_S", r"not complete within \$MEDFM_DOWNLOAD_DEADLINE_S=1 s; the download was discarded", []),
    ("MEDFM_DOWNLOAD_STALL_S", r"stalled: \d+ bytes in the last 1 s \(\$MEDFM_DOWNLOAD_STALL_S=1\); run the command again "
     "to resume", ["w.bin.part"]),
])
def test_a_dripping_server_is_stopped_by_the_deadline_or_as_stalled(setting, message, left, tmp_path, monkeypatch):
    """Every read succeeds, so only the whole download's deadline, or far sooner too few bytes over the stall
    window, stops it; a stalled download keeps its .part file for a resumed attempt."""
    monkeypatch.setenv(setting, "1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DrippingHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(WeightsError, match=message):
            download(f"http://127.0.0.1:{httpd.server_port}/w.bin", tmp_path / "w.bin", progress=False, timeout=5)
    finally:
        httpd.shutdown()
    assert time.monotonic() - started < 10
    assert [p.name for p in tmp_path.iterdir()] == left


def test_a_bad_deadline_setting_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_DOWNLOAD_DEADLINE_S", "soon")
    with pytest.raises(MedfmError, match=r"\$MEDFM_DOWNLOAD_DEADLINE_S='soon' is not a positive number of seconds"):
        download("http://127.0.0.1:9/w.bin", tmp_path / "w.bin", progress=False)


def test_reading_stops_once_more_than_the_promised_size_arrives(server, http_root, tmp_path):
    data, digest = _payload(http_root)
    with pytest.raises(WeightsError, match="size mismatch: expected 1000 bytes, got more; the download was discarded"):
        download(server.url("weights.bin"), tmp_path / "w.bin", size=1000, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "served"]


def test_the_download_function_is_not_shadowed_by_its_module():
    """``medfm.weights.download`` is the function whatever was imported first (the package imports lazily)."""
    import subprocess
    import sys

    script = ("import medfm.weights.importer, medfm.weights.download; from medfm.weights import download; "
              "import medfm.weights as w; assert callable(download) and callable(w.download), download")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

