"""``medfm label-bundle``: MONAI-Label-ready segmentation bundles from the foundation bundles.

Serving one with a real MONAI Label server is tests/integration/test_monailabel.py.
"""

import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm.bundles import metadata_schema
from medfm.io import output_stem
from medfm.weights import load_checkpoint
from tests.conftest import BUNDLES, GENESIS, bundle_run, run_command

pytestmark = pytest.mark.slow


def _label_bundle(*arguments: str):
    return run_command([sys.executable, "-m", "medfm.cli", "label-bundle", *arguments])


def _segment(bundle, scan, output_dir, *overrides):
    bundle_run(bundle, ["configs/inference.json"], "--input_image", str(scan), "--output_dir", str(output_dir), *overrides)
    label = nib.load(output_dir / f"{output_stem(scan)}_seg.nii.gz")
    source = nib.load(scan)
    assert label.shape == source.shape
    np.testing.assert_allclose(label.affine, source.affine, atol=1e-4)
    return np.asarray(label.dataobj)


def test_genesis_label_bundle_holds_the_pretrained_backbone_and_segments_in_the_scan_geometry(small_ct, tmp_path, monkeypatch):
    from monai.bundle import verify_metadata, verify_net_in_out

    out = tmp_path / "apps" / "monaibundle" / "model" / "genesis_seg"
    made = _label_bundle("models_genesis_chest_ct", "--labels", "liver,spleen", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert "0: background, 1: liver, 2: spleen" in made.stdout and "medfm_genesis_demo" in made.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["genesis_seg"], "no staging folder left behind"

    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert metadata["name"] == "genesis_seg" and pred["num_channels"] == 3
    assert pred["channel_def"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert metadata["task_bundle"]["source_weights"] == "medfm_genesis_demo"
    # MONAI's checks, in-process (each raises on a disagreement)
    verify_metadata(meta_file=str(out / "configs" / "metadata.json"), filepath=str(metadata_schema(out)))
    with monkeypatch.context() as inside:
        inside.chdir(out)
        verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json")

    # the backbone is the source bundle's weights; only the 3-class head is new
    source = load_checkpoint(GENESIS / "models" / "model.pt")
    made_weights = load_checkpoint(out / "models" / "model.pt")
    head = {"out_tr.final_conv.weight", "out_tr.final_conv.bias"}
    assert all(torch.equal(made_weights[k], source[k]) for k in source if k not in head)
    assert made_weights["out_tr.final_conv.weight"].shape[0] == 3
    # the import record every bundle has: what medfm info and weights verify read
    provenance = json.loads((out / "models" / "weights.json").read_text())
    assert provenance["weights"] == "medfm_genesis_demo" and sorted(provenance["missing_keys"]) == sorted(head)
    assert provenance["source"] == str(GENESIS / "models" / "model.pt")
    info = run_command([sys.executable, "-m", "medfm", "info", str(out)])
    assert info.returncode == 0 and "None" not in info.stdout, info.stdout
    assert f"imported from {GENESIS / 'models' / 'model.pt'} (sha256 " in info.stdout

    # what MONAI Label reads: one self-contained inference config, image-only transforms
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert {"network_def", "preprocessing", "postprocessing", "inferer"} <= set(inference)
    assert all("label" not in str(t.get("keys")) for t in inference["preprocessing"]["transforms"])
    values = _segment(out, small_ct, tmp_path / "seg")
    assert set(np.unique(values)) <= {0, 1, 2}


def test_spad_label_bundle_resamples_and_gives_the_network_its_spacing(small_ct, tmp_path):
    out = tmp_path / "spad_seg"
    made = _label_bundle("spad_vit_base", "--labels", "tissue", "--out", str(out), "--pretrained", "False")
    assert made.returncode == 0, made.stderr
    inference = json.loads((out / "configs" / "inference.json").read_text())
    targets = [t["_target_"] for t in inference["preprocessing"]["transforms"]]
    assert "medfm.transforms.ResampleToSpacingd" in targets and "Spacingd" not in targets
    assert inference["inferer"]["_target_"] == "medfm.workflows.SpacingInferer"
    resampling = inference["preprocessing"]["transforms"][targets.index("medfm.transforms.ResampleToSpacingd")]
    assert resampling["keys"] == ["image"] and resampling["mode"] == ["bilinear"]
    # a small ViT keeps the CPU run short; the code path is the bundle's own
    small = ["--network_def#embed_dim", "96", "--network_def#depth", "2", "--network_def#num_heads", "2",
             "--network_def#decoder_channels", "[8,8,16,16,32,32]", "--patch_size", "[64,64,16]",
             "--target_spacing", "[2.0,2.0,4.0]", "--ckpt_path", "''"]
    values = _segment(out, small_ct, tmp_path / "seg", *small)
    assert set(np.unique(values)) <= {0, 1}


def test_label_bundle_refuses_what_it_cannot_make_in_one_line(tmp_path):
    cases = [
        (("medical_transformer_brain_mri", "--labels", "tumour"), "no segmentation head"),
        (("universal_model_sar", "--labels", "liver"), "no weights installed"),
        (("models_genesis_chest_ct", "--labels", "background,liver"), "background"),
        (("models_genesis_chest_ct", "--labels", "liver,Liver"), "repeat"),
    ]
    for arguments, message in cases:
        result = _label_bundle(*arguments, "--out", str(tmp_path / "made"))
        assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert list(tmp_path.iterdir()) == [], "nothing written on refusal"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = _label_bundle("models_genesis_chest_ct", "--labels", "liver", "--out", str(existing))
    assert result.returncode == 1 and "already exists" in result.stderr and (existing / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("bundle", ["models_genesis_chest_ct", "universal_model_sar", "vdt_resnet3d18", "spad_vit_base"])
def test_every_segmenting_bundle_makes_a_label_bundle_whose_configs_parse(bundle, tmp_path):
    from monai.bundle import ConfigParser

    out = tmp_path / f"{bundle}_seg"
    assert _label_bundle(bundle, "--labels", "a,b", "--out", str(out), "--pretrained", "False").returncode == 0
    for config in ("inference.json", "train.json"):
        parser = ConfigParser()
        parser.read_config(str(out / "configs" / config))
        parser["bundle_root"] = str(out)
        network = parser.get_parsed_content("network_def")
        assert sum(p.numel() for p in network.parameters()) > 0
    assert json.loads((out / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    assert (BUNDLES / bundle / "configs" / "multi_gpu_train.json").read_text() == (out / "configs" / "multi_gpu_train.json").read_text()
