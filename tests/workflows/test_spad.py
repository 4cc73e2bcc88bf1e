import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from medfm.networks import SpadTokenizer
from medfm.workflows import AnisoGroupedBatchSampler, MaskedTokenLoss, PrepareMIMBatch, SpacingInferer, TokenizerLoss, TrainingState


def item(shape, spacing):
    return {"image": MetaTensor(torch.rand(1, *shape), affine=torch.diag(torch.tensor([*spacing, 1.0])))}


def test_batches_share_aniso_d_and_shape_and_cover_every_item_once():
    data = [item((32, 32, 32), (1, 1, 1))] * 3 + [item((32, 32, 8), (1, 1, 4))] * 2 + [item((32, 32, 1), (1, 1, 1))] * 3
    sampler = AnisoGroupedBatchSampler(data, batch_size=2, seed=1)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(8)) and len(batches) == len(sampler) == 5
    for batch in batches:
        assert len({tuple(data[i]["image"].shape) for i in batch}) == 1
    assert batches != list(sampler)  # reshuffled each epoch
    assert list(AnisoGroupedBatchSampler(data, 2, seed=1)) == batches  # and reproducible


def test_distributed_ranks_get_whole_batches_different_ones_and_equal_counts():
    data = [item((32, 32, 32), (1, 1, 1))] * 5 + [item((32, 32, 8), (1, 1, 4))] * 2 + [item((32, 32, 1), (1, 1, 1))] * 3
    everything = list(AnisoGroupedBatchSampler(data, batch_size=2, seed=4))  # 3 + 1 + 2 = 6 batches
    for replicas in (2, 4):
        ranks = [list(AnisoGroupedBatchSampler(data, 2, seed=4, num_replicas=replicas, rank=r)) for r in range(replicas)]
        assert len({len(batches) for batches in ranks}) == 1  # DDP needs the same number of steps everywhere
        dealt = [batch for batches in ranks for batch in batches]
        assert all(batch in everything for batch in dealt)  # whole batches of one group
        assert {tuple(b) for b in dealt} == {tuple(b) for b in everything}  # every batch goes to some rank
        repeats = len(dealt) - len(everything)
        assert repeats == (-len(everything)) % replicas  # only the padding is seen twice
    first, second = (AnisoGroupedBatchSampler(data, 2, seed=4, num_replicas=2, rank=r) for r in (0, 1))
    assert not {tuple(b) for b in first} & {tuple(b) for b in second}  # 6 batches over 2 ranks: disjoint
    resumed = AnisoGroupedBatchSampler(data, 2, seed=4, num_replicas=2, rank=0)
    resumed.set_epoch(1)
    assert list(resumed) == list(first)  # the second epoch, drawn again after a resume
    with pytest.raises(ValueError, match="rank 2 is not in"):
        AnisoGroupedBatchSampler(data, 2, num_replicas=2, rank=2)


def test_mim_masks_have_the_exact_ratio_and_repeat_with_the_seed():
    tokenizer = SpadTokenizer(channels=(4, 8, 8), codebook_size=16, groups=4)
    masks = PrepareMIMBatch(tokenizer, mask_ratio=0.55, seed=3).random_mask(4, 20)
    assert masks.sum(1).tolist() == [11] * 4 and not torch.equal(masks[0], masks[1])
    assert torch.equal(PrepareMIMBatch(tokenizer, seed=3).random_mask(4, 20), masks)
    affine = torch.diag(torch.tensor([1.0, 1.0, 4.0, 1.0]))
    batch = {"image": MetaTensor(torch.rand(2, 1, 32, 32, 8), affine=torch.stack([affine, affine]))}  # as collated
    image, (probabilities, mask), (passed_mask,), kwargs = PrepareMIMBatch(tokenizer)(batch)
    assert probabilities.shape == (2, 8, 16) and mask.shape == (2, 8) and passed_mask is mask
    assert not tokenizer.codebook.weight.requires_grad and kwargs["spacing"].shape == (2, 3)


def test_masked_token_loss_ignores_visible_tokens():
    logits = torch.randn(2, 6, 5, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 6, 5), -1)
    mask = torch.tensor([[True, False, True, False, False, False], [False] * 5 + [True]])
    loss = MaskedTokenLoss()(logits, (targets, mask))
    loss.backward()
    assert logits.grad[~mask].abs().sum() == 0 and logits.grad[mask].abs().sum() > 0
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(loss, expected)


def test_tokenizer_loss_terms():
    tokenizer = SpadTokenizer(channels=(4, 8, 8), codebook_size=16, groups=4)
    x = torch.rand(1, 1, 32, 32, 16) * 2 - 1
    criterion = TokenizerLoss(quant_weight=0.5, entropy_weight=0.25)
    loss = criterion(tokenizer(x), x)
    parts = criterion.components
    assert {"l1", "usage", "entropy", "codes_used"} <= set(parts)
    assert float(loss.detach()) == pytest.approx(parts["l1"] + 0.5 * parts["usage"] + 0.25 * parts["entropy"], rel=1e-5)


def test_spacing_inferer_gives_the_network_the_spacing_of_its_input():
    seen = []

    def network(x, spacing=None):
        seen.append(spacing)
        return x

    image = MetaTensor(torch.rand(1, 1, 32, 32, 8), affine=torch.diag(torch.tensor([0.7, 0.7, 5.0, 1.0], dtype=torch.float64)))
    inferer = SpacingInferer(SlidingWindowInferer(roi_size=(16, 16, 8), sw_batch_size=2))
    torch.testing.assert_close(inferer(image, network).as_tensor(), image.as_tensor())
    assert all(torch.equal(s.cpu(), torch.tensor([[0.7, 0.7, 5.0]], dtype=torch.float64)) for s in seen) and seen
    given = torch.tensor([[1.0, 1.0, 1.0]])
    inferer(image, network, spacing=given)
    assert seen[-1] is given  # a PrepareSpadBatch's spacing is passed on unchanged
    with pytest.raises(ValueError, match="voxel spacing"):
        inferer(torch.rand(1, 1, 32, 32, 8), network)


def test_a_resumed_run_draws_the_grouped_batches_of_the_epochs_it_continues(tmp_path):
    from ignite.engine import Engine
    from torch.utils.data import DataLoader

    data = [dict(item((4, 4, 2), (1, 1, 2)), index=i) for i in range(6)]

    def drawn(max_epochs, resume):
        epochs = {}
        loader = DataLoader(data, batch_sampler=AnisoGroupedBatchSampler(data, 2, seed=3), collate_fn=list)
        engine = Engine(lambda e, batch: epochs.setdefault(e.state.epoch, []).append([x["index"] for x in batch]))
        TrainingState(tmp_path, {}, resume=resume).attach(engine)
        engine.run(loader, max_epochs=max_epochs)
        return epochs

    uninterrupted = drawn(3, resume=False)
    assert uninterrupted[1] != uninterrupted[2]
    drawn(1, resume=False)
    assert drawn(3, resume=True) == {2: uninterrupted[2], 3: uninterrupted[3]}
