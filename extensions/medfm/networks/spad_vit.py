"""SPAD-ViT: the spacing-adaptive vision transformer of PUMIT (Luo et al., arXiv 2312.07630).

An EVA-02 style ViT (SwiGLU with sub-LN, separate q / v biases, 3D rotary embedding) whose patch
embedding adapts its depth stride to the through-plane spacing, so one network reads isotropic
CT, thick-slice MRI and single 2D images. Parameter names and shapes follow the authors'
checkpoint; :func:`checkpoint_filter_fn` converts their release.

Layout: inputs are MONAI-style ``(N, C, H, W, D)`` with D the through-plane axis; inside, the
tokens live on a ``(d, h, w)`` grid (depth first, as upstream stores ``pos_embed`` and the patch
kernel), and feature maps handed to heads are back in ``(N, C, h, w, d)``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import adapt_input_channels

__all__ = ["SpadViT", "AdaptivePatchEmbed", "aniso_d_from_spacing", "batch_aniso_d", "depth_stride", "checkpoint_filter_fn",
           "TWO_D_ANISO_D", "MAX_ANISO_D"]

#: aniso_d given to single-slice inputs (upstream sets their depth spacing huge, which clips here).
MAX_ANISO_D = 5
TWO_D_ANISO_D = MAX_ANISO_D
TASKS = ("embedding", "classification", "segmentation", "mim")
#: SwiGLU hidden width over model width (upstream's ``mlp_ratio``; the width is truncated to an int).
MLP_RATIO = 8 / 3
#: Blocks of ViT-B whose outputs feed the segmentation FPN in PUMIT's BTCV setup.
UPSTREAM_TAPS = (3, 5, 7, 11)


def aniso_d_from_spacing(spacing: Sequence[float] | torch.Tensor) -> int:
    """``floor(log2(clip(spacing_z / min(spacing_x, spacing_y), 1, 32)))`` for one (x, y, z) spacing in mm."""
    sx, sy, sz = (float(v) for v in spacing)
    if min(sx, sy, sz) <= 0 or not all(math.isfinite(v) for v in (sx, sy, sz)):
        raise ValueError(f"spacing must be three positive finite numbers (mm), got {tuple(spacing)}")
    ratio = min(max(sz / min(sx, sy), 1.0), 2.0**MAX_ANISO_D)
    return int(math.floor(math.log2(ratio) + 1e-9))


def depth_stride(aniso_d: int, patch_size: int = 16) -> int:
    """Depth stride of the patch embedding: ``max(patch_size >> aniso_d, 1)``."""
    return max(patch_size >> aniso_d, 1)


def batch_aniso_d(x: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None, aniso_d: int | None = None) -> int:
    """The one aniso_d of a batch ``x`` (``(N, C, H, W[, D])``) from ``aniso_d``, else ``spacing``
    (``(3,)`` or ``(N, 3)`` mm; every item must agree), else 0 (isotropic). Single slices (no D or
    D = 1) always get :data:`TWO_D_ANISO_D`: a 2D kernel, whatever the depth spacing says."""
    if x.ndim == 4 or x.shape[-1] == 1:
        return TWO_D_ANISO_D
    if aniso_d is not None:
        return int(aniso_d)
    if spacing is None:
        return 0
    rows = torch.as_tensor(spacing, dtype=torch.float64).reshape(-1, 3)
    values = {aniso_d_from_spacing(row) for row in rows.tolist()}
    if len(values) > 1:
        raise ValueError(f"one batch mixes aniso_d values {sorted(values)}: group batches by spacing "
                         "(medfm.workflows.AnisoGroupedBatchSampler)")
    return values.pop()


def check_token_multiple(x: torch.Tensor, aniso_d: int, patch_size: int = 16) -> None:
    """Raise unless the spatial shape of ``x`` (``(N, C, H, W, D)``) holds whole tokens for ``aniso_d``."""
    stride = (patch_size, patch_size, depth_stride(aniso_d, patch_size))
    if any(n % s for n, s in zip(x.shape[2:], stride)):
        raise ValueError(f"input spatial shape {tuple(x.shape[2:])} must be a multiple of the patch stride "
                         f"{stride} (aniso_d {aniso_d}); pad it (DivisiblePad k={list(stride)})")


def reduce_kernel(weight: torch.Tensor, dim: int, taps: int) -> torch.Tensor:
    """Sum the taps of ``weight`` along ``dim`` in contiguous groups down to ``taps`` (the SPAD rule)."""
    full = weight.shape[dim]
    if taps == full:
        return weight
    return weight.unflatten(dim, (taps, full // taps)).sum(dim + 1)


class AdaptivePatchEmbed(nn.Module):
    """Patch embedding whose depth stride shrinks with the through-plane anisotropy.

    ``proj.weight`` is one full ``(embed_dim, C, p, p, p)`` kernel. For ``aniso_d`` a, its p depth
    taps are summed in contiguous groups down to ``s = max(p >> a, 1)`` taps and applied with depth
    stride s, which equals the full kernel applied to the input nearest-upsampled by ``2**a`` along
    depth (``s = 1``: a 2D patch kernel applied slice by slice).
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int = 16) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        """``x``: ``(N, C, D, H, W)``, D a multiple of the depth stride, H and W of the patch size."""
        stride = depth_stride(aniso_d, self.patch_size)
        weight = reduce_kernel(self.proj.weight, 2, stride)
        return F.conv3d(x, weight, self.proj.bias, stride=(stride, self.patch_size, self.patch_size))


def resample_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resample a ``(1, C, d, h, w)`` learned position table to ``grid``: area-downsample the axes
    that are larger, then trilinear-upsample to the exact grid."""
    source = pos_embed.shape[2:]
    if tuple(source) == tuple(grid):
        return pos_embed
    smaller = [min(s, g) for s, g in zip(source, grid)]
    if smaller != list(source):
        pos_embed = F.interpolate(pos_embed, size=smaller, mode="area")
    if smaller != list(grid):
        pos_embed = F.interpolate(pos_embed, size=list(grid), mode="trilinear", align_corners=False)
    return pos_embed


@functools.lru_cache(maxsize=32)
def rope_angles(grid: tuple[int, int, int], head_dim: int, depth_base: float = 2333.0, base: float = 10000.0) -> torch.Tensor:
    """Rotary angles ``(d*h*w, head_dim // 2)`` of a ``(d, h, w)`` token grid (cached per grid: read, never modify).

    Half the head dimension carries angles: in-plane ones are EVA-02's 2D RoPE (h and w
    frequencies ``base**(-[0, 2, ...] / half)``, a quarter each); the depth angle adds
    ``depth * depth_base**(-[1, 3, ...] / half)`` (a quarter, tiled twice) to both halves, so a
    single slice gets exactly the 2D embedding.
    """
    with torch.inference_mode(False):  # the cached table must also serve later training steps
        half = head_dim // 2
        quarter = half // 2
        plane_freqs = base ** (-torch.arange(0, half, 2, dtype=torch.float64)[:quarter] / half)
        depth_freqs = depth_base ** (-torch.arange(1, half, 2, dtype=torch.float64)[:quarter] / half)
        d, h, w = (torch.arange(n, dtype=torch.float64) for n in grid)
        plane = torch.cat([
            (h[:, None] * plane_freqs)[:, None, :].expand(len(h), len(w), quarter),
            (w[:, None] * plane_freqs)[None, :, :].expand(len(h), len(w), quarter),
        ], dim=-1)  # (h, w, half)
        depth = (d[:, None] * depth_freqs).repeat(1, 2)  # (d, half)
        return (depth[:, None, None, :] + plane[None]).reshape(-1, half)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` (``(..., L, head_dim)``) by the given angles."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with q and v biases (no k bias) and RoPE on patch tokens."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, 1 + L, dim)`` (cls first); ``cos``/``sin``: ``(L, head_dim)``."""
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], cos, sin)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``: the gated MLP with the sub-LN of EVA-02."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


def adaptive_upsample(conv: nn.ConvTranspose3d, x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """A stride-2 transposed convolution that upsamples only the axes whose ``factor`` is 2."""
    weight = conv.weight
    for axis, f in enumerate(factor):
        weight = reduce_kernel(weight, 2 + axis, f)
    return F.conv_transpose3d(x, weight, conv.bias, stride=tuple(factor))


class ConvNormAct(nn.Sequential):
    """3x3x3 convolution, instance norm (affine), LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.InstanceNorm3d(out_channels, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class UpBlock(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, two conv-norm-act layers."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.convs = nn.Sequential(ConvNormAct(2 * out_channels, out_channels), ConvNormAct(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
        x = adaptive_upsample(self.up, x, factor)[..., :skip.shape[2], :skip.shape[3], :skip.shape[4]]  # ceil-pooled odd sizes
        return self.convs(torch.cat([x, skip], dim=1))


def level_strides(patch_stride: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(h, w, d)`` strides of the decoder levels at in-plane strides 1, 2, 4, 8, 16, 32.

    Depth follows the in-plane scale from the patch grid's depth stride but never drops below 1,
    and the coarsest level pools depth only where the patch grid has more than one slice per token.
    """
    plane, depth = patch_stride[0], patch_stride[2]
    strides = [(t, t, max(1, depth * t // plane)) for t in (1, 2, 4, 8, 16)]
    return strides + [(2 * plane, 2 * plane, 2 * depth if depth > 1 else 1)]


def _factor(fine: Sequence[int], coarse: Sequence[int]) -> tuple[int, ...]:
    return tuple(c // f for f, c in zip(fine, coarse))


class SimpleFPN(nn.Module):
    """ViTDet's simple feature pyramid over four block taps (as PUMIT's BTCV setup).

    Each tap (``(N, C, h, w, d)`` at the patch grid) is instance-normalised, then brought to the
    level with in-plane stride 4 (two transposed convs), 8 (one), 16 (as is) or 32 (max-pool),
    with depth following :func:`level_strides`; a 1x1 lateral conv sets each level's width.
    """

    def __init__(self, embed_dim: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.InstanceNorm3d(embed_dim, affine=True) for _ in range(4))
        self.up4 = nn.ModuleList([nn.ConvTranspose3d(embed_dim, embed_dim, 2, 2), nn.ConvTranspose3d(embed_dim, embed_dim, 2, 2)])
        self.up4_norm = nn.Sequential(nn.InstanceNorm3d(embed_dim, affine=True), nn.GELU())
        self.up8 = nn.ConvTranspose3d(embed_dim, embed_dim, 2, 2)
        self.laterals = nn.ModuleList(
            nn.Sequential(nn.Conv3d(embed_dim, c, 1), nn.InstanceNorm3d(c), nn.LeakyReLU(0.01, inplace=True)) for c in channels)

    def forward(self, taps: Sequence[torch.Tensor], strides: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """``strides``: :func:`level_strides` of the patch grid; returns levels at strides[2:]."""
        s4, s8, s16, s32 = strides[2:]
        x4, x8, x16, x32 = (norm(t) for norm, t in zip(self.norms, taps))
        x4 = adaptive_upsample(self.up4[0], x4, _factor(s8, s16))
        x4 = adaptive_upsample(self.up4[1], self.up4_norm(x4), _factor(s4, s8))
        x8 = adaptive_upsample(self.up8, x8, _factor(s8, s16))
        x32 = F.max_pool3d(x32, kernel_size=_factor(s16, s32), ceil_mode=True)
        return [lateral(x) for lateral, x in zip(self.laterals, (x4, x8, x16, x32))]


class SegmentationDecoder(nn.Module):
    """Convolutional U-Net decoder: FPN levels (strides 4..32) plus two conv stages on the input
    image (strides 1 and 2) as skips; upsampled to full resolution, 1x1 conv to the classes."""

    def __init__(self, in_channels: int, channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvNormAct(in_channels, channels[0]), ConvNormAct(channels[0], channels[0]))
        self.down = nn.Conv3d(channels[0], channels[1], 3, padding=1)
        self.down_convs = nn.Sequential(nn.InstanceNorm3d(channels[1], affine=True), nn.LeakyReLU(0.01, inplace=True),
                                        ConvNormAct(channels[1], channels[1]))
        self.ups = nn.ModuleList(UpBlock(channels[i + 1], channels[i]) for i in range(5))
        self.out = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, image: torch.Tensor, levels: Sequence[torch.Tensor], strides: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        full = self.stem(image)
        half = self.down_convs(F.conv3d(full, self.down.weight, self.down.bias, stride=strides[1], padding=1))
        skips = [full, half, *levels]
        x = skips[-1]
        for i in reversed(range(5)):
            x = self.ups[i](x, skips[i], _factor(strides[i], strides[i + 1]))
        return self.out(x)


class SpadViT(nn.Module):
    """Spacing-adaptive ViT (SPAD-ViT) with an embedding, classification, segmentation or MIM head.

    Args:
        in_channels: input channels (upstream pre-training: 3, a gray image repeated; the bundle: 1).
        embed_dim, depth, num_heads: transformer width, blocks and heads (ViT-B: 768, 12, 12).
        mlp_hidden: SwiGLU hidden width (default upstream's ``int(embed_dim * 8 / 3)``, truncated:
            ViT-B 2048, ViT-L 2730).
        patch_size: in-plane patch edge and full depth taps (16).
        pos_embed_grid: ``(d, h, w)`` of the learned position table (upstream: 5, 10, 10).
        task: ``"embedding"`` (cls and mean patch token), ``"classification"`` (cls -> Linear),
            ``"segmentation"`` (taps -> simple FPN -> conv U-Net decoder) or ``"mim"`` (mask token
            and the head predicting tokenizer codes).
        num_classes: classes of the classification head.
        out_channels: output channels (classes) of the segmentation decoder.
        taps: blocks whose outputs feed the FPN; default: upstream's BTCV choice (3, 5, 7, 11 of
            12) scaled to ``depth``.
        decoder_channels: segmentation widths at in-plane strides 1, 2, 4, 8, 16, 32 (the last four
            are the FPN laterals; upstream BTCV: 32, 64, 128, 256, 512, 512).
        codebook_size: MIM head classes (the tokenizer's codebook).

    ``forward(x, spacing=None, aniso_d=None)``: ``x`` is ``(N, C, H, W, D)`` (a 2D image: D = 1) or
    ``(N, C, H, W)``; ``spacing`` the ``(x, y, z)`` voxel size in mm (one triple for the batch or
    ``(N, 3)``; every item must give the same aniso_d); without either the input is isotropic.
    H and W must be multiples of ``patch_size`` and D of the depth stride.
    """

    def __init__(self, in_channels: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_hidden: int | None = None, patch_size: int = 16, pos_embed_grid: Sequence[int] = (5, 10, 10),
                 task: str = "embedding", num_classes: int = 2, out_channels: int = 2, taps: Sequence[int] | None = None,
                 decoder_channels: Sequence[int] = (32, 64, 128, 256, 512, 512),
                 codebook_size: int = 1024, rope_depth_base: float = 2333.0, rope_base: float = 10000.0) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"embed_dim {embed_dim} must split into {num_heads} heads of a multiple of 4 channels")
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.task = task
        self.head_dim = embed_dim // num_heads
        self.rope_bases = (rope_depth_base, rope_base)
        self.patch_embed = AdaptivePatchEmbed(in_channels, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *pos_embed_grid))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_hidden or int(embed_dim * MLP_RATIO)) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if task == "mim":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.mim_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, codebook_size))
        elif task == "classification":
            self.head = nn.Linear(embed_dim, num_classes)
        elif task == "segmentation":
            self.taps = list(taps) if taps is not None else [min(round(t * depth / 12), depth - 1) for t in UPSTREAM_TAPS]
            if len(self.taps) != 4 or not all(0 <= t < depth for t in self.taps):
                raise ValueError(f"taps must be 4 block indices below {depth}, got {self.taps}")
            if len(decoder_channels) != 6:
                raise ValueError(f"decoder_channels needs 6 widths (strides 1, 2, 4, 8, 16, 32), got {list(decoder_channels)}")
            self.fpn = SimpleFPN(embed_dim, decoder_channels[2:])
            self.decoder = SegmentationDecoder(in_channels, decoder_channels, out_channels)

    # -- geometry -----------------------------------------------------------------------------------
    def patch_stride(self, aniso_d: int) -> tuple[int, int, int]:
        """``(h, w, d)`` voxels per token for ``aniso_d``."""
        return self.patch_size, self.patch_size, depth_stride(aniso_d, self.patch_size)

    def _to_internal(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(-1)
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W[, D]), got {tuple(x.shape)}")
        check_token_multiple(x, aniso_d, self.patch_size)
        return x.permute(0, 1, 4, 2, 3)

    # -- backbone -----------------------------------------------------------------------------------
    def tokens(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None, aniso_d: int | None = None,
               mask: torch.Tensor | None = None, return_taps: Sequence[int] = ()) -> tuple[torch.Tensor, tuple[int, int, int], list[torch.Tensor]]:
        """Normalised tokens ``(N, 1 + L, C)`` (cls first), the token grid ``(d, h, w)`` and raw block taps.

        ``mask``: ``(N, L)`` bool, True where a patch is replaced by the mask token (MIM).
        """
        aniso = batch_aniso_d(x, spacing, aniso_d)
        patches = self.patch_embed(self._to_internal(x, aniso), aniso)
        grid = tuple(patches.shape[2:])
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = tokens + resample_pos_embed(self.pos_embed, grid).flatten(2).transpose(1, 2)
        if mask is not None:  # mask tokens carry no absolute position (RoPE still places them)
            if not hasattr(self, "mask_token"):
                raise ValueError("a mask needs the MIM network (task='mim')")
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        angles = rope_angles(grid, self.head_dim, *self.rope_bases).to(device=x.device)
        cos = angles.cos().repeat_interleave(2, dim=-1).to(tokens.dtype)
        sin = angles.sin().repeat_interleave(2, dim=-1).to(tokens.dtype)
        outputs = {}
        for index, block in enumerate(self.blocks):
            tokens = block(tokens, cos, sin)
            if index in return_taps:
                outputs[index] = tokens
        return self.norm(tokens), grid, [outputs[index] for index in return_taps]

    def _feature_map(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Patch tokens ``(N, 1 + L, C)`` -> ``(N, C, h, w, d)``."""
        return tokens[:, 1:].transpose(1, 2).unflatten(2, grid).permute(0, 1, 3, 4, 2)

    def forward_features(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None,
                         aniso_d: int | None = None) -> torch.Tensor:
        """Normalised tokens ``(N, 1 + L, embed_dim)``, the cls token first."""
        return self.tokens(x, spacing, aniso_d)[0]

    def embed(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None, aniso_d: int | None = None) -> torch.Tensor:
        """``(N, 2 * embed_dim)``: the cls token, then the mean of the patch tokens (after the final norm)."""
        tokens = self.forward_features(x, spacing, aniso_d)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)

    def mim_logits(self, x: torch.Tensor, mask: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None,
                   aniso_d: int | None = None) -> torch.Tensor:
        """Codebook logits ``(N, L, codebook_size)`` of every patch token, ``mask`` ``(N, L)`` replacing patches."""
        tokens, _, _ = self.tokens(x, spacing, aniso_d, mask=mask)
        return self.mim_head(tokens[:, 1:])

    def forward(self, x: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None, aniso_d: int | None = None) -> torch.Tensor:
        if self.task == "segmentation":
            aniso = batch_aniso_d(x, spacing, aniso_d)
            _, grid, taps = self.tokens(x, aniso_d=aniso, return_taps=self.taps)
            strides = level_strides(self.patch_stride(aniso))
            coarsest = [math.ceil(n / s) for n, s in zip(x.shape[2:], strides[-1])] if x.ndim == 5 else [2]
            if math.prod(coarsest) < 2:
                raise ValueError(f"input {tuple(x.shape[2:])} is too small for segmentation: the stride-{strides[-1]} "
                                 "level would hold one voxel; use at least 48 voxels in-plane")
            levels = self.fpn([self._feature_map(t, grid) for t in taps], strides)
            image = x if x.ndim == 5 else x.unsqueeze(-1)
            logits = self.decoder(image, levels, strides)
            return logits if x.ndim == 5 else logits.squeeze(-1)
        if self.task == "classification":
            return self.head(self.forward_features(x, spacing, aniso_d)[:, 0])
        if self.task == "mim":
            raise ValueError("the MIM network is called through mim_logits(x, mask, ...)")
        return self.embed(x, spacing, aniso_d)


#: Parameters only the MIM network has; dropped when converting into another task's network.
MIM_KEYS = ("mask_token", "mim_head.")


def checkpoint_filter_fn(checkpoint: Mapping, model: SpadViT) -> dict[str, torch.Tensor]:
    """Map the authors' checkpoint (a Lightning file with ``state_dict``) or ours onto ``model``'s keys.

    Strips DataParallel's ``module.``, drops the tokenizer (``tokenizer.``) and anything that is
    not a tensor (optimizer state lives outside ``state_dict``); keeps ``mask_token`` and
    ``mim_head.*`` only for a MIM network, task heads only where ``model`` has them with the same
    shapes, and adapts the patch kernel to ``model``'s input channels (summed over the RGB kernel,
    divided by the new count). Any other key is kept so a strict load reports it.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError("checkpoint holds no state dict (expected a mapping of tensors or {'state_dict': ...})")
    expected = model.state_dict()
    converted = {}
    for key, value in state.items():
        key = re.sub(r"^(module\.)+", "", key)
        if not isinstance(value, torch.Tensor) or key.startswith("tokenizer."):
            continue
        if key.startswith(MIM_KEYS) and model.task != "mim":
            continue
        if key.startswith(("head.", "fpn.", "decoder.")) and (key not in expected or expected[key].shape != value.shape):
            continue
        converted[key] = value
    if not converted:
        raise ValueError("checkpoint state dict holds no SPAD-ViT tensors")
    if "patch_embed.proj.weight" in converted:
        converted = adapt_input_channels(converted, model.in_channels, key="patch_embed.proj.weight")
    return converted
