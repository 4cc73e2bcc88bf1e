"""Losses and batch preparation for the two Medical Transformer pre-training stages.

Stage 1 (triplet): each batch item is a volume augmented twice (``image``, ``positive``) with its
subject index; :class:`PrepareTripletBatch` stacks both copies so one forward pass embeds all,
and :class:`BatchTripletLoss` picks each anchor's negative from the other subjects in the batch.
Stage 2 (masked encoding-vector prediction): :class:`PrepareMaskedSliceBatch` passes the slice
masks to ``MedicalTransformer.masked_prediction``; :class:`MaskedEmbeddingLoss` scores it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.engines.utils import PrepareBatch
from torch import nn

from ..networks.medical_transformer import VIEWS, mean_embedding_baseline
from .batches import plain_tensor

__all__ = ["BatchTripletLoss", "MaskedEmbeddingLoss", "PrepareMaskedSliceBatch", "PrepareTripletBatch",
           "subject_indices"]


class BatchTripletLoss(nn.Module):
    """Triplet margin loss over a batch of ``2B`` embeddings: anchors first, their positives second.

    Each anchor's negative is the closest embedding (hardest negative) of another subject in the
    batch; anchors whose batch holds no other subject are left out (a batch of one subject gives
    a zero loss). ``components`` holds the loss, the fraction of triplets already satisfying the
    margin and the fraction of anchors that had a negative, for logging.

    Args:
        margin: the triplet margin (1 in the paper).
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin
        self.components: dict[str, float] = {}

    def forward(self, embeddings: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
        count = embeddings.shape[0] // 2
        anchors, positives = embeddings[:count], embeddings[count:]
        distances = torch.cdist(anchors, embeddings)
        other_subject = subjects[:count, None] != subjects[None, :]
        usable = other_subject.any(dim=1)
        if not bool(usable.any()):
            # a shuffled batch may hold one subject only (several scans of one brain): nothing to
            # contrast, so the step changes nothing; the zero keeps the graph for the optimiser
            self.components = {"triplet": 0.0, "satisfied": 0.0, "usable_anchors": 0.0}
            return embeddings.sum() * 0.0
        hardest = distances.masked_fill(~other_subject, float("inf")).argmin(dim=1)
        loss = F.triplet_margin_loss(anchors[usable], positives[usable], embeddings[hardest[usable]], margin=self.margin)
        with torch.no_grad():
            positive_distance = (anchors - positives).norm(dim=1)
            negative_distance = distances.gather(1, hardest[:, None])[:, 0]
            satisfied = (negative_distance - positive_distance > self.margin)[usable].float().mean()
            self.components = {"triplet": float(loss), "satisfied": float(satisfied),
                               "usable_anchors": float(usable.float().mean())}
        return loss


def subject_indices(datalist: list[dict], minimum: int = 2) -> list[dict]:
    """Copies of the items with ``subject`` replaced by an index (sorted names; default: the image path).

    Several scans of one brain share a subject name, so they are never each other's negatives.
    Fewer than ``minimum`` subjects is an error: a triplet loss needs two.
    """
    names = [str(item.get("subject", item["image"])) for item in datalist]
    subjects = sorted(set(names))
    if len(subjects) < minimum:
        raise ValueError(f"the datalist has {len(subjects)} subject(s) ({', '.join(subjects) or 'no items'}); "
                         f"triplet pre-training needs at least {minimum}")
    return [dict(item, subject=subjects.index(name)) for item, name in zip(datalist, names)]


class PrepareTripletBatch(PrepareBatch):
    """Inputs: ``image`` and ``positive`` stacked along the batch; targets: their subject indices."""

    def __init__(self, image_key: str = "image", positive_key: str = "positive", subject_key: str = "subject") -> None:
        self.image_key, self.positive_key, self.subject_key = image_key, positive_key, subject_key

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.cat([plain_tensor(batchdata[self.image_key], device, non_blocking),
                            plain_tensor(batchdata[self.positive_key], device, non_blocking)])
        subjects = plain_tensor(batchdata[self.subject_key], device, non_blocking).long()
        return images, torch.cat([subjects, subjects])


class MaskedEmbeddingLoss(nn.Module):
    """Stage 2 loss: MSE between predicted and encoder embeddings of the masked slices, summed over views.

    Takes ``MedicalTransformer.masked_prediction``'s output. ``components`` holds the loss, each
    view's MSE, and the same loss of :func:`mean_embedding_baseline` for comparison.
    """

    def __init__(self) -> None:
        super().__init__()
        self.components: dict[str, float] = {}

    @staticmethod
    def view_errors(predicted: list[torch.Tensor], targets: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [F.mse_loss(p[m], t[m]) for p, t, m in zip(predicted, targets, masks)]

    def forward(self, output: Mapping[str, list[torch.Tensor]], _targets=None) -> torch.Tensor:
        errors = self.view_errors(output["predicted"], output["target"], output["masks"])
        loss = torch.stack(errors).sum()
        with torch.no_grad():
            baseline = self.view_errors([mean_embedding_baseline(t, m) for t, m in zip(output["target"], output["masks"])],
                                        output["target"], output["masks"])
            self.components = {"masked_mse": float(loss), "mean_embedding_baseline": float(sum(baseline)),
                               **{f"{view}_mse": float(e) for view, e in zip(VIEWS, errors)}}
        return loss


class PrepareMaskedSliceBatch(PrepareBatch):
    """Inputs: the image; the slice masks go to the network as ``slice_masks`` (and as targets)."""

    def __init__(self, image_key: str = "image", mask_key: str = "slice_mask") -> None:
        self.image_key, self.mask_key = image_key, mask_key

    def __call__(self, batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        masks = plain_tensor(batchdata[self.mask_key], device, non_blocking).bool()
        return plain_tensor(batchdata[self.image_key], device, non_blocking), masks, (), {"slice_masks": masks}
