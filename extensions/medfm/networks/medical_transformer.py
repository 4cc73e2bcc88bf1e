"""Medical Transformer (Jun et al., arXiv 2104.13633): a brain MRI volume as three views of 2D slices.

Every slice of every view goes through one 2D ResNet-18 (written as ``Conv3d`` with (k, k, 1)
kernels, so a whole view is encoded in one call) to a 64-d slice embedding; one small transformer,
shared by the views, turns each view's sequence of slice embeddings into contextual embeddings.
Pre-training trains the encoder with a triplet loss (stage 1), then the transformer to predict
the embeddings of masked slices (stage 2), see :mod:`medfm.workflows.medical_transformer`.

Views of a channel-first RAS volume ``(B, C, X, Y, Z)`` (MNI: 96 x 114 x 96 after 2x pooling):
axial slices are the Z planes, sagittal the X planes, coronal the Y planes. Sequences are
concatenated in that order (``VIEWS``) wherever one tensor holds all slices, e.g. the
``(B, Z + X + Y)`` slice masks.

Downstream fusion (the paper's is unpublished): the volume embedding is the concatenation of the
three views' mean contextual slice embeddings (3 x 64 = 192-d); classification and regression
heads are an MLP on it. Segmentation decodes each view's encoder maps in-plane with U-Net skips,
adds the view's contextual slice embedding to the deepest map, and averages the three views'
logits on the volume grid (a 2.5D ensemble).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MedicalTransformer", "SliceEncoder", "SliceTransformer", "VIEWS", "checkpoint_filter_fn",
           "mean_embedding_baseline"]

VIEWS = ("axial", "sagittal", "coronal")


def _slice_conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv3d:
    """A 2D convolution applied to every slice of a (B, C, H, W, S) stack."""
    return nn.Conv3d(in_channels, out_channels, kernel_size=(kernel, kernel, 1), stride=(stride, stride, 1),
                     padding=(kernel // 2, kernel // 2, 0), bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block on slice stacks; instance norm without affine parameters, as upstream."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _slice_conv(in_channels, out_channels, 3, stride)
        self.bn1 = nn.InstanceNorm3d(out_channels)
        self.conv2 = _slice_conv(out_channels, out_channels, 3)
        self.bn2 = nn.InstanceNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(_slice_conv(in_channels, out_channels, 1, stride), nn.InstanceNorm3d(out_channels))
            if stride != 1 or in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


#: How the deepest ``(h, w)`` map of a slice becomes one vector: ``"window"`` is the authors'
#: ``Multiview_MEP`` (a fixed ``AvgPool3d((3, 3, 1))``: on the 96 x 114 planes, a 3 x 4 map, it
#: averages the first 3 of 4 columns); ``"plane"`` averages the whole map, as the authors'
#: stage-1 network does.
SLICE_POOLING = ("window", "plane")
#: Upstream's window; its one window covers maps of 3 to 5 cells per side.
POOL_WINDOW = 3


class SliceEncoder(nn.Module):
    """2D ResNet-18 over the slices of a stack: ``(B, C, H, W, S)`` -> ``(B, S, embed_dim)``.

    Instance norm statistics span all slices of the stack (upstream's ``InstanceNorm3d``), so a
    slice's embedding depends slightly on the stack it is encoded in. ``slice_pooling``: see
    ``SLICE_POOLING``. With ``"window"``, maps under 3 cells per side (planes under 65 pixels,
    which upstream cannot run) are averaged whole, and maps over 5 (planes over 160 pixels,
    where upstream's linear layer would not fit) are refused.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 128),
                 blocks: Sequence[int] = (2, 2, 2, 2), embed_dim: int = 64, slice_pooling: str = "window") -> None:
        super().__init__()
        if slice_pooling not in SLICE_POOLING:
            raise ValueError(f"slice_pooling must be one of {SLICE_POOLING}, got {slice_pooling!r}")
        self.slice_pooling = slice_pooling
        self.pool_window = POOL_WINDOW
        self.conv1 = _slice_conv(in_channels, widths[0], 7, stride=2)
        self.bn1 = nn.InstanceNorm3d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=(3, 3, 1), stride=(2, 2, 1), padding=(1, 1, 0))
        layers, previous = [], widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(*[BasicBlock(previous if i == 0 else width, width, stride if i == 0 else 1)
                                          for i in range(count)]))
            previous = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(widths[-1], embed_dim)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stem output (1/2 in-plane) and the four stages (1/4 .. 1/32), each ``(B, C_i, h_i, w_i, S)``."""
        stem = self.relu(self.bn1(self.conv1(x)))
        stage1 = self.layer1(self.maxpool(stem))
        stage2 = self.layer2(stage1)
        stage3 = self.layer3(stage2)
        return [stem, stage1, stage2, stage3, self.layer4(stage3)]

    def pool(self, deepest: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w, S)`` deepest map -> ``(B, C, S)``."""
        if self.slice_pooling == "window":
            window = self.pool_window
            rows, columns = deepest.shape[2], deepest.shape[3]
            if max(rows, columns) >= 2 * window:
                raise ValueError(f"the slice planes give a {rows}x{columns} map at the last stage; the authors' "
                                 f"{window}x{window} pooling window covers maps up to "
                                 f"{2 * window - 1}x{2 * window - 1} (planes up to 160 pixels); "
                                 "use slice_pooling='plane' for larger planes")
            deepest = deepest[:, :, :window, :window]
        return deepest.mean(dim=(2, 3))

    def embed(self, deepest: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w, S)`` deepest map -> ``(B, S, embed_dim)``."""
        return self.fc(self.pool(deepest).transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.feature_maps(x)[-1])


class MultiHeadAttention(nn.Module):
    """Self-attention whose heads are wider than the model (upstream: 4 heads of 256 on a 64-d model)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_linear = nn.Linear(dim, num_heads * head_dim)
        self.k_linear = nn.Linear(dim, num_heads * head_dim)
        self.v_linear = nn.Linear(dim, num_heads * head_dim)
        self.out = nn.Linear(num_heads * head_dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        split = [batch, length, self.num_heads, self.head_dim]
        q = self.q_linear(x).view(split).transpose(1, 2)
        k = self.k_linear(x).view(split).transpose(1, 2)
        v = self.v_linear(x).view(split).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear_2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.dropout(F.relu(self.linear_1(x))))


class StdNorm(nn.Module):
    """The authors' feature norm: ``weight * (x - mean) / (std + eps) + bias`` over the last axis.

    Unlike ``nn.LayerNorm``, the standard deviation is the unbiased one (``n - 1``) and ``eps``
    is added to it, not to the variance (upstream names ``weight`` ``alpha``).
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        return self.weight * centred / (x.std(dim=-1, keepdim=True) + self.eps) + self.bias


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm_1 = StdNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, head_dim, dropout)
        self.dropout_1 = nn.Dropout(dropout)
        self.norm_2 = StdNorm(dim)
        self.ff = FeedForward(dim, ff_dim, dropout)
        self.dropout_2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout_1(self.attn(self.norm_1(x)))
        return x + self.dropout_2(self.ff(self.norm_2(x)))


def slice_positions(length: int, dim: int) -> torch.Tensor:
    """The authors' fixed ``(length, dim)`` slice-position table.

    Column ``j`` of row ``p`` is ``sin(p / length ** (2 j / dim))`` for even ``j`` and
    ``cos(p / length ** (2 j / dim))`` for odd ``j``: a sine table whose base is the table length
    (114 upstream) rather than Vaswani et al.'s 10000, and whose cosine columns take their own
    column index (not the sine's) in the exponent.
    """
    position = torch.arange(length, dtype=torch.float64)[:, None]
    exponent = 2 * torch.arange(dim, dtype=torch.float64) / dim
    angles = position / float(length) ** exponent
    return torch.where(torch.arange(dim) % 2 == 0, angles.sin(), angles.cos()).float()


class SliceTransformer(nn.Module):
    """Contextual slice embeddings of one view: ``(B, S, dim)`` and the view index -> ``(B, S, dim)``.

    Inputs are scaled by sqrt(dim), then the view embedding and the slice-position table
    (:func:`slice_positions`, a buffer saved with the weights as upstream's ``pe``) are added.
    ``final_norm=False`` returns the residual stream before the closing layer norm, divided by
    the input scale (so it starts as the input plus the layers' updates): masked prediction
    regresses encoder embeddings from there, because a layer norm's output has the same norm for
    every slice and cannot match targets whose magnitude varies from slice to slice.
    """

    def __init__(self, dim: int = 64, num_heads: int = 4, head_dim: int = 256, ff_dim: int = 128,
                 num_layers: int = 1, dropout: float = 0.1, max_slices: int = 114, num_views: int = len(VIEWS)) -> None:
        super().__init__()
        self.view_embedding = nn.Embedding(num_views, dim)
        self.register_buffer("positions", slice_positions(max_slices, dim))
        self.layers = nn.ModuleList([EncoderLayer(dim, num_heads, head_dim, ff_dim, dropout) for _ in range(num_layers)])
        self.norm = StdNorm(dim)
        self.scale = math.sqrt(dim)

    def forward(self, slices: torch.Tensor, view: int, final_norm: bool = True) -> torch.Tensor:
        length = slices.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"{length} slices in one view, the position table has {self.positions.shape[0]}")
        x = slices * self.scale + self.positions[:length] + self.view_embedding.weight[view]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) if final_norm else x / self.scale


class SegmentationDecoder(nn.Module):
    """In-plane U-Net decoder over one view's encoder maps (upsampling (2, 2, 1) per step)."""

    def __init__(self, encoder_widths: Sequence[int], embed_dim: int, out_channels: int, width: int = 16) -> None:
        super().__init__()
        stem, *stages = encoder_widths  # stem (1/2), stages at 1/4, 1/8, 1/16, 1/32
        self.context = nn.Linear(embed_dim, stages[-1])
        skips = [stages[-2], stages[-3], stages[-4], stem]
        widths = [max(width, w // 2) for w in skips]
        self.up = nn.ModuleList()
        previous = stages[-1]
        for skip, out in zip(skips, widths):
            self.up.append(nn.Sequential(_slice_conv(previous + skip, out, 3), nn.InstanceNorm3d(out, affine=True),
                                         nn.LeakyReLU(inplace=True)))
            previous = out
        self.head = nn.Conv3d(previous, out_channels, kernel_size=1)

    def forward(self, maps: list[torch.Tensor], context: torch.Tensor, size: list[int]) -> torch.Tensor:
        """``maps`` from :meth:`SliceEncoder.feature_maps`, ``context`` ``(B, S, dim)`` -> ``(B, K, *size)``."""
        x = maps[-1] + self.context(context).transpose(1, 2)[:, :, None, None, :]
        for index, step in enumerate(self.up):
            skip = maps[3 - index]
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = step(torch.cat([x, skip], dim=1))
        return self.head(F.interpolate(x, size=size, mode="trilinear", align_corners=False))


def mean_embedding_baseline(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Predict every masked slice of a view by the mean of the view's visible slice embeddings.

    ``target`` ``(B, S, D)``, ``mask`` ``(B, S)`` bool -> ``(B, S, D)`` predictions.
    """
    visible = (~mask).unsqueeze(-1).to(target.dtype)
    mean = (target * visible).sum(dim=1, keepdim=True) / visible.sum(dim=1, keepdim=True).clamp(min=1)
    return mean.expand_as(target)


class MedicalTransformer(nn.Module):
    """Slice encoder + view transformer for ``(B, C, X, Y, Z)`` RAS brain MRI (MNI: 96 x 114 x 96).

    ``forward`` returns, by ``task``: ``"embedding"`` the ``(B, 3 * embed_dim)`` volume embedding;
    ``"classification"`` / ``"regression"`` ``(B, num_classes)`` logits or values from an MLP on it;
    ``"segmentation"`` ``(B, out_channels, X, Y, Z)`` logits.

    Args:
        in_channels: image channels (1 for T1).
        num_classes: classes (classification) or targets (regression) of the MLP head.
        out_channels: output channels (classes) of the segmentation decoder.
        task: ``"embedding"``, ``"classification"``, ``"regression"`` or ``"segmentation"``.
        widths: slice encoder widths of the four ResNet stages.
        embed_dim: slice embedding size, also the transformer's model size.
        num_heads, head_dim, ff_dim, num_layers, dropout: transformer sizes (defaults: the paper's).
        max_slices: longest view the position table covers, also the table's base (upstream's
            ``max_slicelen``, 114: the longest view of the 96 x 114 x 96 grid).
        slice_pooling: ``"window"`` (the authors' network) or ``"plane"``, see ``SLICE_POOLING``.
        head_hidden: hidden units of the classification / regression MLP.
    """

    TASKS = ("embedding", "classification", "regression", "segmentation")

    def __init__(self, in_channels: int = 1, num_classes: int = 0, out_channels: int = 0, task: str = "embedding",
                 widths: Sequence[int] = (16, 32, 64, 128), embed_dim: int = 64, num_heads: int = 4,
                 head_dim: int = 256, ff_dim: int = 128, num_layers: int = 1, dropout: float = 0.1,
                 max_slices: int = 114, head_hidden: int = 64, slice_pooling: str = "window") -> None:
        super().__init__()
        if task not in self.TASKS:
            raise ValueError(f"task must be one of {self.TASKS}, got {task!r}")
        outputs = {"classification": ("num_classes", num_classes), "regression": ("num_classes", num_classes),
                   "segmentation": ("out_channels", out_channels)}
        if task in outputs and outputs[task][1] < 1:
            raise ValueError(f"task {task!r} needs {outputs[task][0]} >= 1")
        self.task = task
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.encoding = SliceEncoder(in_channels, widths, embed_dim=embed_dim, slice_pooling=slice_pooling)
        self.transformer = SliceTransformer(embed_dim, num_heads, head_dim, ff_dim, num_layers, dropout, max_slices)
        self.head = (
            nn.Sequential(nn.Linear(len(VIEWS) * embed_dim, head_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                          nn.Linear(head_hidden, num_classes))
            if task in ("classification", "regression") else None
        )
        self.decoder = (SegmentationDecoder([widths[0], *widths], embed_dim, out_channels)
                        if task == "segmentation" else None)

    @staticmethod
    def view_stacks(x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, X, Y, Z)`` -> axial ``(B, C, X, Y, Z)``, sagittal ``(B, C, Z, Y, X)``, coronal ``(B, C, X, Z, Y)``
        slice stacks (slices on the last axis)."""
        return [x, x.permute(0, 1, 4, 3, 2), x.permute(0, 1, 2, 4, 3)]

    def mask_embedding(self, stack: torch.Tensor) -> torch.Tensor:
        """``(1, dim)`` embedding of a constant -1 slice shaped like a slice of ``stack`` (the [MASK] token)."""
        # two identical slices: the same instance-norm statistics as one, and never a 1x1x1 map,
        # which instance norm refuses (small slice planes reach 1x1 at the last stage)
        blank = torch.full((1, self.in_channels, stack.shape[2], stack.shape[3], 2), -1.0,
                           dtype=stack.dtype, device=stack.device)
        return self.encoding(blank)[:, 0]

    def slice_embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder output per view, ``[(B, Z, dim), (B, X, dim), (B, Y, dim)]`` (no context)."""
        return [self.encoding(stack) for stack in self.view_stacks(x)]

    def contextual_embeddings(self, slices: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.transformer(view_slices, view) for view, view_slices in enumerate(slices)]

    def volume_embedding(self, contextual: list[torch.Tensor]) -> torch.Tensor:
        """``(B, 3 * dim)``: each view's mean contextual slice embedding, concatenated."""
        return torch.cat([view.mean(dim=1) for view in contextual], dim=1)

    def encoder_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3 * dim)`` from the encoder alone (mean slice embedding per view): stage 1's triplet space."""
        return torch.cat([view.mean(dim=1) for view in self.slice_embeddings(x)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Contextual slice embeddings of the three views, ``(B, Z + X + Y, dim)`` in ``VIEWS`` order."""
        return torch.cat(self.contextual_embeddings(self.slice_embeddings(x)), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3 * dim)``: the volume embedding ``medfm embed`` writes, for a network of any task."""
        return self.volume_embedding(self.contextual_embeddings(self.slice_embeddings(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoder is not None:
            logits = torch.zeros(0)
            for view, stack in enumerate(self.view_stacks(x)):
                maps = self.encoding.feature_maps(stack)
                context = self.transformer(self.encoding.embed(maps[-1]), view)
                # each view's permutation swaps two axes, so applying it again maps back to (X, Y, Z)
                view_logits = self.view_stacks(self.decoder(maps, context, list(stack.shape[2:])))[view]
                logits = view_logits if view == 0 else logits + view_logits
            return logits / 3.0  # the mean over the three views
        embedding = self.embed(x)
        return embedding if self.head is None else self.head(embedding)

    def masked_prediction(self, x: torch.Tensor, slice_masks: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Stage 2 pretext: replace the masked slices' embeddings by the [MASK] embedding and predict them.

        ``slice_masks`` is ``(B, Z + X + Y)`` bool in ``VIEWS`` order. Returns per view the
        ``predicted`` and ``target`` embeddings ``(B, S, dim)`` (targets without gradient) and the
        view's ``masks`` ``(B, S)``.
        """
        stacks = self.view_stacks(x)
        lengths = [stack.shape[-1] for stack in stacks]
        if slice_masks.shape[-1] != sum(lengths):
            raise ValueError(f"slice_masks cover {slice_masks.shape[-1]} slices, the volume has {sum(lengths)} "
                             f"({' + '.join(f'{n} {v}' for n, v in zip(lengths, VIEWS))})")
        masks = list(slice_masks.bool().split(lengths, dim=-1))
        predicted, targets = [], []
        for view, (stack, mask) in enumerate(zip(stacks, masks)):
            target = self.encoding(stack)
            corrupted = torch.where(mask[..., None], self.mask_embedding(stack).expand_as(target), target)
            predicted.append(self.transformer(corrupted, view, final_norm=False))
            targets.append(target.detach())
        return {"predicted": predicted, "target": targets, "masks": masks}


    @torch.no_grad()
    def embed_with_quality(self, x: torch.Tensor, mask_every: int = 10) -> dict[str, torch.Tensor]:
        """Volume embedding ``(B, 3 * dim)`` and a masked-slice error ratio ``(B, 1)`` as a quality score.

        In pass ``k`` of ``mask_every`` the slices whose index is ``k`` modulo ``mask_every`` are
        masked (10% per view by default, as in pre-training), so every slice is predicted once.
        The score is the squared error of those predictions divided by that of
        :func:`mean_embedding_baseline`: 1 is no better than the mean of the visible slices;
        the further below 1, the more the volume's slices follow from their context the way
        the pre-training volumes' did.
        """
        slices = self.slice_embeddings(x)
        embedding = self.volume_embedding(self.contextual_embeddings(slices))
        model_error = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        baseline_error = torch.zeros_like(model_error)
        for view, (stack, target) in enumerate(zip(self.view_stacks(x), slices)):
            blank = self.mask_embedding(stack)
            for offset in range(mask_every):
                mask = (torch.arange(target.shape[1], device=x.device) % mask_every == offset).expand(target.shape[:2])
                predicted = self.transformer(torch.where(mask[..., None], blank.expand_as(target), target), view,
                                             final_norm=False)
                squared = ((predicted - target) ** 2).sum(-1)
                baseline = ((mean_embedding_baseline(target, mask) - target) ** 2).sum(-1)
                model_error += (squared * mask).sum(1)
                baseline_error += (baseline * mask).sum(1)
        return {"embedding": embedding, "masked_slice_error": (model_error / baseline_error.clamp(min=1e-12))[:, None]}


def checkpoint_filter_fn(checkpoint: Mapping, model: MedicalTransformer) -> dict[str, torch.Tensor]:
    """Map a checkpoint of the authors' ``Multiview_MEP`` (or of this network) onto ``model``'s keys.

    Accepts ``{"state_dict": ...}`` or a bare state dict and strips DataParallel's ``module.``.
    Upstream names its transformer ``TF.encoding_block`` with ``Norm`` layers holding ``alpha`` /
    ``bias``, its view embedding ``TF.pos_embed.seg_embedding``, and its position table
    ``TF.pos_embed.pe`` ``(1, L, dim)`` (loaded as it is, since upstream computes with the stored
    table). Downstream heads (``head.``, ``decoder.``)
    are kept only where ``model`` has them with the same shapes, so a fine-tuned checkpoint seeds
    a network for another task; any other key is kept, so a strict load reports it.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    renames = [(r"^module\.", ""), (r"^TF\.pos_embed\.seg_embedding\.", "transformer.view_embedding."),
               (r"^TF\.pos_embed\.pe$", "transformer.positions"), (r"^TF\.encoding_block\.", "transformer."),
               (r"^transformer\.(.*)\.alpha$", r"transformer.\1.weight")]
    expected = model.state_dict()
    converted = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if key == "transformer.positions" and value.ndim == 3 and value.shape[0] == 1:
            value = value[0]
        if key.startswith(("head.", "decoder.")) and (key not in expected or expected[key].shape != value.shape):
            continue
        converted[key] = value
    return converted
