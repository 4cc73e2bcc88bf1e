"""Every bundle's configs/embed.json with ``python -m monai.bundle run``: the same embedding as the
full inference workflow, from only the layers the embedding needs, and nothing else written."""

import csv
import shutil

import numpy as np
import pytest
import torch

import medfm
from medfm.networks import vdt_resnet18
from medfm.weights import import_weights
from tests.bundles.test_spad_vit_base import TINY_ARGS, install_tiny_weights
from tests.conftest import BUNDLES, bundle_run, save_upstream_checkpoint

pytestmark = pytest.mark.slow


def _bundle_with_weights(name, tmp_path):
    """A copy of the bundle holding weights (shipped ones, or fresh ones where none are shipped) and its extra arguments."""
    target = tmp_path / name
    shutil.copytree(BUNDLES / name, target, ignore=shutil.ignore_patterns("eval", "finetune*", "pretrain"))
    if name == "universal_model_sar":
        save_upstream_checkpoint(tmp_path / "upstream_style.pt", seed=3)
        import_weights(target, tmp_path / "upstream_style.pt")
    elif name == "vdt_resnet3d18":
        (target / "models").mkdir(exist_ok=True)
        torch.manual_seed(0)
        torch.save(vdt_resnet18(feed_forward=False).state_dict(), target / "models" / "model.pt")
    elif name == "spad_vit_base":
        install_tiny_weights(target)
        return target, TINY_ARGS
    return target, []


@pytest.mark.parametrize("name", ["models_genesis_chest_ct", "universal_model_sar", "vdt_resnet3d18",
                                  "medical_transformer_brain_mri", "spad_vit_base"])
def test_embed_overlay_gives_the_inference_embedding_and_writes_only_embeddings(name, small_ct, tmp_path):
    bundle, extra = _bundle_with_weights(name, tmp_path)
    source = str(small_ct) if name != "medical_transformer_brain_mri" else medfm.samples.path("mr_head_t1")
    bundle_run(bundle, ["configs/inference.json"], "--input_image", source, "--output_dir", str(tmp_path / "full"), *extra)
    [full_row] = list(csv.DictReader((tmp_path / "full" / "embeddings.csv").open()))
    bundle_run(bundle, ["configs/inference.json", "configs/embed.json"], "--input_image", source,
                        "--output_dir", str(tmp_path / "embed"), "--num_workers", "1", *extra)
    [row] = list(csv.DictReader((tmp_path / "embed" / "embeddings.csv").open()))
    assert sorted(p.name for p in (tmp_path / "embed").iterdir()) == sorted(["embeddings.csv", row["embedding"]])
    assert (row["input"], row["model"], row["weights"], row["region"]) == (source, name, full_row["weights"], "")
    np.testing.assert_allclose(np.load(tmp_path / "embed" / row["embedding"]),
                               np.load(tmp_path / "full" / full_row["embedding"]), rtol=1e-4, atol=1e-5)
