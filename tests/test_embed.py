"""``medfm embed`` and ``medfm.embed`` at cohort scale: one run over many real scans (NIfTI and DICOM),
crash-safe resume after SIGKILL, inputs of one base name, and a 2-process torchrun run."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

import medfm
from medfm.errors import MedfmError
from medfm.weights import load_checkpoint
from tests.conftest import GENESIS, crop_nifti, run_command

pytestmark = pytest.mark.slow

EMBED = [sys.executable, "-m", "medfm", "embed"]
OFFSETS = [(0, 0, 0), (6, 10, 8), (10, 30, 20), (3, 25, 30), (0, 38, 34)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[Path]:
    """Five 40x40x24 crops of the real head CT, each ``ct.nii.gz`` in its own folder (one base name)."""
    root = tmp_path_factory.mktemp("cohort")
    scans = []
    for index, offset in enumerate(OFFSETS):
        (root / f"subject_{index}").mkdir()
        scans.append(crop_nifti(medfm.samples.path("ct_head"), root / f"subject_{index}" / "ct.nii.gz", (40, 40, 24), offset))
    return scans


def _rows(index: Path) -> list[dict]:
    return list(csv.DictReader(index.open()))


def _vectors(out: Path) -> dict[str, np.ndarray]:
    return {row["input"]: np.load(out / row["embedding"]) for row in _rows(out / "embeddings.csv")}


def _assert_complete(out: Path, inputs) -> None:
    """Each input once, every row's .npy present, no other .npy, no temporaries or parts left."""
    rows = _rows(out / "embeddings.csv")
    assert sorted(row["input"] for row in rows) == sorted(str(p) for p in inputs)
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(row["embedding"] for row in rows)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_nifti_and_dicom_in_one_run_through_the_python_api(small_ct, tmp_path):
    dicom_dir = tmp_path / "dicom" / "ct_small"
    medfm.samples.write_dicom_series(str(small_ct), dicom_dir, modality="CT")
    summary = medfm.embed(GENESIS, [small_ct, dicom_dir], out=tmp_path / "out", progress=False, num_workers=1)
    assert (summary.processed, summary.already_done, summary.failed) == (2, 0, {})
    nifti_row, dicom_row = summary.rows
    assert (nifti_row["input"], dicom_row["input"]) == (str(small_ct), str(dicom_dir))
    assert dicom_row["series_uid"] == pydicom.dcmread(next(dicom_dir.iterdir())).SeriesInstanceUID
    vectors = [np.load(tmp_path / "out" / row["embedding"]) for row in summary.rows]
    assert vectors[0].shape == (512,) and vectors[0].dtype == np.float32
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5, atol=1e-6)
    again = medfm.embed(GENESIS, [small_ct, dicom_dir], out=tmp_path / "out", progress=False)
    assert (again.processed, again.already_done) == (0, 2) and len(again.rows) == 2


def test_an_index_of_other_weights_is_refused_not_mixed_into(small_ct, tmp_path):
    medfm.embed(GENESIS, [small_ct], out=tmp_path / "out", progress=False, num_workers=0)
    index_before = (tmp_path / "out" / "embeddings.csv").read_text()
    other = crop_nifti(str(small_ct), tmp_path / "other.nii.gz", (48, 48, 24))
    with pytest.raises(MedfmError, match="holds outputs of models_genesis_chest_ct with weights medfm_genesis_demo, "
                                         "this run is models_genesis_chest_ct with weights none; one folder holds one "
                                         "model's outputs: choose another --out"):
        medfm.embed(GENESIS, [small_ct, other], out=tmp_path / "out", progress=False, num_workers=0, ckpt_path=None)
    assert (tmp_path / "out" / "embeddings.csv").read_text() == index_before
    assert not list((tmp_path / "out").glob("other-*"))


def test_scans_of_eight_slices_or_fewer_embed_with_the_shipped_genesis_weights(small_ct, tmp_path):
    """They gave an all-NaN embedding: MONAI's crop of the 1/8-resolution features after padding rounded to nothing."""
    thin = crop_nifti(str(small_ct), tmp_path / "thin.nii.gz", (48, 48, 8))
    dicom_dir = tmp_path / "thin_dicom"
    medfm.samples.write_dicom_series(str(thin), dicom_dir, modality="CT")
    summary = medfm.embed(GENESIS, [thin, dicom_dir], out=tmp_path / "out", progress=False, num_workers=0)
    assert (summary.processed, summary.failed) == (2, {})
    vectors = [np.load(tmp_path / "out" / row["embedding"]) for row in summary.rows]
    assert all(np.isfinite(v).all() and v.std() > 0 for v in vectors)
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5, atol=1e-6)


def test_inputs_sharing_a_base_name_keep_their_own_embeddings(cohort, tmp_path):
    result = run_command(EMBED + ["models_genesis_chest_ct", *map(str, cohort[:3]), "--out", str(tmp_path / "out"),
                                  "--progress", "False"])
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_complete(tmp_path / "out", cohort[:3])
    vectors = list(_vectors(tmp_path / "out").values())
    assert not np.allclose(vectors[0], vectors[1]) and not np.allclose(vectors[1], vectors[2])


def test_a_missing_input_is_skipped_and_recorded_not_fatal(small_ct, tmp_path):
    missing = tmp_path / "gone" / "ct.nii.gz"
    result = run_command(EMBED + ["models_genesis_chest_ct", str(missing), str(small_ct), "--out", str(tmp_path / "out"),
                                  "--progress", "False"])
    assert result.returncode == 1 and "1 embedded" in result.stdout
    assert f"medfm: skipped: {missing}: no such file or folder" in result.stderr
    assert [row["input"] for row in _rows(tmp_path / "out" / "failed.csv")] == [str(missing)]


def test_a_second_run_into_a_folder_being_written_is_refused_and_the_folder_is_free_again_after(small_ct, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from medfm.io.atomic import folder_lock\nwith folder_lock(Path(sys.argv[1])):\n"
                               "    print('held', flush=True)\n    time.sleep(120)\n", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_command(EMBED + ["models_genesis_chest_ct", str(small_ct), "--out", str(out), "--progress", "False"])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert f"another medfm run (process {holder.pid}) is writing to this folder" in lines[0]
        assert [p.name for p in out.iterdir()] == [".medfm.lock"]  # nothing of the refused run
    finally:
        holder.kill()
        holder.wait()
    result = run_command(EMBED + ["models_genesis_chest_ct", str(small_ct), "--out", str(out), "--progress", "False"])
    assert result.returncode == 0 and "1 embedded" in result.stdout, result.stderr
    assert ".medfm.lock" not in {p.name for p in out.iterdir()}


def test_a_users_own_index_file_is_refused_and_left_untouched(small_ct, tmp_path):
    (tmp_path / "out").mkdir()
    mine = tmp_path / "out" / "embeddings.csv"
    mine.write_text("subject,score\nA,1\n")
    result = run_command(EMBED + ["models_genesis_chest_ct", str(small_ct), "--out", str(tmp_path / "out")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "embeddings.csv: exists and is not this run's embeddings.csv" in lines[0]
    assert mine.read_text() == "subject,score\nA,1\n" and [p.name for p in (tmp_path / "out").iterdir()] == ["embeddings.csv"]


def test_weights_giving_nan_fail_the_input_by_name_and_write_nothing(small_ct, genesis_bundle, tmp_path):
    state = load_checkpoint(genesis_bundle / "models" / "model.pt")
    state["down_tr512.ops.1.conv1.weight"] = torch.full_like(state["down_tr512.ops.1.conv1.weight"], float("nan"))
    torch.save(state, genesis_bundle / "models" / "model.pt")
    result = run_command(EMBED + [str(genesis_bundle), str(small_ct), "--out", str(tmp_path / "out"), "--progress", "False"])
    assert result.returncode == 1 and "0 embedded" in result.stdout
    assert f"medfm: skipped: {small_ct}: the embedding holds 512 non-finite values of 512" in result.stderr
    assert list((tmp_path / "out").glob("*.npy")) == [] and _rows(tmp_path / "out" / "embeddings.csv") == []
    [failure] = _rows(tmp_path / "out" / "failed.csv")
    assert failure["input"] == str(small_ct) and "non-finite" in failure["error"]


def _wait_for(condition, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline, "the moment to kill never came"
        time.sleep(0.02)


def test_killed_with_sigkill_the_same_command_continues(cohort, tmp_path):
    out = tmp_path / "out"
    command = EMBED + ["models_genesis_chest_ct", *map(str, cohort), "--out", str(out), "--progress", "False",
                       "--num_workers", "2"]
    part = out / ".embeddings.csv.parts" / "index.rank0.csv"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: part.is_file() and part.read_text().count("\n") >= 2, process)  # header + one row
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader workers
        process.wait()
    assert not (out / "embeddings.csv").exists(), "killed before the end: rows are only in the part file"
    # what a kill at other moments leaves: a half-written .npy, a half-written row, a .npy without its row
    (out / f".{medfm.io.embedding_file_name(cohort[4])}.x1y2.part").write_bytes(b"\x93NUMPY")
    with open(part, "a") as stream:
        stream.write(f"{cohort[3]},,,,,,models_genesis_chest_ct,medfm_gen")
    (out / medfm.io.embedding_file_name(cohort[2])).write_bytes(b"stale")
    resumed = run_command(command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done_before = len(_rows(out / "embeddings.csv")) - int(resumed.stdout.split(" embedded")[0])
    assert done_before >= 1 and f"{done_before} already in" in resumed.stdout
    _assert_complete(out, cohort)
    reference = run_command(EMBED + ["models_genesis_chest_ct", *map(str, cohort), "--out", str(tmp_path / "ref"),
                                     "--progress", "False"])
    assert reference.returncode == 0
    expected = _vectors(tmp_path / "ref")
    for source, vector in _vectors(out).items():
        np.testing.assert_allclose(vector, expected[source], rtol=1e-5, atol=1e-6)


def test_torchrun_two_processes_resume_and_equal_one_process(cohort, tmp_path):
    one = run_command(EMBED + ["models_genesis_chest_ct", *map(str, cohort), "--out", str(tmp_path / "one"),
                               "--progress", "False"])
    assert one.returncode == 0, one.stderr[-2000:]
    out = tmp_path / "two"
    first = run_command(EMBED + ["models_genesis_chest_ct", str(cohort[0]), "--out", str(out), "--progress", "False"])
    assert first.returncode == 0  # an earlier, partial run that the distributed one resumes
    broken = tmp_path / "broken" / "ct.nii.gz"
    broken.parent.mkdir()
    broken.write_text("not an image")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medfm",
                "embed", "models_genesis_chest_ct", *map(str, cohort), str(broken), "--out", str(out),
                "--progress", "False", "--num_workers", "1"]
    result = run_command(torchrun)
    assert result.returncode != 0, "a failed input fails the run"
    assert "4 embedded (by 2 processes: 2, 2), 1 already in" in result.stdout, result.stdout + result.stderr[-3000:]
    assert result.stderr.count("medfm: skipped:") == 1 and str(broken) in result.stderr
    _assert_complete(out, cohort)
    assert [row["input"] for row in _rows(out / "failed.csv")] == [str(broken)]
    expected = _vectors(tmp_path / "one")
    for source, vector in _vectors(out).items():
        np.testing.assert_allclose(vector, expected[source], rtol=1e-5, atol=1e-6)
    again = run_command(torchrun[:-7] + ["--out", str(out), "--progress", "False"])  # without the broken input
    assert again.returncode == 0 and "0 embedded (by 2 processes: 0, 0), 5 already in" in again.stdout, again.stderr[-2000:]
    assert [row["input"] for row in _rows(out / "failed.csv")] == [str(broken)], "still without an embedding"


def test_points_land_on_the_same_anatomy_from_nifti_and_dicom(tmp_path):
    """A point at the world centre of a 64x64x32 crop of the real head CT embeds exactly that crop,
    whether the scan is read from NIfTI or from a DICOM series; a point outside the scan fails alone."""
    source = medfm.samples.path("ct_head")
    offset, size = np.array([4, 10, 20]), np.array([64, 64, 32])
    crop = crop_nifti(source, tmp_path / "crop.nii.gz", tuple(size), tuple(offset))
    ras = nib.load(source).affine @ np.append(offset + (size - 1) / 2, 1.0)
    point = (-ras[0], -ras[1], ras[2])  # RAS -> LPS
    dicom_dir = tmp_path / "dicom" / "ct"
    medfm.samples.write_dicom_series(source, dicom_dir, modality="CT")
    table = tmp_path / "points.csv"
    table.write_text("image,x,y,z,id\n" + "".join(f"{image},{point[0]},{point[1]},{point[2]},nodule\n"
                                                  for image in (source, "dicom/ct")) + f"{source},500,0,0,far\n")
    result = run_command(EMBED + ["models_genesis_chest_ct", "--points", str(table), "--out", str(tmp_path / "out"),
                                  "--progress", "False"])
    assert result.returncode == 1 and "2 embedded" in result.stdout, result.stderr[-2000:]
    assert f"medfm: skipped: {source} (point:far): point (500, 0, 0) mm (LPS) lies outside the scan" in result.stderr
    rows = _rows(tmp_path / "out" / "embeddings.csv")
    assert [(row["input"], row["region"]) for row in rows] == [(source, "point:nodule"), (str(dicom_dir), "point:nodule")]
    for row in rows:
        np.testing.assert_allclose([float(row[f"center_{axis}"]) for axis in "xyz"], point, atol=1e-3)
    reference = run_command(EMBED + ["models_genesis_chest_ct", str(crop), "--out", str(tmp_path / "crop_out"),
                                     "--progress", "False"])
    assert reference.returncode == 0
    expected = next(iter(_vectors(tmp_path / "crop_out").values()))
    for row in rows:
        np.testing.assert_allclose(np.load(tmp_path / "out" / row["embedding"]), expected, rtol=1e-5, atol=1e-6)
    assert [row["region"] for row in _rows(tmp_path / "out" / "failed.csv")] == ["point:far"]


def _labels_on(grid_affine, grid_shape, label_affine, labels):
    """``labels`` (on the grid of ``label_affine``) carried to another grid of the same space, voxel by voxel."""
    indices = np.indices(grid_shape).reshape(3, -1)
    mapped = (np.linalg.inv(label_affine) @ np.asarray(grid_affine) @ np.vstack([indices, np.ones(indices.shape[1])]))[:3]
    mapped = np.rint(mapped).astype(int)
    return labels[tuple(mapped)].reshape(grid_shape)


def test_mask_labels_from_nifti_and_from_dicom_seg_give_the_same_regions(small_ct, tmp_path):
    from monai.data import MetaTensor

    from medfm.io import LoadScan, SaveSegmentation

    ct = nib.load(small_ct)
    labels = np.zeros(ct.shape, np.uint8)
    labels[8:24, 10:30, 12:30] = 1
    labels[40:60, 20:44, 5:20] = 2
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(labels, ct.affine), mask)
    dicom_dir = tmp_path / "dicom" / "ct_small"
    medfm.samples.write_dicom_series(str(small_ct), dicom_dir, modality="CT")
    series = LoadScan()(dicom_dir)
    on_series = _labels_on(series.affine, series.shape, ct.affine, labels)
    written = SaveSegmentation(tmp_path / "seg", labels={1: "upper", 2: "lower"})(
        MetaTensor(torch.as_tensor(on_series), affine=series.affine), series.meta)
    seg = next(path for path in written if path.suffix == ".dcm")
    assert pydicom.dcmread(seg).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    regions = {}
    for name, scan, label_file in (("nifti", small_ct, mask), ("dicom", dicom_dir, seg)):
        result = run_command(EMBED + ["models_genesis_chest_ct", str(scan), "--mask", str(label_file),
                                      "--out", str(tmp_path / name), "--progress", "False"])
        assert result.returncode == 0, result.stderr[-2000:]
        regions[name] = {row["region"]: row for row in _rows(tmp_path / name / "embeddings.csv")}
    assert sorted(regions["nifti"]) == sorted(regions["dicom"]) == ["label:1", "label:2"]
    centroid = medfm.transforms.voxel_to_lps(ct.affine, np.argwhere(labels == 1).mean(axis=0))
    [upper] = [r for r in medfm.io.label_regions(mask, small_ct) if r["region"] == "label:1"]
    np.testing.assert_allclose(upper["center_lps"], centroid, atol=1e-6)
    for label in ("label:1", "label:2"):
        nifti, dicom = regions["nifti"][label], regions["dicom"][label]
        np.testing.assert_allclose([float(nifti[f"center_{a}"]) for a in "xyz"], [float(dicom[f"center_{a}"]) for a in "xyz"],
                                   atol=1e-3)
        np.testing.assert_allclose(np.load(tmp_path / "nifti" / nifti["embedding"]),
                                   np.load(tmp_path / "dicom" / dicom["embedding"]), rtol=1e-5, atol=1e-6)

    # a SEG of another series, and an intensity image given as a mask, are refused in one line before any work
    other = tmp_path / "dicom" / "other"
    medfm.samples.write_dicom_series(str(small_ct), other, modality="CT")  # the same pixels, a new series UID
    from scipy.ndimage import gaussian_filter

    intensities = tmp_path / "intensities.nii.gz"  # the CT at finer intensity steps: thousands of integer values
    nib.save(nib.Nifti1Image(np.rint(gaussian_filter(ct.get_fdata() * 20, 1)).astype(np.int16), ct.affine), intensities)
    for scan, label_file, message in ((other, seg, "this DICOM-SEG segments series "),
                                      (small_ct, intensities, "distinct non-zero values, more than the 1000 labels")):
        out = tmp_path / f"refused_{Path(label_file).stem}"
        result = run_command(EMBED + ["models_genesis_chest_ct", str(scan), "--mask", str(label_file), "--out", str(out)])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
        assert not out.exists()


def test_region_inputs_are_checked_before_any_work(small_ct, tmp_path):
    table = tmp_path / "points.csv"
    table.write_text("image,x,y\nct.nii.gz,1,2\n")
    for extra, message in ((["--points", str(table)], "points.csv: a points table needs the columns image, x, y, z"),
                           (["--points", str(table), str(small_ct)], "give no other inputs"),
                           ([str(small_ct), str(small_ct), "--mask", str(small_ct)], "give exactly one input, not 2")):
        result = run_command(EMBED + ["models_genesis_chest_ct", *extra, "--out", str(tmp_path / "out")])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
    table.write_text(f"image,x,y,z\n{small_ct},1,2,3\n")
    result = run_command(EMBED + ["medical_transformer_brain_mri", "--points", str(table), "--out", str(tmp_path / "out")])
    assert result.returncode == 1 and "has no region inputs" in result.stderr
    assert not (tmp_path / "out").exists()


def test_embedding_windows_tile_the_scan_once_and_infers_overlap_gives_infers_embedding(tmp_path):
    """embed.json lays the sliding windows without overlap (a pooled embedding needs no blending of window
    borders; 2.5x fewer windows on a 512x512x300 CT); with inference.json's overlap it is infer's embedding."""
    ct = medfm.samples.path("ct_head")
    written = medfm.infer(GENESIS, ct, out=tmp_path / "infer")
    from_infer = np.load(next(path for path in written if path.endswith("_embedding.npy")))
    overlapping = medfm.embed(GENESIS, [ct], out=tmp_path / "overlapping", window_overlap=0.25, progress=False, num_workers=0)
    np.testing.assert_allclose(np.load(tmp_path / "overlapping" / overlapping.rows[0]["embedding"]), from_infer,
                               rtol=1e-5, atol=1e-6)
    tiled = medfm.embed(GENESIS, [ct], out=tmp_path / "tiled", progress=False, num_workers=0)
    vector = np.load(tmp_path / "tiled" / tiled.rows[0]["embedding"])
    cosine = float(vector @ from_infer / (np.linalg.norm(vector) * np.linalg.norm(from_infer)))
    assert 0.99 < cosine < 0.99999, "other window positions, nearly the same embedding"


def test_a_renamed_copy_of_a_bundle_keeps_its_identity_in_the_index(small_ct, tmp_path):
    """The index, list and info name a bundle by the ``name`` in its metadata, not by its folder."""
    import shutil

    copy = tmp_path / "my_genesis"
    shutil.copytree(GENESIS, copy, ignore=shutil.ignore_patterns("eval", "finetune*", "pretrain*"))
    summary = medfm.embed(copy, [small_ct], out=tmp_path / "out", progress=False, num_workers=0)
    assert [(row["model"], row["weights"]) for row in summary.rows] == [("models_genesis_chest_ct", "medfm_genesis_demo")]
    from medfm.catalog import bundle_info, bundle_summary

    assert bundle_summary(copy)["bundle"] == "models_genesis_chest_ct"
    assert bundle_info(copy)[:2] == [bundle_info(GENESIS)[0], f"folder: {copy.resolve()}"]


def test_weights_given_by_ckpt_path_are_named_in_the_index(genesis_bundle, small_ct, tmp_path):
    """The index names the weights that made the embeddings, also when they come from --ckpt_path and the bundle has
    none installed (it once said "none" there while the run report named the file)."""
    weights = tmp_path / "elsewhere.pt"
    (genesis_bundle / "models" / "model.pt").replace(weights)
    summary = medfm.embed(genesis_bundle, [small_ct], out=tmp_path / "out", progress=False, num_workers=0,
                          ckpt_path=str(weights))
    assert summary.rows[0]["weights"] == "medfm_genesis_demo"  # known by its sha256
