import pytest
import torch
import torch.nn.functional as F

from medfm.networks import SpadViT
from medfm.networks.spad_vit import (AdaptivePatchEmbed, aniso_d_from_spacing, apply_rope, checkpoint_filter_fn,
                                     resample_pos_embed, rope_angles)

SMALL = dict(embed_dim=64, depth=4, num_heads=4)


def small(**kwargs) -> SpadViT:
    torch.manual_seed(0)
    return SpadViT(**{"in_channels": 1, **SMALL, **kwargs}).eval()


def test_vit_b_has_the_upstream_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        backbone, mim = SpadViT(), SpadViT(task="mim")
    shapes = {k: tuple(v.shape) for k, v in mim.state_dict().items()}
    assert shapes["cls_token"] == (1, 1, 768) and shapes["mask_token"] == (1, 1, 768)
    assert shapes["pos_embed"] == (1, 768, 5, 10, 10)
    assert shapes["patch_embed.proj.weight"] == (768, 3, 16, 16, 16)
    assert shapes["blocks.11.attn.q_proj.weight"] == (768, 768) and "blocks.11.attn.k_proj.bias" not in shapes
    assert shapes["blocks.11.attn.q_bias"] == shapes["blocks.11.attn.v_bias"] == (768,)
    assert shapes["blocks.0.mlp.w1.weight"] == shapes["blocks.0.mlp.w2.weight"] == (2048, 768)
    assert shapes["blocks.0.mlp.ffn_ln.weight"] == (2048,) and shapes["blocks.0.mlp.w3.weight"] == (768, 2048)
    assert shapes["mim_head.0.weight"] == (768, 768) and shapes["mim_head.2.weight"] == (1024, 768)
    assert sum(p.numel() for p in backbone.parameters()) == 94_930_944  # paper: 94.93 M
    assert sum(p.numel() for p in mim.parameters()) == 96_309_760  # 96.31 M with the MIM head


@pytest.mark.parametrize("spacing, expected", [
    ((1, 1, 1), 0), ((0.8, 0.8, 1.5), 0), ((1, 1, 2), 1), ((0.75, 0.75, 3), 2), ((0.7, 0.7, 5), 2),
    ((1, 0.5, 4), 3), ((1, 1, 0.5), 0), ((1, 1, 1e8), 5)])
def test_aniso_d_from_spacing(spacing, expected):
    assert aniso_d_from_spacing(spacing) == expected


def test_aniso_d_rejects_bad_spacing():
    with pytest.raises(ValueError, match="positive finite"):
        aniso_d_from_spacing((1, 0, 1))


@pytest.mark.parametrize("aniso_d", [0, 1, 2, 3, 4])
def test_adaptive_embedding_equals_the_full_kernel_on_a_depth_upsampled_input(aniso_d):
    torch.manual_seed(aniso_d)
    embed = AdaptivePatchEmbed(2, 8, patch_size=16).double()
    slices = max(16 >> aniso_d, 1) * 2
    x = torch.randn(1, 2, slices, 32, 16, dtype=torch.float64)  # (N, C, D, H, W)
    upsampled = x.repeat_interleave(2**aniso_d, dim=2)
    full = F.conv3d(upsampled, embed.proj.weight, embed.proj.bias, stride=16)
    torch.testing.assert_close(embed(x, aniso_d), full)


def test_a_2d_image_is_one_slice_with_a_2d_kernel():
    net = small()
    image = torch.rand(1, 1, 32, 48)
    torch.testing.assert_close(net(image), net(image.unsqueeze(-1)))
    tokens = net.patch_embed(image.unsqueeze(2), 5)  # (N, C, 1, H, W)
    kernel2d = net.patch_embed.proj.weight.sum(2)
    torch.testing.assert_close(tokens[:, :, 0], F.conv2d(image, kernel2d, net.patch_embed.proj.bias, stride=16))


def test_rope_reduces_to_eva02_2d_rope_on_one_slice():
    angles = rope_angles((1, 3, 4), head_dim=64)
    freqs = 10000 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    h, w = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    expected = torch.cat([h.reshape(-1, 1).double() * freqs, w.reshape(-1, 1).double() * freqs], dim=1)
    torch.testing.assert_close(angles, expected)
    depth = rope_angles((2, 1, 1), head_dim=64)[1]
    depth_freqs = 2333 ** (-torch.arange(1, 32, 2, dtype=torch.float64) / 32)
    torch.testing.assert_close(depth, depth_freqs.repeat(2))


def test_rope_attention_scores_depend_on_relative_position_only():
    grid = (4, 5, 6)
    angles = rope_angles(grid, head_dim=16).float()
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    q, k = torch.randn(16), torch.randn(16)
    index = lambda d, h, w: (d * grid[1] + h) * grid[2] + w  # noqa: E731
    rotated = lambda v, i: apply_rope(v, cos[i], sin[i])  # noqa: E731
    score = lambda a, b: rotated(q, index(*a)) @ rotated(k, index(*b))  # noqa: E731
    torch.testing.assert_close(score((0, 1, 2), (1, 3, 3)), score((2, 2, 3), (3, 4, 4)), atol=1e-5, rtol=1e-5)
    assert not torch.isclose(score((0, 1, 2), (1, 3, 3)), score((0, 1, 2), (1, 3, 4)))


def test_pos_embed_resampling():
    table = torch.randn(1, 8, 5, 10, 10)
    assert resample_pos_embed(table, (5, 10, 10)) is table
    torch.testing.assert_close(resample_pos_embed(table, (5, 5, 5))[:, :, :, :, :],
                               F.interpolate(F.avg_pool3d(table, (1, 2, 2)), size=(5, 5, 5), mode="trilinear"))
    assert resample_pos_embed(table, (12, 3, 20)).shape == (1, 8, 12, 3, 20)


def test_spacing_sets_the_token_grid_and_one_batch_has_one_aniso_d():
    net = small()
    x = torch.rand(2, 1, 32, 32, 8)
    tokens, grid, _ = net.tokens(x, spacing=[1.0, 1.0, 4.0])  # aniso_d 2: 4 slices per token
    assert grid == (2, 2, 2) and tokens.shape == (2, 9, 64)
    with pytest.raises(ValueError, match="mixes aniso_d"):
        net(x, spacing=torch.tensor([[1.0, 1.0, 4.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"multiple of the patch stride \(16, 16, 16\)"):
        net(x)


def test_heads_shapes_and_gradients():
    seg = small(task="segmentation", out_channels=3, decoder_channels=(4, 4, 8, 8, 16, 16))
    for shape, spacing in [((1, 1, 64, 48, 32), None), ((1, 1, 64, 64, 8), (1, 1, 4)), ((1, 1, 64, 48), None)]:
        assert seg(torch.rand(*shape), spacing=spacing).shape == (1, 3, *shape[2:])
    seg.train()
    seg(torch.rand(2, 1, 64, 64, 8), spacing=(0.75, 0.75, 3)).mean().backward()
    assert seg.patch_embed.proj.weight.grad.abs().sum() > 0 and seg.fpn.up4[0].weight.grad.abs().sum() > 0
    assert small(task="classification", num_classes=5)(torch.rand(2, 1, 32, 32, 16), spacing=(1, 1, 2)).shape == (2, 5)
    assert small()(torch.rand(3, 1, 32, 32, 32)).shape == (3, 128)  # cls + mean patch token


def test_mim_mask_tokens_replace_patches():
    net = small(task="mim", codebook_size=32)
    x = torch.rand(1, 1, 32, 32, 32)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    assert net.mim_logits(x, mask).shape == (1, 8, 32)
    mask[0, 5] = True
    other = x.clone()
    other[:, :, :16, 16:, 16:] = 0  # H 0:16, W 16:32, D 16:32: token (d=1, h=0, w=1) of the (d, h, w) grid
    torch.testing.assert_close(net.mim_logits(x, mask), net.mim_logits(other, mask))


def lightning_checkpoint(model: SpadViT) -> dict:
    """A checkpoint in the layout of the authors' release: Lightning, ``module.``, tokenizer and optimizer state."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["module.tokenizer.quantize.codebook.weight"] = torch.zeros(4, 4)  # dropped upstream; tolerated here
    return {"state_dict": state, "epoch": 3, "global_step": 3000, "optimizer_states": [{"state": {}}],
            "lr_schedulers": [], "pytorch-lightning_version": "2.1.0"}


def test_upstream_checkpoint_imports_into_one_channel_networks():
    upstream = small(in_channels=3, task="mim", codebook_size=32)
    checkpoint = lightning_checkpoint(upstream)
    embedding = small()
    embedding.load_state_dict(checkpoint_filter_fn(checkpoint, embedding), strict=True)
    gray = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        expected = torch.cat([(t := upstream.tokens(gray.repeat(1, 3, 1, 1, 1), aniso_d=0)[0])[:, 0], t[:, 1:].mean(1)], 1)
        torch.testing.assert_close(embedding(gray), expected, atol=1e-5, rtol=1e-4)
    mim = small(task="mim", codebook_size=32)
    mim.load_state_dict(checkpoint_filter_fn(checkpoint, mim), strict=True)
    torch.testing.assert_close(mim.mim_head[2].weight, upstream.mim_head[2].weight)
    segmentation = small(task="segmentation", decoder_channels=(4, 4, 8, 8, 16, 16))
    result = segmentation.load_state_dict(checkpoint_filter_fn(checkpoint, segmentation), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith(("fpn.", "decoder.")) for k in result.missing_keys)


def test_checkpoint_filter_rejects_non_checkpoints():
    with pytest.raises(ValueError, match="no state dict"):
        checkpoint_filter_fn({"state_dict": [1]}, small())
    with pytest.raises(ValueError, match="no SPAD-ViT tensors"):
        checkpoint_filter_fn({"state_dict": {"tokenizer.x": torch.zeros(1)}}, small())
