import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from medfm.networks import SpadTokenizer, SpadViT
from medfm.weights import load_checkpoint, sha256_of
from tests.conftest import BUNDLES, run_command

SPAD_BUNDLE = BUNDLES / "spad_vit_base"


def tiny(**kwargs) -> SpadTokenizer:
    torch.manual_seed(0)
    return SpadTokenizer(**{"channels": (8, 16, 32), "codebook_size": 64, **kwargs}).eval().double()


def test_full_size_tokenizer_matches_the_paper():
    with torch.device("meta"):
        tokenizer = SpadTokenizer(in_channels=3)
    assert sum(p.numel() for p in tokenizer.parameters()) == 34_253_955  # paper: ~34.3 M
    assert tokenizer.codebook.weight.shape == (1024, 512)


@pytest.mark.parametrize("aniso_d", [0, 1, 2, 3, 4])
def test_adaptive_encoder_equals_the_full_encoder_on_a_depth_upsampled_input(aniso_d):
    tokenizer = tiny()
    x = torch.rand(1, 1, 32, 16, 2 * max(16 >> aniso_d, 1), dtype=torch.float64) * 2 - 1
    adaptive, grid, _ = tokenizer.code_probabilities(x, aniso_d=aniso_d)
    full, full_grid, _ = tokenizer.code_probabilities(x.repeat_interleave(2**aniso_d, dim=-1), aniso_d=0)
    assert grid == full_grid
    torch.testing.assert_close(adaptive, full)


@pytest.mark.parametrize("shape, spacing", [((2, 1, 32, 32, 32), None), ((1, 1, 32, 48, 8), (0.7, 0.7, 3.0)),
                                            ((1, 1, 32, 48, 1), None), ((1, 1, 32, 48), None)])
def test_one_code_per_spad_vit_token_and_full_size_reconstruction(shape, spacing):
    tokenizer = tiny()
    x = torch.rand(*shape, dtype=torch.float64)
    out = tokenizer(x, spacing=spacing)
    assert out["reconstruction"].shape == x.shape
    vit = SpadViT(in_channels=1, embed_dim=16, depth=1, num_heads=1)
    tokens = vit.tokens(x.float(), spacing=spacing)[0]
    assert out["probabilities"].shape == (shape[0], tokens.shape[1] - 1, 64)
    torch.testing.assert_close(out["probabilities"].sum(-1), torch.ones(out["probabilities"].shape[:2], dtype=torch.float64))


def test_usage_and_entropy_terms():
    uniform = torch.full((2, 5, 8), 1 / 8)
    usage, entropy = SpadTokenizer.usage_and_entropy(uniform)
    torch.testing.assert_close(usage, -torch.log(torch.tensor(8.0)))  # lowest possible: every code used
    one_hot = torch.nn.functional.one_hot(torch.zeros(2, 5, dtype=torch.long), 8).float()
    usage, entropy = SpadTokenizer.usage_and_entropy(one_hot)
    assert float(entropy) == pytest.approx(0.0, abs=1e-6) and float(usage) == pytest.approx(0.0, abs=1e-6)


# The authors' SimpleVQTokenizer (function2-llx/PUMIT pumit/tokenizer/simple.py, conf/tokenizer/simple),
# transcribed from their code: name -> shape. Convolutions are (out, in, kD, kH, kW) on (N, C, D, H, W)
# inputs, transposed ones (in, out, kD, kH, kW); RGB in and out; LayerNorm eps 1e-5, GroupNorm(8).
def _conv(key: str, out: int, inp: int, k: int) -> dict:
    return {f"{key}.weight": (out, inp, k, k, k), f"{key}.bias": (out,)}


def _norm(key: str, channels: int) -> dict:
    return {f"{key}.weight": (channels,), f"{key}.bias": (channels,)}


AUTHORS_LAYOUT = {
    "quantize.proj.weight": (1024, 512), "quantize.proj.bias": (1024,), "quantize.embedding.weight": (1024, 512),
    **_conv("encoder.0", 128, 3, 4), **_norm("encoder.1.1", 128),
    **_conv("encoder.3", 256, 128, 2), **_norm("encoder.4.1", 256),
    **_conv("encoder.6", 512, 256, 2), **_norm("encoder.7.1", 512),
    **_conv("encoder.9", 512, 512, 3), **_norm("encoder.10", 512),
    **_conv("encoder.12", 512, 512, 3), **_norm("encoder.13", 512),
    **_conv("decoder.0", 512, 512, 3), **_norm("decoder.1", 512),
    **_conv("decoder.3", 512, 512, 3), **_norm("decoder.4", 512),
    "decoder.6.transposed_conv.weight": (512, 256, 2, 2, 2), "decoder.6.transposed_conv.bias": (256,),
    **_conv("decoder.6.conv.0", 256, 256, 3), **_norm("decoder.6.conv.1", 256),
    "decoder.7.transposed_conv.weight": (256, 128, 2, 2, 2), "decoder.7.transposed_conv.bias": (128,),
    **_conv("decoder.7.conv.0", 128, 128, 3), **_norm("decoder.7.conv.1", 128),
    "decoder.8.weight": (128, 3, 4, 4, 4), "decoder.8.bias": (3,),
}
AUTHORS_PARAMETERS = 34_253_955


def authors_checkpoint(seed: int = 0) -> dict:
    """A Lightning Fabric file as their tokenizer training saves it, random values at sane scales."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in AUTHORS_LAYOUT.items():
        value = torch.randn(shape, generator=generator)
        if len(shape) == 5:
            fan_in = shape[0 if "transposed" in key or key == "decoder.8.weight" else 1] * shape[2] ** 3
            value = value / fan_in ** 0.5
        elif key == "quantize.proj.weight":
            value = value / 512 ** 0.5
        elif key.endswith("bias"):
            value = 0.1 * value
        elif len(shape) == 1:  # norm scales
            value = 1 + 0.1 * value
        state[key] = value
    return {"model": state, "discriminator": {"0.weight": torch.zeros(128, 3, 3, 3, 3)},
            "optimizer_g": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}, "step": 1000}


def authors_conv(x, weight, bias, stride, padding, downsamples, aniso_d, transposed=False):
    """Their spacing-adaptive conv on (N, C, D, H, W): depth stride and taps from ``aniso_d`` and the
    depth halvings so far; adapted kernels sum contiguous groups of depth taps and drop depth padding."""
    if transposed:
        depth_stride = min(1 << max(downsamples - aniso_d, 0), stride)
        adapted = depth_stride < stride
    else:
        depth_stride = max(stride >> max(aniso_d - downsamples, 0), 1)
        adapted = aniso_d > downsamples
    depth_padding = padding
    if adapted:
        depth_padding, groups = 0, depth_stride
        weight = weight.reshape(*weight.shape[:2], groups, weight.shape[2] // groups, *weight.shape[3:]).sum(3)
    operation = F.conv_transpose3d if transposed else F.conv3d
    return operation(x, weight, bias, stride=(depth_stride, stride, stride), padding=(depth_padding, padding, padding))


def authors_tokenizer(w: dict, x: torch.Tensor, aniso_d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code probabilities (N, d, h, w, 1024) and reconstruction (N, 3, D, H, W) of an RGB (N, 3, D, H, W) input."""
    def channel_norm(z, key):
        return F.layer_norm(z.movedim(1, -1), z.shape[1:2], w[f"{key}.weight"], w[f"{key}.bias"], 1e-5).movedim(-1, 1)

    def conv3(z, key, norm, downsamples):
        z = authors_conv(z, w[f"{key}.weight"], w[f"{key}.bias"], 1, 1, downsamples, aniso_d)
        return F.leaky_relu(F.group_norm(z, 8, w[f"{norm}.weight"], w[f"{norm}.bias"]), 0.01)

    z, downsamples = x, 0
    for conv, norm, stride in (("encoder.0", "encoder.1.1", 4), ("encoder.3", "encoder.4.1", 2),
                               ("encoder.6", "encoder.7.1", 2)):
        z = authors_conv(z, w[f"{conv}.weight"], w[f"{conv}.bias"], stride, 0, downsamples, aniso_d)
        z = F.gelu(channel_norm(z, norm))
        downsamples += stride.bit_length() - 1
    z = conv3(conv3(z, "encoder.9", "encoder.10", 4), "encoder.12", "encoder.13", 4)
    probabilities = F.linear(z.movedim(1, -1), w["quantize.proj.weight"], w["quantize.proj.bias"]).softmax(-1)
    z = (probabilities @ w["quantize.embedding.weight"]).movedim(-1, 1)
    z = conv3(conv3(z, "decoder.0", "decoder.1", 4), "decoder.3", "decoder.4", 4)
    for block, downsamples in (("decoder.6", 4), ("decoder.7", 3)):
        z = authors_conv(z, w[f"{block}.transposed_conv.weight"], w[f"{block}.transposed_conv.bias"], 2, 0,
                         downsamples, aniso_d, transposed=True)
        z = conv3(z, f"{block}.conv.0", f"{block}.conv.1", downsamples - 1)
    return probabilities, authors_conv(z, w["decoder.8.weight"], w["decoder.8.bias"], 4, 0, 2, aniso_d, transposed=True)


def test_the_authors_layout_has_the_papers_parameter_count():
    assert sum(math.prod(shape) for shape in AUTHORS_LAYOUT.values()) == AUTHORS_PARAMETERS
    with torch.device("meta"):
        assert sum(p.numel() for p in SpadTokenizer(in_channels=3).parameters()) == AUTHORS_PARAMETERS


@pytest.mark.parametrize("aniso_d", [0, 2])
def test_an_authors_tokenizer_imports_for_the_mim_stage_and_computes_their_outputs(tmp_path, aniso_d):
    """``medfm weights import spad_vit_base FILE --stage tokenizer``, then codes and reconstruction of a gray
    volume against the authors' rules written out above (RGB input, depth-first kernels)."""
    bundle = tmp_path / "spad_vit_base"
    shutil.copytree(SPAD_BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "pretrain", "finetune", "models"))
    checkpoint = authors_checkpoint()
    torch.save(checkpoint, tmp_path / "simple-soft.ckpt")
    result = run_command([sys.executable, "-m", "medfm", "weights", "import", str(bundle), str(tmp_path / "simple-soft.ckpt"),
                          "--stage", "tokenizer"])
    assert result.returncode == 0, result.stderr
    written = bundle / "pretrain" / "models" / "tokenizer.pt"
    assert f"wrote  {written}" in result.stdout and "missing keys: 0, unexpected keys: 0" in result.stdout
    assert json.loads(written.with_suffix(".json").read_text())["source_sha256"] == sha256_of(tmp_path / "simple-soft.ckpt")
    tokenizer = SpadTokenizer(in_channels=1).eval()
    tokenizer.load_state_dict(load_checkpoint(written))  # what the MIM stage's CheckpointLoader reads

    depth = 16 >> aniso_d
    gray = torch.rand(1, 1, 32, 48, depth) * 2 - 1  # (N, C, H, W, D)
    with torch.no_grad():
        probabilities, grid, _ = tokenizer.code_probabilities(gray, aniso_d=aniso_d)
        reconstruction = tokenizer(gray, aniso_d=aniso_d)["reconstruction"]
        expected, expected_image = authors_tokenizer(checkpoint["model"], gray.permute(0, 1, 4, 2, 3).repeat(1, 3, 1, 1, 1),
                                                     aniso_d)
    assert grid == tuple(expected.shape[1:4]) == (1, 2, 3)
    torch.testing.assert_close(probabilities, expected.flatten(1, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reconstruction, expected_image.mean(1, keepdim=True).permute(0, 1, 3, 4, 2),
                               rtol=1e-4, atol=1e-5)


def test_a_stage_the_bundle_does_not_have_is_one_line(tmp_path):
    torch.save(authors_checkpoint()["model"], tmp_path / "tok.pt")
    result = run_command([sys.executable, "-m", "medfm", "weights", "import", "spad_vit_base", str(tmp_path / "tok.pt"),
                          "--stage", "decoder"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no pre-training stage 'decoder' (no configs/pretrain_decoder.json); stages with their own weights: " \
           "tokenizer" in result.stderr
