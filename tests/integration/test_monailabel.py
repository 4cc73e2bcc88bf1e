"""A real MONAI Label 0.8.5 server on 127.0.0.1 serving a label bundle made by ``medfm label-bundle``.

The server runs in its own environment (``make monailabel-env``: MONAI Label's pins clash with
medfm's), with the sample ``monaibundle`` app, a studies folder of real CT crops, and the bundle
made from Models Genesis. The test goes through what an annotator's viewer does over HTTP:
/info, /infer, saving labels, /train, then many /infer requests at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

import medfm
from tests.conftest import crop_nifti, run_command
from tests.orthanc import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MONAILABEL_PYTHON = ROOT / ".venv-monailabel" / "bin" / "python"
STAND_IN = Path(__file__).parent / "torchvision_stand_in"
MODEL = "genesis_seg"
#: served beside it: a bundle that resamples (Spacingd's MONAI Label failure) and adapts to spacing
RESAMPLING_MODEL = "spad_seg"
#: (size, offset) of the real head-CT crops that make the studies folder
CROPS = [((48, 48, 32), (0, 0, 0)), ((48, 40, 32), (20, 30, 20)), ((40, 48, 32), (30, 10, 40))]


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(path.read_bytes() + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, query: dict | None = None, fields: dict | None = None,
                files: dict | None = None, body: dict | None = None, timeout: int = 600) -> tuple[int, bytes]:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data, headers = None, {}
        if fields is not None or files is not None:
            data, headers["Content-Type"] = _multipart(fields or {}, files or {})
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def infer(self, image_id: str, model: str = MODEL) -> tuple[int, bytes]:
        return self.request("POST", f"/infer/{model}", {"image": image_id, "output": "image"},
                            fields={"params": json.dumps({"device": "cpu"})})


def _stop(process: subprocess.Popen) -> None:
    """Stop the server by its PID (its process group: MONAI Label may start helpers)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def monailabel_python() -> Path:
    if not MONAILABEL_PYTHON.is_file():
        message = f"MONAI Label environment {MONAILABEL_PYTHON.parent.parent} is missing: run `make monailabel-env`"
        if os.environ.get("MEDFM_REQUIRE_TEST_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return MONAILABEL_PYTHON


@pytest.fixture(scope="module")
def app(monailabel_python, tmp_path_factory) -> Path:
    """MONAI Label's sample ``monaibundle`` app holding the two label bundles made by ``medfm label-bundle``."""
    work = tmp_path_factory.mktemp("monailabel")
    app = work / "apps" / "monaibundle"
    result = run_command([str(monailabel_python), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle",
                          "--output", str(work / "apps")], env={"PYTHONPATH": str(STAND_IN)})
    assert result.returncode == 0 and (app / "main.py").is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    made = run_command([sys.executable, "-m", "medfm.cli", "label-bundle", "models_genesis_chest_ct", "--labels",
                        "tissue", "--out", str(app / "model" / MODEL)])
    assert made.returncode == 0, made.stderr
    # random weights: this model is here for its transforms and geometry, not its predictions
    made = run_command([sys.executable, "-m", "medfm.cli", "label-bundle", "spad_vit_base", "--labels", "tissue",
                        "--out", str(app / "model" / RESAMPLING_MODEL), "--pretrained", "False"])
    assert made.returncode == 0, made.stderr
    return app


@contextlib.contextmanager
def _server(monailabel_python: Path, app: Path, studies: str, work: Path, models: str):
    """(client, server log) of a MONAI Label server on a free loopback port; stopped by its PID afterwards."""
    port = free_port()
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [str(monailabel_python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", studies,
             "--host", "127.0.0.1", "--port", str(port), "--conf", "models", models, "--conf", "zoo_source", "github",
             "--conf", "sam2", "false", "--conf", "preload", "false"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True,
            # its DICOMweb datastore converts labels to DICOM-SEG with dcmqi's itkimage2segimage, from its environment
            env=dict(os.environ, PYTHONPATH=str(STAND_IN), MONAI_LABEL_DATASTORE_AUTO_RELOAD="false",
                     MONAI_LABEL_DATASTORE_CACHE_PATH=str(work / "cache"),
                     PATH=f"{monailabel_python.parent}{os.pathsep}{os.environ.get('PATH', '')}"))
    client = Client(port)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, "server exited:\n" + log_path.read_text()[-4000:]
            try:
                if client.request("GET", "/info/", timeout=10)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not answer /info/ in 300 s:\n" + log_path.read_text()[-4000:]
            time.sleep(2)
        yield client, log_path
    finally:
        _stop(process)
        assert process.poll() is not None


@pytest.fixture(scope="module")
def served(monailabel_python, app, tmp_path_factory):
    """(client, app folder, studies folder, server log) of a server on a studies folder of real CT crops."""
    work = tmp_path_factory.mktemp("monailabel_local")
    studies = work / "studies"
    studies.mkdir()
    for index, (size, offset) in enumerate(CROPS):
        crop_nifti(medfm.samples.path("ct_head"), studies / f"head_ct_{index}.nii.gz", size, offset)
    with _server(monailabel_python, app, str(studies), work, f"{MODEL},{RESAMPLING_MODEL}") as (client, log_path):
        yield client, app, studies, log_path


def _label_volume(response: bytes, path: Path) -> nib.Nifti1Image:
    path.write_bytes(response)
    assert response[:2] == b"\x1f\x8b", f"expected a .nii.gz label file, got {response[:200]!r}"
    return nib.load(path)


def test_monailabel_serves_trains_and_answers_concurrent_requests(served, tmp_path):
    client, app, studies, log_path = served
    log = lambda: log_path.read_text()[-6000:]  # noqa: E731

    status, body = client.request("GET", "/info/")
    info = json.loads(body)
    assert status == 200 and MODEL in info["models"], info.get("models")
    assert info["models"][MODEL]["labels"] == {"tissue": 1} and info["models"][RESAMPLING_MODEL]["labels"] == {"tissue": 1}
    assert MODEL in info["trainers"]

    status, body = client.request("GET", "/datastore/", {"output": "all"})
    images = sorted(json.loads(body)["objects"])
    assert images == [f"head_ct_{index}" for index in range(len(CROPS))]

    # one scan: the label comes back on the scan's own grid, also after resampling to 0.75x0.75x3 mm
    source = nib.load(studies / "head_ct_1.nii.gz")
    for model in (MODEL, RESAMPLING_MODEL):
        status, body = client.infer(images[1], model)
        assert status == 200, body[:2000].decode(errors="replace") + log()
        label = _label_volume(body, tmp_path / f"predicted_{model}.nii.gz")
        assert label.shape == source.shape
        np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}

    # annotators save labels (tissue above 25 HU of the real CT), then press Train
    for image_id in images:
        scan = nib.load(studies / f"{image_id}.nii.gz")
        mask = tmp_path / f"{image_id}_label.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(scan.dataobj) > 25).astype(np.uint8), scan.affine), mask)
        status, body = client.request("PUT", "/datastore/label", {"image": image_id, "tag": "final"}, files={"label": mask})
        assert status == 200, body[:2000]
    assert len(list((studies / "labels" / "final").glob("*.nii.gz"))) == len(CROPS)

    model_file = app / "model" / MODEL / "models" / "model.pt"
    before = hashlib.sha256(model_file.read_bytes()).hexdigest()
    status, body = client.request("POST", f"/train/{MODEL}", {"run_sync": "true"},
                                  body={"max_epochs": 1, "device": "cpu", "val_split": 0.2, "multi_gpu": False})
    assert status == 200, body[:2000].decode(errors="replace") + log()
    after = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert after != before, "training wrote no new checkpoint:\n" + log()
    assert "Epoch[1] Complete" in log_path.read_text()

    # the viewer of every annotator at once: the new model answers all of them
    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(client.infer, [images[index % len(images)] for index in range(10)]))
    assert [status for status, _ in answers] == [200] * 10, log()
    for index, (_, body) in enumerate(answers):
        label = _label_volume(body, tmp_path / f"concurrent_{index}.nii.gz")
        assert label.shape == nib.load(studies / f"{images[index % len(images)]}.nii.gz").shape


def test_monailabel_on_dicomweb_infers_a_series_in_orthanc_and_stores_the_label_as_dicom_seg(monailabel_python, app, pacs,
                                                                                               tmp_path):
    """MONAI Label's DICOMweb datastore on the same Orthanc the medfm CLI reads: what OHIF does against a PACS."""
    from dicomweb_client import DICOMwebClient

    scan = crop_nifti(medfm.samples.path("ct_head"), tmp_path / "ct.nii.gz", *CROPS[0])
    files = medfm.samples.write_dicom_series(str(scan), tmp_path / "series", modality="CT")
    first = pydicom.dcmread(files[0])
    study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    pacs.upload(tmp_path / "series")
    local = medfm.io.LoadScan()(str(tmp_path / "series"))
    with _server(monailabel_python, app, pacs.dicomweb, tmp_path, MODEL) as (client, log_path):
        log = lambda: log_path.read_text()[-6000:]  # noqa: E731
        status, body = client.request("GET", "/datastore/")  # counted from the PACS (QIDO-RS)
        assert status == 200 and json.loads(body)["total"] == 1, body[:2000]
        status, body = client.request("POST", "/activelearning/random", body={})  # a viewer's "next sample"
        assert status == 200 and json.loads(body)["id"] == series_uid, body[:2000]
        status, body = client.infer(series_uid)
        assert status == 200, body[:2000].decode(errors="replace") + log()
        label = _label_volume(body, tmp_path / "predicted.nii.gz")
        assert label.shape == tuple(local.shape)
        np.testing.assert_allclose(label.affine, local.affine.numpy(), atol=1e-3)
        # the annotator's final label (tissue above 25 HU) goes back to the PACS as DICOM-SEG
        mask = tmp_path / "final.nii.gz"
        nib.save(nib.Nifti1Image((local.numpy() > 25).astype(np.uint8), label.affine), mask)
        status, body = client.request("PUT", "/datastore/label", {"image": series_uid, "tag": "final"}, files={"label": mask})
        assert status == 200, body[:2000].decode(errors="replace") + log()
    dicomweb = DICOMwebClient(pacs.dicomweb)
    [seg] = [pydicom.Dataset.from_json(s) for s in dicomweb.search_for_series(study_uid, search_filters={"Modality": "SEG"})]
    [stored] = dicomweb.retrieve_series(study_uid, str(seg.SeriesInstanceUID))
    assert stored.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    [referenced] = stored.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series_uid
    sources = {str(pydicom.dcmread(path).SOPInstanceUID) for path in files}
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence} <= sources
    assert len(stored.SegmentSequence) == 1 and stored.pixel_array.any()
