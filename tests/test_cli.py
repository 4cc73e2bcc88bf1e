"""The ``medfm`` command line as a user runs it."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medfm
from medfm import cli
from medfm.io import output_stem, read_index_rows
from tests.conftest import GENESIS, cli_in_process, run_command, save_upstream_checkpoint
from tests.io.bad_inputs import CORPUS

MEDFM = [sys.executable, "-m", "medfm.cli"]


def _single_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip() and "nvImageCodec" not in line]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("medfm: error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_infer_by_name_writes_outputs_and_nothing_else(small_ct, tmp_path):
    out = tmp_path / "results"
    result = run_command(MEDFM + ["infer", "models_genesis_chest_ct", str(small_ct), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    stem = output_stem(small_ct)
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}_embedding.npy", f"{stem}_restored.nii.gz", "embeddings.csv"]
    assert stem.startswith("ct_small-") and len(stem) == len("ct_small-") + 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"], "no staging folder left behind"
    assert str(out / f"{stem}_restored.nii.gz") in result.stdout
    # demo weights say so, in the run's output and in the file they made
    assert ("medfm: warning: these outputs were made with medfm_genesis_demo, demo weights" in result.stderr
            and "run 'medfm weights fetch models_genesis_chest_ct'" in result.stderr)
    descrip = nib.load(out / f"{stem}_restored.nii.gz").header["descrip"].tobytes().rstrip(b"\0").decode()
    assert descrip.startswith("DEMO: medfm models_genesis_chest_ct ") and descrip.endswith(", weights medfm_genesis_demo")
    # a second scan into the same folder adds a row to the index instead of replacing it
    renamed = tmp_path / "second.nii.gz"
    renamed.write_bytes(small_ct.read_bytes())
    assert run_command(MEDFM + ["infer", "models_genesis_chest_ct", str(renamed), "--out", str(out)]).returncode == 0
    rows = read_index_rows(out / "embeddings.csv")
    assert [r["embedding"] for r in rows] == [f"{stem}_embedding.npy", f"{output_stem(renamed)}_embedding.npy"]
    assert {r["model"] for r in rows} == {"models_genesis_chest_ct"} and {r["weights"] for r in rows} == {"medfm_genesis_demo"}


def test_missing_input_is_one_line_and_creates_nothing(tmp_path, capfd):
    line = _single_error_line(cli_in_process(["infer", "models_genesis_chest_ct", str(tmp_path / "nope.nii.gz"),
                                          "--out", str(tmp_path / "out")], capfd))
    assert "nope.nii.gz: no such file or folder" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_infer_outputs_of_inputs_sharing_a_base_name_never_collide_and_reruns_replace_their_row(small_ct, tmp_path):
    out = tmp_path / "out"
    scans = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        scans.append(tmp_path / folder / "ct.nii.gz")
        scans[-1].write_bytes(small_ct.read_bytes())
    for scan in scans + scans[:1]:
        result = run_command(MEDFM + ["infer", str(GENESIS), str(scan), "--out", str(out)])
        assert result.returncode == 0, result.stderr[-2000:]
    stems = [output_stem(scan) for scan in scans]
    assert stems[0] != stems[1] and all(stem.startswith("ct-") for stem in stems)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{stem}_{kind}" for stem in stems for kind in ("embedding.npy", "restored.nii.gz")] + ["embeddings.csv"])
    rows = read_index_rows(out / "embeddings.csv")
    assert sorted(row["input"] for row in rows) == sorted(str(scan) for scan in scans)  # the rerun replaced its row


@pytest.mark.parametrize("problem", ["foreign index", "out is a file"])
def test_infer_refuses_an_unusable_out_before_any_work(small_ct, tmp_path, problem, capfd):
    out = tmp_path / "out"
    if problem == "foreign index":
        out.mkdir()
        (out / "embeddings.csv").write_text("subject,age\n1,54\n")
        expected = "embeddings.csv: exists and is not a medfm embeddings index"
    else:
        out.write_text("notes")
        expected = "out: exists and is not a folder; give --out a folder"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    line = _single_error_line(cli_in_process(["infer", str(GENESIS), str(small_ct), "--out", str(out)], capfd))
    assert expected in line, line
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_inputs_give_their_message_in_one_line_and_no_output(case, small_ct, tmp_path, real_file, capfd):
    path, expected = CORPUS[case](small_ct, tmp_path, real_file)
    before, logs = set(tmp_path.iterdir()), set(Path(tempfile.gettempdir()).glob("medfm-*.log"))
    line = _single_error_line(cli_in_process(["infer", str(GENESIS), str(path), "--out", str(tmp_path / "out")], capfd))
    assert re.search(expected, line), line
    assert set(tmp_path.iterdir()) == before, "no output or staging folder left behind"
    assert set(Path(tempfile.gettempdir()).glob("medfm-*.log")) == logs, "no log kept for a problem the line explains"


def test_unknown_bundle_lists_the_known_ones(tmp_path, capfd):
    line = _single_error_line(cli_in_process(["infer", "no_such_bundle", str(tmp_path), "--out", str(tmp_path / "o")], capfd))
    assert "unknown bundle 'no_such_bundle'" in line and "models_genesis_chest_ct" in line


def test_bundle_found_in_the_cache_directory(tmp_path, monkeypatch):
    from medfm.bundles import find_bundle

    cached = tmp_path / "home" / "bundles" / "cached_copy"
    shutil.copytree(GENESIS / "configs", cached / "configs")
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    assert find_bundle("cached_copy") == cached.resolve()


def test_weights_import_and_verify_from_the_command_line(genesis_bundle, tmp_path):
    source = tmp_path / "upstream.pt"
    save_upstream_checkpoint(source)
    result = run_command(MEDFM + ["weights", "import", str(genesis_bundle), str(source)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "missing keys: 0, unexpected keys: 0" in result.stdout
    result = run_command(MEDFM + ["weights", "verify", str(genesis_bundle)])
    assert result.returncode == 0 and "loads strictly" in result.stdout


def test_weights_errors_are_one_line(genesis_bundle, tmp_path, capfd):
    line = _single_error_line(cli_in_process(["weights", "import", str(genesis_bundle), str(tmp_path / "absent.pt")], capfd))
    assert "absent.pt: no such file" in line
    line = _single_error_line(cli_in_process(["weights", "fetch", str(genesis_bundle), "--url",
                                          "http://127.0.0.1:9/Genesis_Chest_CT.pt", "--progress", "false"], capfd))
    assert "cannot download http://127.0.0.1:9/Genesis_Chest_CT.pt" in line
    (genesis_bundle / "models" / "model.pt").unlink()
    line = _single_error_line(cli_in_process(["weights", "verify", str(genesis_bundle)], capfd))
    assert "model.pt: missing; run 'medfm weights fetch" in line


def test_main_returns_status_instead_of_raising(capsys, tmp_path):
    assert cli.main(["infer", "no_such_bundle", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("medfm: error: unknown bundle")


def test_non_strict_import_lists_what_did_not_match(genesis_bundle, tmp_path):
    import torch

    from medfm.weights import load_checkpoint

    partial = tmp_path / "encoder_only.pt"
    state = load_checkpoint(genesis_bundle / "models" / "model.pt")
    torch.save({k: v for k, v in state.items() if k.startswith("down_tr")}, partial)
    strict = run_command(MEDFM + ["weights", "import", str(genesis_bundle), str(partial)])
    assert "keys do not match the bundle network" in _single_error_line(strict)
    result = run_command(MEDFM + ["weights", "import", str(genesis_bundle), str(partial), "--strict", "False"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "missing keys: 44, unexpected keys: 0" in lines
    missing = next(line for line in lines if line.startswith("missing: "))
    assert "up_tr256.up_conv.weight" in missing and "down_tr64" not in missing
    assert not any(line.startswith("unexpected: ") for line in lines)


def test_folder_with_several_series_lists_them_in_one_line(tmp_path, capfd):
    import medfm

    study = tmp_path / "study"
    medfm.samples.write_dicom_series("ct_head", study / "a")
    medfm.samples.write_dicom_series("mr_head_t1", study / "b")
    line = _single_error_line(cli_in_process(["infer", "models_genesis_chest_ct", str(study), "--out", str(tmp_path / "o")], capfd))
    assert f"{study}: 2 DICOM series, choose one with series_uid: " in line and "(CT, " in line and "(MR, " in line
    assert "inference failed" not in line, "the reader's own message, not a wrapper"
    assert not (tmp_path / "o").exists()


def test_contract_deviations_are_printed_as_warnings(tmp_path):
    import medfm

    result = run_command(MEDFM + ["infer", "models_genesis_chest_ct", medfm.samples.path("mr_head_t1"), "--out", str(tmp_path / "o")])
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("medfm: warning: ")]
    assert "demo weights" in warnings.pop(), "the demo-weights warning comes last, once the outputs exist"
    assert len(warnings) == 3
    assert "are not CT Hounsfield units" in warnings[0] and "outside the pre-training range" in warnings[1]
    assert "is smaller than the 64 x 64 x 32 window the network was trained on; it is padded" in warnings[2]


def test_list_shows_every_bundle_with_weights_and_flags_restricted_licences():
    result = run_command([sys.executable, "-m", "medfm.cli", "list"])
    assert result.returncode == 0, result.stderr
    blocks = {block.split(" ", 1)[0]: block for block in re.split(r"\n(?=\S)", result.stdout.strip())}
    assert set(blocks) == {"models_genesis_chest_ct", "universal_model_sar", "vdt_resnet3d18",
                           "medical_transformer_brain_mri", "spad_vit_base"}
    assert "installed weights:  medfm_genesis_demo" in blocks["models_genesis_chest_ct"]
    assert "genesis_chest_ct (download, default); medfm_genesis_demo (ships with the bundle)" in blocks["models_genesis_chest_ct"]
    assert "genesis_chest_ct: NON-COMMERCIAL" in blocks["models_genesis_chest_ct"]
    assert "installed weights:  none" in blocks["spad_vit_base"] and "pumit_b_v1 (import your copy, default)" in blocks["spad_vit_base"]
    assert "NO LICENCE" in blocks["universal_model_sar"] and "universal_model (download, default)" in blocks["universal_model_sar"]


@pytest.mark.parametrize("command", [["--help"], ["list"], ["info", "spad_vit_base"], ["schema", "vdt_resnet3d18"]])
def test_commands_that_read_only_metadata_start_without_torch_monai_or_itk(command):
    """They start in a fraction of a second: the heavy libraries load on first use (PEP 562), not with medfm."""
    script = ("import sys; from medfm.cli import main; code = main(sys.argv[1:]); "
              "heavy = sorted({'torch', 'monai', 'itk', 'nibabel', 'pydicom'} & set(sys.modules)); "
              "print('loaded:', heavy, file=sys.stderr); sys.exit(code)")
    result = run_command([sys.executable, "-c", script, *command])
    assert result.returncode == 0 and result.stderr.splitlines()[-1] == "loaded: []", result.stderr[-2000:]


def test_info_gives_contract_weights_provenance_and_citation(genesis_bundle, tmp_path):
    save_upstream_checkpoint(tmp_path / "Genesis_Chest_CT_copy.pt")
    assert run_command([sys.executable, "-m", "medfm.cli", "weights", "import", str(genesis_bundle),
                        str(tmp_path / "Genesis_Chest_CT_copy.pt")]).returncode == 0
    result = run_command([sys.executable, "-m", "medfm.cli", "info", str(genesis_bundle)])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'intensity: {"method": "hu_window", "window": [-1000, 1000], "output_range": [0, 1]}' in out
    assert "installed weights: unregistered:" in out and "imported from" in out and "Genesis_Chest_CT_copy.pt" in out
    assert "sha256: 62de21a05236d6a8" in out and "[no commercial use]" in out and "cite:" in out
    assert "default weights: genesis_chest_ct" in out
    spad = run_command([sys.executable, "-m", "medfm.cli", "info", "spad_vit_base"]).stdout
    assert "sha256: not published" in spad and "arXiv:2312.07630" in spad
    bad = run_command([sys.executable, "-m", "medfm.cli", "info", "no_such_bundle"])
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "known bundles:" in bad.stderr


def test_embed_many_inputs_skips_a_bad_one_and_resumes(small_ct, tmp_path):
    second = tmp_path / "lists" / "ct_copy.nii.gz"
    second.parent.mkdir()
    shutil.copy(small_ct, second)
    broken = tmp_path / "lists" / "broken.nii.gz"
    broken.write_text("not an image")
    (tmp_path / "lists" / "inputs.csv").write_text("image,note\nct_copy.nii.gz,relative to the list\nbroken.nii.gz,bad\n")
    command = [sys.executable, "-m", "medfm.cli", "embed", "models_genesis_chest_ct", str(small_ct),
               str(tmp_path / "lists" / "inputs.csv"), "--out", str(tmp_path / "out"), "--progress", "False"]
    first = run_command(command)
    assert first.returncode == 1 and "2 embedded, 0 already" in first.stdout
    assert first.stderr.count("medfm: skipped:") == 1 and str(broken) in first.stderr
    assert "1 of 3 inputs failed" in first.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "embeddings.csv").open()))
    assert sorted(Path(r["input"]).name for r in rows) == ["ct_copy.nii.gz", "ct_small.nii.gz"]
    [failure] = list(csv.DictReader((tmp_path / "out" / "failed.csv").open()))
    assert failure["input"] == str(broken) and str(broken) in failure["error"]
    again = run_command(command[:6] + command[7:])  # without the list: only done inputs
    assert again.returncode == 0 and "0 embedded, 1 already" in again.stdout
    assert len(list(csv.DictReader((tmp_path / "out" / "embeddings.csv").open()))) == 2
    # the broken input repaired: the same command embeds it alone, and failed.csv is gone
    shutil.copy(small_ct, broken)
    fixed = run_command(command)
    assert fixed.returncode == 0 and "1 embedded, 2 already" in fixed.stdout, fixed.stderr
    assert not (tmp_path / "out" / "failed.csv").exists()
    assert len(list(csv.DictReader((tmp_path / "out" / "embeddings.csv").open()))) == 3


@pytest.mark.slow
def test_demo_restores_and_embeds_the_sample_as_nifti_and_dicom(tmp_path):
    result = run_command(MEDFM + ["demo", "--out", str(tmp_path / "demo")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "embedding cosine similarity, NIfTI vs DICOM input: 1.000000" in result.stdout
    assert result.stdout.count("max affine difference 0.00e+00 mm") == 2
    rows = list(csv.DictReader((tmp_path / "demo" / "embeddings" / "embeddings.csv").open()))
    assert len(rows) == 2 and {row["dimension"] for row in rows} == {"512"}
    assert result.stdout.count("with the full inference's (its windows overlap)") == 2
    warnings = [line for line in result.stderr.splitlines() if line.startswith("medfm: warning:")]
    assert warnings and len(warnings) == len(set(warnings)), "each warning once per run"
    # every tile of the montage legible (the corrupted non-linear-intensity tile was black in the clean cube's window)
    montage = np.asarray(Image.open(tmp_path / "demo" / "montage.png"))
    tile, label = 64 * 3, 14
    for row in range(4):
        for column in range(3):
            top = label + row * (tile + label) + label
            pixels = montage[top:top + tile, column * tile:(column + 1) * tile]
            assert pixels.std() > 10 and 5 < pixels.mean() < 250, (row, column)
    footer = montage[label + 4 * (tile + label):]
    assert footer.shape[0] >= 4 * label and footer.max() > 200, "the weights are named under the tiles"


def test_the_demo_montage_names_the_weights_and_how_to_get_the_official_ones():
    from medfm.bundles import find_bundle
    from medfm.demo import _weights_lines

    text = " ".join(_weights_lines(find_bundle("models_genesis_chest_ct")))
    assert text.startswith("weights: medfm_genesis_demo. A demonstration that the pre-training runs end to end")
    assert "far weaker than the official weights. Other weights: run 'medfm weights fetch models_genesis_chest_ct' " \
           "(downloads genesis_chest_ct)" in text


@pytest.mark.parametrize("command", ["infer", "embed"])
def test_a_misspelt_override_is_refused_with_the_keys_it_could_mean(small_ct, tmp_path, command, capfd):
    line = _single_error_line(cli_in_process([command, str(GENESIS), str(small_ct), "--out", str(tmp_path / "out"),
                                          "--sw_batchsize", "2"], capfd))
    assert "has no key 'sw_batchsize'; did you mean sw_batch_size" in line
    assert not (tmp_path / "out").exists()


def test_a_new_argument_of_a_component_is_not_refused_as_unknown(small_ct, tmp_path):
    from medfm.inference import check_overrides

    check_overrides(GENESIS, ["inference.json"], {"network_def#norm": "batch", "network_def#new_argument": 1})


def test_output_into_a_closed_pipe_ends_quietly():
    """`medfm info B | head -n 0`: the reader is gone before medfm writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(MEDFM + ["info", str(GENESIS)], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr


def _infer_until_staging(small_ct, tmp_path):
    process = subprocess.Popen(MEDFM + ["infer", str(GENESIS), str(small_ct), "--out", str(tmp_path / "out")],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.staging-") for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the run has started writing into its staging folder
    return process


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_is_one_line_and_leaves_no_staging_folder(small_ct, tmp_path, stop):
    process = _infer_until_staging(small_ct, tmp_path)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -stop and stderr.strip().splitlines() == ["medfm: interrupted"], stderr  # ended by it
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_next_run_removes_what_a_sigkilled_run_left_beside_out(small_ct, tmp_path):
    process = _infer_until_staging(small_ct, tmp_path)
    process.kill()
    process.communicate(timeout=60)
    (abandoned,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.staging-")]
    result = run_command(MEDFM + ["infer", str(GENESIS), str(small_ct), "--out", str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not abandoned.exists()


def test_a_damaged_cached_bundle_is_a_warning_in_list_and_a_damaged_import_record_never_stops_inference(small_ct, tmp_path):
    home = tmp_path / "home"
    (home / "bundles" / "damaged" / "configs").mkdir(parents=True)
    (home / "bundles" / "damaged" / "configs" / "metadata.json").write_text("{not json")
    listed = run_command(MEDFM + ["list"], env={"MEDFM_HOME": str(home)})
    assert listed.returncode == 0 and "models_genesis_chest_ct" in listed.stdout
    (warning,) = listed.stderr.strip().splitlines()
    assert warning.startswith("medfm: warning: ") and "damaged/configs/metadata.json: unreadable (JSONDecodeError" in warning

    bundle = tmp_path / "models_genesis_chest_ct"
    shutil.copytree(GENESIS, bundle)
    (bundle / "models" / "weights.json").write_text("[garbage")
    info = run_command(MEDFM + ["info", str(bundle)])
    assert info.returncode == 0 and "models/weights.json: unreadable (JSONDecodeError" in info.stdout
    summary = medfm.embed(bundle, [small_ct], out=tmp_path / "out", progress=False, num_workers=0)
    assert summary.processed == 1 and summary.rows[0]["weights"] == "medfm_genesis_demo"  # known by its sha256
