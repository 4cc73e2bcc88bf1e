"""3D ResNet-18 of VDT supervised 3D pre-training (Zhang et al., arXiv 2201.01426).

MONAI's own ``ResNet`` with :data:`RESNET18_ARGS` has the upstream key names and shapes
(120 backbone tensors, 33,160,000 parameters; MONAI adds only ``fc``); :class:`VDTResNet3D` adds
only the feature interface every medfm network has (``forward_features`` and ``embed``). Pre-training on 2D images read as 3-slice volumes keeps the depth:
every stride is (1, 2, 2) there (stem, max-pool and the first block of stages 2-4), which
:func:`vdt_resnet18` sets on the same modules, so weights move freely between both geometries.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, get_inplanes

__all__ = ["RESNET18_ARGS", "VDTResNet3D", "vdt_resnet18", "checkpoint_filter_fn"]

#: Arguments that make MONAI's resnet18 key-compatible with the upstream 3D ResNet-18.
RESNET18_ARGS = {"spatial_dims": 3, "n_input_channels": 1, "conv1_t_size": 7, "conv1_t_stride": 2,
                 "shortcut_type": "B", "bias_downsample": False}
DEPTH_KEEPING_STRIDE = (1, 2, 2)


class VDTResNet3D(ResNet):
    """MONAI's 3D ``ResNet`` (same modules and state dict) with ``forward_features`` and ``embed``."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map ``(N, 512, D/32, H/32, W/32)`` for a (N, C, D, H, W) input (isotropic strides)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 512)``: the globally pooled features before ``fc``, the vector ``medfm embed`` writes."""
        return self.avgpool(self.forward_features(x)).flatten(1)


def vdt_resnet18(num_classes: int = 1000, pretraining_geometry: bool = False, **kwargs) -> VDTResNet3D:
    """MONAI 3D ResNet-18 laid out like the upstream network.

    Args:
        num_classes: size of ``fc`` (1000 for ImageNet pre-training).
        pretraining_geometry: strides (1, 2, 2) everywhere, for (B, 1, 3, H, W) inputs made by
            :class:`medfm.transforms.VariableDimensionTransform`: a 3x224x224 input ends as
            (512, 3, 7, 7) features. Off: isotropic strides, as for fine-tuning on 3D scans.
        kwargs: further ``monai.networks.nets.resnet18`` arguments (they override
            :data:`RESNET18_ARGS`, e.g. ``feed_forward=False`` for a network without ``fc`` that
            returns the pooled 512-d embedding).
    """
    network = VDTResNet3D(ResNetBlock, [2, 2, 2, 2], get_inplanes(), **{**RESNET18_ARGS, "num_classes": num_classes, **kwargs})
    if pretraining_geometry:
        network.conv1.stride = DEPTH_KEEPING_STRIDE
        network.maxpool.stride = DEPTH_KEEPING_STRIDE
        for stage in (network.layer2, network.layer3, network.layer4):
            stage[0].conv1.stride = DEPTH_KEEPING_STRIDE
            stage[0].downsample[0].stride = DEPTH_KEEPING_STRIDE
    return network


def checkpoint_filter_fn(checkpoint: Mapping, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Turn an upstream (mmcls-style) checkpoint into ``model``'s state dict keys.

    Accepts ``{"state_dict": ..., "meta": ...}`` or a bare state dict; strips ``module.`` and
    ``backbone.`` prefixes; maps an mmcls classification head (``head.fc.*``) onto ``fc.*``. A
    classification head is kept only where ``model`` has one of the same shape (a network with
    another class count, none, or a segmentation decoder starts its head fresh). Other keys are
    kept, so a strict load reports them.
    """
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    expected = model.state_dict()
    converted = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        if key.startswith("head."):
            key = "fc." + key.rsplit(".", 1)[-1]
        if key.startswith("fc.") and (key not in expected or expected[key].shape != value.shape):
            continue
        converted[key] = value
    return converted
