"""Checkpoints written from the authors' own key tables (transcribed from their code into
``authors_layouts/``, never derived from medfm's networks) import strictly into every bundle whose
authors published code, and each of their tensors lands unchanged (up to documented adaptations).

The Medical Transformer and SPAD-VT tokenizer tables, whose layouts differ from medfm's, live with
their formula tests in ``test_medical_transformer.py`` and ``test_spad_tokenizer.py``.
"""

import ast
import math
import shutil
from pathlib import Path

import pytest
import torch

from medfm.weights import import_weights, load_checkpoint
from tests.conftest import BUNDLES

LAYOUTS = Path(__file__).parent / "authors_layouts"
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def read_layout(name: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """``key -> shape`` in the authors' order, and the parameter count stated in the table's header."""
    shapes, parameters = {}, None
    for line in (LAYOUTS / f"{name}.tsv").read_text().splitlines():
        if line.startswith("# parameters:"):
            parameters = int(line.split(":")[1])
        elif not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = ast.literal_eval(shape)
    return shapes, parameters


def random_state(shapes: dict, prefix: str = "", dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[prefix + key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[prefix + key] = torch.rand(shape, generator=generator) + 0.5
        else:
            value = torch.randn(shape, generator=generator) * 0.02
            state[prefix + key] = value.to(dtype) if value.ndim > 1 else value
    return state


def copy_bundle(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(BUNDLES / name, target, ignore=shutil.ignore_patterns("eval", "pretrain", "finetune", "models"))
    return target


def imported(bundle: Path, checkpoint: dict, tmp_path: Path, file_name: str) -> dict[str, torch.Tensor]:
    torch.save(checkpoint, tmp_path / file_name)
    report = import_weights(bundle, tmp_path / file_name)
    assert report.missing_keys == [] and report.unexpected_keys == []
    return load_checkpoint(bundle / "models" / "model.pt")


def parameter_count(shapes: dict) -> int:
    return sum(math.prod(shape) for key, shape in shapes.items() if not key.endswith(BUFFERS))


@pytest.mark.parametrize("bundle_name", ["models_genesis_chest_ct", "universal_model_sar"])
def test_the_genesis_trainers_file_imports_tensor_for_tensor(tmp_path, bundle_name):
    """The Universal Model ships the Genesis UNet3D file layout (same 106 keys)."""
    shapes, parameters = read_layout("genesis_unet3d")
    assert len(shapes) == 106 and parameter_count(shapes) == parameters == 19_073_665
    state = random_state(shapes, prefix="module.")
    checkpoint = {"epoch": 200, "state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}}
    saved = imported(copy_bundle(tmp_path, bundle_name), checkpoint, tmp_path, "Genesis_Chest_CT_copy.pt")
    assert list(saved) == list(shapes)
    for key in shapes:
        torch.testing.assert_close(saved[key], state[f"module.{key}"], check_dtype=False)


@pytest.mark.parametrize("form", ["mmcls_classifier", "published_fp16_backbone"])
def test_the_vdt_checkpoint_imports_tensor_for_tensor(tmp_path, form):
    shapes, parameters = read_layout("vdt_resnet3d18")
    assert parameter_count(shapes) == parameters == 33_673_000
    backbone = {k: s for k, s in shapes.items() if k.startswith("backbone.")}
    assert len(backbone) == 120 and parameter_count(backbone) == 33_160_000
    if form == "mmcls_classifier":  # what mmcv's save_checkpoint writes during training
        state = random_state(shapes)
        checkpoint = {"meta": {"epoch": 100, "mmcls_version": "0.12.0"}, "state_dict": state}
    else:  # tools/publish_model.py --remove_backbone: bare backbone keys, conv weights half precision
        state = {k.removeprefix("backbone."): v for k, v in random_state(backbone, dtype=torch.float16).items()}
        checkpoint = state
    saved = imported(copy_bundle(tmp_path, "vdt_resnet3d18"), checkpoint, tmp_path, "res3d18_copy.pth")
    # the embedding bundle has no classification head: head.fc is left out, every backbone tensor lands
    assert list(saved) == [k.removeprefix("backbone.") for k in backbone]
    for key in backbone:
        source = state[key] if form == "mmcls_classifier" else state[key.removeprefix("backbone.")]
        torch.testing.assert_close(saved[key.removeprefix("backbone.")], source.float(), check_dtype=False)
        assert saved[key.removeprefix("backbone.")].dtype == (torch.int64 if key.endswith("tracked") else torch.float32)


def test_the_spad_vit_mim_checkpoint_imports_tensor_for_tensor(tmp_path):
    shapes, parameters = read_layout("spad_vit_base")
    assert len(shapes) == 239 and parameter_count(shapes) == parameters == 96_309_760
    assert shapes["blocks.0.mlp.w1.weight"] == (int(768 * (8 / 3)), 768)
    state = random_state(shapes)
    checkpoint = {"epoch": 10, "global_step": 1000, "state_dict": state}
    saved = imported(copy_bundle(tmp_path, "spad_vit_base"), checkpoint, tmp_path, "pumit-b-copy.ckpt")
    # the one-channel embedding network: no mask token or MIM head; the RGB patch kernel summed over RGB
    kept = [k for k in shapes if not k.startswith(("mask_token", "mim_head."))]
    assert list(saved) == kept
    for key in kept:
        expected = state[key].sum(dim=1, keepdim=True) if key == "patch_embed.proj.weight" else state[key]
        torch.testing.assert_close(saved[key], expected)
