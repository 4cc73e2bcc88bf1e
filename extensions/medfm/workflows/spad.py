"""SPAD-ViT workflow pieces: spacing-carrying batches, aniso_d-grouped batches, tokenizer and MIM losses."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from monai.inferers import Inferer
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..engines.utils import rank_seed
from ..networks.spad_tokenizer import SpadTokenizer
from ..transforms.spad import image_aniso_d, voxel_spacing
from .batches import plain_tensor

__all__ = ["PrepareSpadBatch", "PrepareMIMBatch", "AnisoGroupedBatchSampler", "TokenizerLoss", "MaskedTokenLoss"]


class PrepareSpadBatch(PrepareBatch):
    """Inputs, targets and the batch's voxel spacing, which goes to the network as ``spacing``.

    The spacing is read from the image's affine before the MetaTensor is made plain, so every
    inferer (simple or sliding-window) hands SPAD-ViT the geometry it adapts to. The image stays a
    MetaTensor (evaluators' postprocessing names outputs after its source). ``label_key`` None
    gives no targets (inference).
    """

    def __init__(self, image_key: str = "image", label_key: str | None = "label") -> None:
        self.image_key, self.label_key = image_key, label_key

    def spacing(self, batchdata: Mapping, device) -> torch.Tensor:
        return voxel_spacing(batchdata[self.image_key]).reshape(-1, 3).to(device)

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
        spacing = self.spacing(batchdata, device)
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking)
        label = plain_tensor(batchdata[self.label_key], device, non_blocking) if self.label_key else None
        return image, label, (), {"spacing": spacing}


class SpacingInferer(Inferer):
    """Run another inferer with the input's voxel spacing (from its affine) as the network's ``spacing``.

    For runners that call ``inferer(inputs, network)`` with no ``PrepareBatch`` (MONAI Label's
    inference tasks), so SPAD-ViT still sees the geometry it adapts to. A ``spacing`` already
    given (by :class:`PrepareSpadBatch` in MONAI's evaluators) is passed on unchanged; an input
    without an affine is an error, never a silent isotropic guess.
    """

    def __init__(self, inferer: Inferer) -> None:
        super().__init__()
        self.inferer = inferer

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs):
        if "spacing" not in kwargs and "aniso_d" not in kwargs:
            kwargs["spacing"] = voxel_spacing(inputs).reshape(-1, 3).to(inputs.device)
        return self.inferer(inputs, network, *args, **kwargs)


class PrepareMIMBatch(PrepareSpadBatch):
    """Masked image modelling: the frozen tokenizer's code distributions become the targets.

    Inputs: the image in [0, 1] and a random token mask, passed to ``SpadViT.mim_logits``; targets:
    ``(probabilities, mask)``. Each item gets exactly ``round(mask_ratio * L)`` masked tokens
    (PUMIT: 0.55), drawn from a generator seeded with ``seed`` plus the process's rank, so runs repeat
    and the ranks of a distributed run mask differently. The mask is drawn
    here, after collation, because only then is the token grid of the batch known. The tokenizer
    sees the image scaled to [-1, 1], as it was trained.
    """

    def __init__(self, tokenizer: SpadTokenizer, mask_ratio: float = 0.55, seed: int = 0, image_key: str = "image") -> None:
        super().__init__(image_key, None)
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.mask_ratio = mask_ratio
        self.generator = torch.Generator().manual_seed(rank_seed(seed))

    def random_mask(self, items: int, tokens: int) -> torch.Tensor:
        """``(items, tokens)`` bool with ``round(mask_ratio * tokens)`` (at least one) True per row."""
        ranks = torch.rand(items, tokens, generator=self.generator).argsort(dim=1).argsort(dim=1)
        return ranks < max(1, round(self.mask_ratio * tokens))

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        kwargs = {"spacing": self.spacing(batchdata, device)}
        image = plain_tensor(batchdata[self.image_key], device, non_blocking)
        with torch.no_grad():
            probabilities, _, _ = self.tokenizer.to(image.device).code_probabilities(image * 2 - 1, **kwargs)
        mask = self.random_mask(*probabilities.shape[:2]).to(image.device)
        return image, (probabilities, mask), (mask,), kwargs


class AnisoGroupedBatchSampler(Sampler[list[int]]):
    """Batches whose items share one aniso_d (SPAD-ViT adapts to one depth stride per batch) and
    one shape (so they stack without padding: a 2D image and a 40-slice volume never meet).

    Each item's aniso_d and shape are read once from ``dataset[i][image_key]``; spacing and the
    size of a fixed-size random crop do not change from draw to draw. Items are shuffled within
    their group every epoch (``seed`` + epoch), and the groups' batches are interleaved.

    Distributed (``num_replicas`` > 1; by default the process group's size and rank when one is
    initialised): every process draws the same batches and takes every ``num_replicas``-th one,
    so ranks get whole batches and different ones. Batches are repeated from the start until
    every rank has the same count, as ``DistributedSampler`` pads, because DDP needs the same
    number of steps on every rank; only those repeats are seen twice in an epoch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, image_key: str = "image", shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.num_replicas = num_replicas or (torch.distributed.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.epoch = 0
        self.groups: dict[tuple, list[int]] = {}
        for index in range(len(dataset)):
            image = dataset[index][image_key]
            self.groups.setdefault((image_aniso_d(image), tuple(image.shape)), []).append(index)

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of ``epoch`` next (as ``DistributedSampler.set_epoch``; for a resumed run)."""
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        batches = []
        for members in self.groups.values():
            members = list(members)
            if self.shuffle:
                rng.shuffle(members)
            chunks = [members[i:i + self.batch_size] for i in range(0, len(members), self.batch_size)]
            batches += [c for c in chunks if len(c) == self.batch_size or not self.drop_last]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _batches(self) -> list[list[int]]:
        batches = self._all_batches()
        if self.num_replicas == 1:
            return batches
        if not batches:
            return []
        per_rank = -(-len(batches) // self.num_replicas)
        padded = (batches * per_rank)[:per_rank * self.num_replicas]
        return padded[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self._batches())


class TokenizerLoss(nn.Module):
    """SPAD-VT training loss: ``L1 + quant_weight * usage + entropy_weight * entropy [+ perceptual]``.

    Takes the tokenizer's output dict and the input image ([-1, 1]). ``perceptual_weight`` > 0
    adds MONAI's LPIPS-style ``PerceptualLoss`` on 2D slices (its network weights are downloaded
    from torch hub the first time; that fails offline). The paper's hinge GAN term is not built.
    ``components`` holds the last step's terms.
    """

    def __init__(self, quant_weight: float = 0.03, entropy_weight: float = 1.0, perceptual_weight: float = 0.0) -> None:
        super().__init__()
        self.quant_weight, self.entropy_weight, self.perceptual_weight = quant_weight, entropy_weight, perceptual_weight
        self.perceptual = None
        if perceptual_weight > 0:
            from monai.losses import PerceptualLoss

            self.perceptual = PerceptualLoss(spatial_dims=3, network_type="alex", is_fake_3d=True, fake_3d_ratio=0.5)
        self.components: dict[str, float] = {}

    def forward(self, output: Mapping[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        reconstruction = output["reconstruction"]
        l1 = F.l1_loss(reconstruction, target)
        usage, entropy = SpadTokenizer.usage_and_entropy(output["probabilities"])
        loss = l1 + self.quant_weight * usage + self.entropy_weight * entropy
        components = {"l1": l1, "usage": usage, "entropy": entropy}
        if self.perceptual is not None:
            components["perceptual"] = self.perceptual(reconstruction.float(), target.float())
            loss = loss + self.perceptual_weight * components["perceptual"]
        self.components = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in components.items()},
                           "codes_used": float((output["probabilities"].argmax(-1).unique().numel()))}
        return loss


class MaskedTokenLoss(nn.Module):
    """MIM loss: cross-entropy between predicted code logits and the tokenizer's soft codes, on masked tokens.

    ``components``: the loss and the accuracy of the predicted most likely code.
    """

    def __init__(self) -> None:
        super().__init__()
        self.components: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        probabilities, mask = targets
        loss = F.cross_entropy(logits[mask], probabilities[mask])
        with torch.no_grad():
            accuracy = (logits[mask].argmax(-1) == probabilities[mask].argmax(-1)).float().mean()
        self.components = {"masked_ce": float(loss.detach()), "top1_code_accuracy": float(accuracy)}
        return loss
