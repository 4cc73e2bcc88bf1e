"""DICOMweb in and out against a real Orthanc: series and study URLs read exactly as local series,
DICOM-SEG stored back referring to its source, and one-line errors for what a PACS can answer."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

import medfm
from medfm.io.dicomweb import (DICOMWEB_PASSWORD_ENV, DICOMWEB_TOKEN_ENV, DICOMWEB_USER_ENV, DicomWebError,
                               DicomWebLocation, _session, image_series)
from medfm.io.tables import read_table
from tests.conftest import cli_in_process, crop_nifti, require
from tests.orthanc import Orthanc, free_port, missing

pytestmark = pytest.mark.slow

BUNDLE = "models_genesis_chest_ct"


class Study:
    """Two CT series of one study and a DICOM-SEG of the first, local and in the PACS."""

    def __init__(self, pacs: Orthanc, folder: Path) -> None:
        self.pacs = pacs
        self.series = {}  # series UID -> local folder
        for index, offset in enumerate([(4, 20, 18), (10, 30, 24)]):
            scan = crop_nifti(medfm.samples.path("ct_head"), folder / f"ct_{index}.nii.gz", (64, 48, 40), offset)
            files = medfm.samples.write_dicom_series(str(scan), folder / f"series_{index}", modality="CT")
            if index == 0:
                self.study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            for file in files:  # one study, as a scanner's session would hold them
                dataset = pydicom.dcmread(file)
                dataset.StudyInstanceUID = self.study_uid
                dataset.save_as(file)
            self.series[str(pydicom.dcmread(files[0]).SeriesInstanceUID)] = folder / f"series_{index}"
        self.first_uid, self.second_uid = list(self.series)
        first = medfm.io.LoadScan()(str(self.series[self.first_uid]))
        label = (first > 25).to(first.dtype)
        [_, seg_file] = medfm.io.SaveSegmentation(folder / "seg", {"1": "tissue"})(label, first.meta)
        self.seg_uid = str(pydicom.dcmread(seg_file).SeriesInstanceUID)
        pacs.upload(*self.series.values(), seg_file)

    @property
    def url(self) -> str:
        return f"{self.pacs.dicomweb}/studies/{self.study_uid}"

    def series_url(self, uid: str) -> str:
        return f"{self.url}/series/{uid}"


@pytest.fixture(scope="module")
def study(pacs, tmp_path_factory) -> Study:
    return Study(pacs, tmp_path_factory.mktemp("study"))


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """The temporary folder of this test: what medfm leaves in it is checked."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("medfm-dicomweb-"))


def _restored(out: Path) -> nib.Nifti1Image:
    [path] = out.glob("*_restored.nii.gz")
    return nib.load(path)


def test_infer_of_a_series_url_equals_the_local_read_and_reports_it(study, tmp_path, scratch, capfd):
    local = cli_in_process(["infer", BUNDLE, str(study.series[study.first_uid]), "--out", str(tmp_path / "local")], capfd)
    assert local.returncode == 0, local.stderr
    url = study.series_url(study.first_uid)
    report = tmp_path / "run.json"
    remote = cli_in_process(["infer", BUNDLE, url, "--out", str(tmp_path / "remote"), "--report", str(report)], capfd)
    assert remote.returncode == 0, remote.stderr
    here, there = _restored(tmp_path / "local"), _restored(tmp_path / "remote")
    assert here.shape == there.shape == (64, 48, 40)
    np.testing.assert_allclose(there.affine, here.affine, atol=1e-6)
    np.testing.assert_allclose(np.asarray(there.dataobj), np.asarray(here.dataobj), atol=1e-5)
    [row] = medfm.io.read_index_rows(tmp_path / "remote" / "embeddings.csv")
    assert row["input"] == url and row["series_uid"] == study.first_uid
    facts = json.loads(report.read_text())
    assert facts["status"] == "ok" and facts["inputs"][0] == {"input": url, "series_uid": study.first_uid, "region": "",
                                                              "embedding": row["embedding"]}
    assert _leftovers(scratch) == [], "the downloaded series is removed"


def test_embed_of_a_study_url_embeds_each_image_series_as_the_local_folders(study, tmp_path, scratch, capfd):
    local = medfm.embed(BUNDLE, [str(folder) for folder in study.series.values()], out=tmp_path / "local", progress=False)
    remote = cli_in_process(["embed", BUNDLE, study.url, "--out", str(tmp_path / "remote"), "--progress", "False"], capfd)
    assert remote.returncode == 0, remote.stderr
    rows = medfm.io.read_index_rows(tmp_path / "remote" / "embeddings.csv")
    # the segmentation series is not an image series: it is left out, not an error
    assert sorted(row["series_uid"] for row in rows) == sorted(study.series)
    assert sorted(row["input"] for row in rows) == sorted(study.series_url(uid) for uid in study.series)
    by_series = {row["series_uid"]: np.load(tmp_path / "local" / row["embedding"]) for row in local.rows}
    for row in rows:
        np.testing.assert_allclose(np.load(tmp_path / "remote" / row["embedding"]), by_series[row["series_uid"]], atol=1e-6)
    again = cli_in_process(["embed", BUNDLE, study.url, "--out", str(tmp_path / "remote"), "--progress", "False"], capfd)
    assert again.returncode == 0 and "0 embedded, 2 already in" in again.stdout, "a rerun finds the series by URL"
    assert _leftovers(scratch) == []


def test_a_segmentation_is_stored_back_and_refers_to_its_source_instances(study, tmp_path, capfd):
    bundle = tmp_path / "genesis_seg"
    torch.manual_seed(0)  # the new head's weights: a prediction with foreground, for the overlay below
    made = cli_in_process(["label-bundle", BUNDLE, "--labels", "tissue", "--out", str(bundle)], capfd)
    assert made.returncode == 0, made.stderr
    url = study.series_url(study.first_uid)
    report = tmp_path / "run.json"
    result = cli_in_process(["infer", str(bundle), url, "--out", str(tmp_path / "out"), "--store", study.pacs.dicomweb,
                             "--report", str(report), "--preview"], capfd)
    assert result.returncode == 0, result.stderr
    assert f"stored 1 DICOM file(s) at {study.pacs.dicomweb}" in result.stderr
    [written] = (tmp_path / "out").glob("*_seg.dcm")
    local_seg = pydicom.dcmread(written)
    stored = json.loads(report.read_text())["stored"]
    assert stored == {"server": study.pacs.dicomweb, "sop_instance_uids": [str(local_seg.SOPInstanceUID)]}

    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(study.pacs.dicomweb)
    segs = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study.study_uid, search_filters={"Modality": "SEG"})]
    assert str(local_seg.SeriesInstanceUID) in {str(s.SeriesInstanceUID) for s in segs}
    [back] = client.retrieve_series(study.study_uid, str(local_seg.SeriesInstanceUID))
    assert back.SOPInstanceUID == local_seg.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, local_seg.pixel_array)
    [referenced] = back.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == study.first_uid
    source_instances = {str(pydicom.dcmread(p).SOPInstanceUID) for p in study.series[study.first_uid].iterdir()}
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence} == source_instances
    label = nib.load(next((tmp_path / "out").glob("*_seg.nii.gz")))
    np.testing.assert_allclose(label.affine, _restored_affine(study), atol=1e-4)
    # the picture to check it: the series' planes with the segmentation overlaid (tinted, not gray)
    [preview] = (tmp_path / "out").glob("*_preview.png")
    picture = np.asarray(Image.open(preview).convert("RGB")).astype(int)
    assert np.asarray(label.dataobj).any() and (np.abs(picture[..., 0] - picture[..., 1]) > 30).sum() > 100


def _restored_affine(study: Study) -> np.ndarray:
    return medfm.io.LoadScan()(str(study.series[study.first_uid])).affine.numpy()


def test_what_a_pacs_can_answer_is_one_line_and_leaves_nothing(study, tmp_path, scratch, capfd):
    down = f"http://127.0.0.1:{free_port()}/dicom-web/studies/{study.study_uid}"
    cases = {
        f"{study.pacs.dicomweb}/studies/1.2.3.4": "1.2.3.4: no such study on the DICOMweb server",
        study.series_url("1.2.3.4"): "/series/1.2.3.4: no such series on the DICOMweb server",
        study.series_url(study.seg_uid): f"series {study.seg_uid} holds Segmentation Storage instances, not images",
        study.url: "2 image series, choose one with series_uid or give its series URL: ",
        down: "cannot reach the DICOMweb server (Connection refused)",
        f"{study.pacs.dicomweb}/studies/1.2.x": "'1.2.x' is not a DICOM UID",
        f"{study.pacs.dicomweb}/series/1.2.3": "not a DICOMweb study or series URL",
    }
    for url, expected in cases.items():
        result = cli_in_process(["infer", BUNDLE, url, "--out", str(tmp_path / "out")], capfd)
        assert result.returncode == 1 and expected in result.stderr, (url, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "out").exists()
        if url == study.url:  # the series listed, in the server's order, with what they are
            assert all(f"{uid} (CT 'medfm sample" in result.stderr for uid in (study.first_uid, study.second_uid))
    refused = cli_in_process(["infer", BUNDLE, study.series_url(study.first_uid), "--out", str(tmp_path / "out"),
                              "--store", "ftp://pacs"], capfd)
    assert refused.returncode == 1 and "ftp://pacs: not a DICOMweb URL" in refused.stderr, refused.stderr
    assert _leftovers(scratch) == []


def test_credentials_come_from_the_environment_and_a_refusal_says_so(study, tmp_path, monkeypatch, capfd):
    require(missing())
    with Orthanc(tmp_path / "locked", users={"reader": "s3cret"}) as locked:
        locked.upload(study.series[study.first_uid])
        url = f"{locked.dicomweb}/studies/{study.study_uid}/series/{study.first_uid}"
        for env in ({}, {DICOMWEB_USER_ENV: "reader", DICOMWEB_PASSWORD_ENV: "wrong"}, {DICOMWEB_TOKEN_ENV: "abc"}):
            with monkeypatch.context() as inside:
                for name, value in env.items():
                    inside.setenv(name, value)
                with pytest.raises(DicomWebError, match=r"refused access \(HTTP 401 Unauthorized\); set MEDFM_DICOMWEB_TOKEN"):
                    image_series(url)
        monkeypatch.setenv(DICOMWEB_USER_ENV, "reader")
        monkeypatch.setenv(DICOMWEB_PASSWORD_ENV, "s3cret")
        [series] = image_series(url)
        assert series.instances == 40 and series.voxels == 64 * 48 * 40
        image = medfm.io.LoadScan()(url)
        assert tuple(image.shape) == (64, 48, 40) and image.meta["SeriesInstanceUID"] == study.first_uid

        # credentials in the URL are used, and reach no output, report or message
        for name in (DICOMWEB_USER_ENV, DICOMWEB_PASSWORD_ENV):
            monkeypatch.delenv(name)
        with_credentials = url.replace("http://", "http://reader:s3cret@")
        out, report = tmp_path / "out", tmp_path / "report.json"
        result = cli_in_process(["embed", BUNDLE, with_credentials, "--out", str(out), "--report", str(report)], capfd)
        assert result.returncode == 0, result.stderr
        assert read_table(out / "embeddings.csv")[0]["input"] == url
        written = [path.read_bytes() for path in (*out.rglob("*"), report) if path.is_file()]
        assert not any(b"s3cret" in data for data in written) and "s3cret" not in result.stdout + result.stderr
        other = url.replace("http://", "http://reader:other@")
        refused = cli_in_process(["embed", BUNDLE, with_credentials, other, "--out", str(tmp_path / "refused")], capfd)
        assert refused.returncode == 1 and "a run sends one set of credentials" in refused.stderr
        assert "s3cret" not in refused.stderr and "other@" not in refused.stderr


def test_qido_answers_are_followed_page_by_page_and_a_partial_wado_answer_is_refused(study, tmp_path, scratch, monkeypatch):
    require(missing())
    import medfm.io.dicomweb as dicomweb

    with Orthanc(tmp_path / "paged") as pacs:
        ids = pacs.upload(study.series[study.first_uid])
        url = f"{pacs.dicomweb}/studies/{study.study_uid}/series/{study.first_uid}"
        first_page = dicomweb._client(pacs.dicomweb).search_for_instances(study.study_uid, study.first_uid, limit=7)
        assert len(first_page) == 7  # the server pages as asked
        monkeypatch.setattr(dicomweb, "QIDO_PAGE", 7)  # so 40 instances come in 6 pages
        [series] = image_series(url)
        assert series.instances == 40 and series.voxels == 64 * 48 * 40
        np.testing.assert_array_equal(medfm.io.LoadScan()(url).numpy(),
                                      medfm.io.LoadScan()(str(study.series[study.first_uid])).numpy())
        status, _ = pacs.request("DELETE", f"/instances/{ids[5]}")  # gone between the listing and the retrieval
        assert status == 200
        with pytest.raises(DicomWebError, match=r"the server sent 39 of the 40 instances it listed; a scan is not built"):
            with dicomweb.downloaded([series]):
                pass
    assert _leftovers(scratch) == []


def test_the_session_carries_the_environment_credentials_and_refuses_a_mix(monkeypatch):
    for name in (DICOMWEB_TOKEN_ENV, DICOMWEB_USER_ENV, DICOMWEB_PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    assert "Authorization" not in _session().headers and _session().auth is None
    monkeypatch.setenv(DICOMWEB_TOKEN_ENV, "t0ken")
    assert _session().headers["Authorization"] == "Bearer t0ken"
    monkeypatch.setenv(DICOMWEB_USER_ENV, "reader")
    with pytest.raises(DicomWebError, match="not both"):
        _session()
    monkeypatch.delenv(DICOMWEB_TOKEN_ENV)
    with pytest.raises(DicomWebError, match="go together"):
        _session()
    monkeypatch.setenv(DICOMWEB_PASSWORD_ENV, "pw")
    assert _session().auth == ("reader", "pw")


def test_urls_name_a_study_or_a_series_and_nothing_else():
    series = DicomWebLocation.parse("https://pacs.example:8443/orthanc/dicom-web/studies/1.2.3/series/4.5.6/")
    assert series == DicomWebLocation("https://pacs.example:8443/orthanc/dicom-web", "1.2.3", "4.5.6")
    assert series.url == "https://pacs.example:8443/orthanc/dicom-web/studies/1.2.3/series/4.5.6"
    assert DicomWebLocation.parse("http://h/studies/1.2").series_uid is None
    for bad in ("http://h/studies/1.2/series/3/instances/4", "http://h/studies/1.2?x=1", "file:///studies/1.2",
                "http://h/studies/01.2", "http://h/studies/" + "1." * 40 + "1"):
        with pytest.raises(DicomWebError):
            DicomWebLocation.parse(bad)
    assert medfm.io.dicomweb.absolute_input("http://h/studies/1.2") == "http://h/studies/1.2"
    assert medfm.io.dicomweb.absolute_input("a/../b.nii.gz") == os.path.abspath("b.nii.gz")
