"""Pre-training losses of the Medical Transformer: batch-hard triplets and masked-slice MSE."""

import pytest
import torch

from medfm.workflows import BatchTripletLoss, MaskedEmbeddingLoss, PrepareTripletBatch, subject_indices


def test_the_hardest_negative_of_another_subject_is_used():
    anchors = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    positives = torch.tensor([[0.5, 0.0], [10.0, 0.5]])
    loss = BatchTripletLoss(margin=1.0)
    value = loss(torch.cat([anchors, positives]), torch.tensor([0, 1, 0, 1]))
    # anchor 0: positive at 0.5, nearest other subject at 10 -> satisfied; same for anchor 1
    assert float(value) == 0.0 and loss.components["satisfied"] == 1.0
    close = torch.tensor([[0.0, 0.0], [0.8, 0.0]])
    value = loss(torch.cat([close, torch.tensor([[0.5, 0.0], [0.8, 0.5]])]), torch.tensor([0, 1, 0, 1]))
    # anchor 0: d(a, p) = 0.5, hardest negative anchor 1 at 0.8 -> 0.7;
    # anchor 1: d(a, p) = 0.5, hardest negative positive 0 at 0.3 (not anchor 0 at 0.8) -> 1.2
    assert float(value) == pytest.approx((0.7 + 1.2) / 2, abs=1e-4)


def test_a_batch_of_one_subject_changes_nothing_and_a_datalist_of_one_subject_is_refused():
    embeddings = torch.rand(4, 8, requires_grad=True)
    loss = BatchTripletLoss()
    value = loss(embeddings, torch.tensor([2, 2, 2, 2]))
    value.backward()
    assert float(value) == 0 and loss.components["usable_anchors"] == 0 and float(embeddings.grad.abs().sum()) == 0
    items = subject_indices([{"image": "b.nii", "subject": "colin"}, {"image": "a.nii", "subject": "mni"},
                             {"image": "c.nii", "subject": "colin"}, {"image": "d.nii"}])
    assert [item["subject"] for item in items] == [0, 2, 0, 1]  # colin, d.nii, mni sorted
    with pytest.raises(ValueError, match=r"1 subject\(s\) \(colin\); triplet pre-training needs at least 2"):
        subject_indices([{"image": "b.nii", "subject": "colin"}, {"image": "c.nii", "subject": "colin"}])


def test_triplet_batches_stack_anchor_and_positive():
    batch = {"image": torch.zeros(2, 1, 4, 4, 4), "positive": torch.ones(2, 1, 4, 4, 4), "subject": torch.tensor([0, 3])}
    images, subjects = PrepareTripletBatch()(batch)
    assert images.shape == (4, 1, 4, 4, 4) and float(images[2:].min()) == 1.0
    assert subjects.tolist() == [0, 3, 0, 3]


def test_masked_embedding_loss_scores_masked_slices_only_and_sums_views():
    target = [torch.zeros(1, 4, 2) for _ in range(3)]
    predicted = [torch.full((1, 4, 2), 100.0) for _ in range(3)]
    masks = [torch.tensor([[True, False, False, False]]) for _ in range(3)]
    for view in range(3):
        predicted[view][0, 0] = float(view + 1)  # error only where masked counts
    loss = MaskedEmbeddingLoss()
    value = loss({"predicted": predicted, "target": target, "masks": masks})
    assert float(value) == pytest.approx(1 + 4 + 9)
    assert loss.components["coronal_mse"] == pytest.approx(9) and loss.components["mean_embedding_baseline"] == 0
