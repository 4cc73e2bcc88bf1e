"""``--report FILE.json`` of medfm infer and embed: the facts of a run, for failed runs too."""

import json

import pydicom
import pytest

import medfm
from medfm.weights import sha256_of
from tests.conftest import GENESIS, cli_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dicom_ct(small_ct, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "ct"
    medfm.samples.write_dicom_series(str(small_ct), folder, modality="CT")
    return folder


def _report(path):
    return json.loads(path.read_text())


def test_infer_reports_software_bundle_weights_inputs_warnings_stages_and_outputs(dicom_ct, tmp_path, capfd):
    report = tmp_path / "run.json"
    result = cli_in_process(["infer", "models_genesis_chest_ct", str(dicom_ct), "--out", str(tmp_path / "out"),
                             "--report", str(report)], capfd)
    assert result.returncode == 0, result.stderr
    facts = _report(report)
    assert facts["status"] == "ok" and facts["error"] is None and facts["command"] == "infer"
    assert facts["arguments"][:2] == ["infer", "models_genesis_chest_ct"] and "--report" in facts["arguments"]
    assert set(facts["software"]) >= {"medfm", "monai", "torch", "python"} and facts["software"]["medfm"] == medfm.__version__
    assert facts["bundle"]["name"] == "models_genesis_chest_ct" and facts["bundle"]["version"]
    assert facts["weights"] == {"id": "medfm_genesis_demo", "file": str(GENESIS / "models" / "model.pt"),
                                "sha256": sha256_of(GENESIS / "models" / "model.pt")}
    assert facts["device"] == "cpu"
    [source] = facts["inputs"]
    assert source["input"] == str(dicom_ct) and source["series_uid"] == pydicom.dcmread(next(dicom_ct.iterdir())).SeriesInstanceUID
    assert any("demo weights" in warning for warning in facts["warnings"])
    assert {"configure", "run", "total"} <= set(facts["seconds"]) and facts["seconds"]["run"] > 0
    assert facts["outputs"] == [str(path) for path in sorted((tmp_path / "out").iterdir())]


def test_a_failed_run_writes_its_report_with_the_error(tmp_path, capfd):
    report = tmp_path / "run.json"
    result = cli_in_process(["infer", "models_genesis_chest_ct", str(tmp_path / "nope.nii.gz"), "--out",
                             str(tmp_path / "out"), "--report", str(report)], capfd)
    assert result.returncode == 1
    facts = _report(report)
    assert facts["status"] == "failed" and facts["error"] == f"{tmp_path / 'nope.nii.gz'}: no such file or folder"
    assert facts["inputs"] == [{"input": str(tmp_path / "nope.nii.gz"), "series_uid": "", "region": ""}]
    assert facts["outputs"] == [] and not (tmp_path / "out").exists()


def test_embed_reports_each_input_and_the_ones_that_failed(small_ct, tmp_path, capfd):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    report = tmp_path / "run.json"
    result = cli_in_process(["embed", "models_genesis_chest_ct", str(small_ct), str(broken), "--out",
                             str(tmp_path / "emb"), "--progress", "False", "--report", str(report)], capfd)
    assert result.returncode == 1
    facts = _report(report)
    assert facts["status"] == "failed" and facts["error"].startswith("1 of 2 inputs failed")
    by_input = {entry["input"]: entry for entry in facts["inputs"]}
    assert by_input[str(small_ct)]["embedding"].endswith("_embedding.npy") and "error" not in by_input[str(small_ct)]
    assert by_input[str(broken)]["error"]
    assert str(tmp_path / "emb" / by_input[str(small_ct)]["embedding"]) in facts["outputs"]
    # a warning logged while a DataLoader worker read the scan reaches the report, and is printed once
    spacing = f"{small_ct}: voxel spacing 2 x 2 x 2 mm is outside the pre-training range"
    assert any(warning.startswith(spacing) for warning in facts["warnings"]), facts["warnings"]
    assert result.stderr.count(spacing) == 1, result.stderr


def test_a_report_path_in_a_missing_folder_is_refused_before_any_work(small_ct, tmp_path, capfd):
    result = cli_in_process(["infer", "models_genesis_chest_ct", str(small_ct), "--out", str(tmp_path / "out"),
                             "--report", str(tmp_path / "no" / "run.json")], capfd)
    assert result.returncode == 1 and "--report must be a file in an existing, writable folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_report_never_replaces_an_input_an_output_or_a_file_medfm_did_not_write(small_ct, dicom_ct, tmp_path, capfd):
    out = tmp_path / "out"
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    before = {path: sha256_of(path) for path in (small_ct, notes)}
    cases = [(["embed", str(GENESIS), str(small_ct)], small_ct, "is the input"),
             (["embed", str(GENESIS), str(dicom_ct)], dicom_ct / "report.json", "is the input"),
             (["embed", str(GENESIS), str(small_ct)], out / "embeddings.csv", "is inside --out"),
             (["infer", str(GENESIS), str(small_ct)], notes, "exists and is not a medfm run report")]
    for argv, report, message in cases:
        result = cli_in_process(argv + ["--out", str(out), "--report", str(report)], capfd)
        assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not out.exists() and not (dicom_ct / "report.json").exists()
    assert {path: sha256_of(path) for path in before} == before
