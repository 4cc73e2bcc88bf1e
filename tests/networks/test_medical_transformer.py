"""MedicalTransformer: sizes from the paper, view slicing, masking, heads, upstream key import."""

import re

import pytest
import torch

from medfm.networks import MedicalTransformer
from medfm.networks.medical_transformer import checkpoint_filter_fn, mean_embedding_baseline


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper():
    network = MedicalTransformer()
    assert count(network.encoding) == 706_384  # paper: encoder 0.71 M
    assert count(network.transformer) == 282_432  # paper: transformer 0.28 M
    assert count(network) == 988_816  # paper: about 0.99 M


def test_views_slice_the_ras_axes_and_give_one_embedding_per_slice():
    x = torch.rand(2, 1, 20, 24, 16)  # X, Y, Z
    axial, sagittal, coronal = MedicalTransformer.view_stacks(x)
    torch.testing.assert_close(axial[..., 3], x[:, :, :, :, 3])  # a Z plane
    torch.testing.assert_close(sagittal[..., 3], x[:, :, 3].transpose(-1, -2))  # an X plane
    torch.testing.assert_close(coronal[..., 3], x[:, :, :, 3])  # a Y plane
    network = MedicalTransformer().eval()
    slices = network.slice_embeddings(x)
    assert [tuple(s.shape) for s in slices] == [(2, 16, 64), (2, 20, 64), (2, 24, 64)]
    assert network(x).shape == (2, 192)


def test_masked_slices_enter_the_transformer_as_the_blank_slice_embedding(monkeypatch):
    network = MedicalTransformer().eval()
    x = torch.rand(1, 1, 20, 24, 16)
    masks = torch.zeros(1, 16 + 20 + 24, dtype=torch.bool)
    masks[0, [2, 16 + 5, 36 + 7]] = True
    seen = []
    original = network.transformer.forward
    monkeypatch.setattr(network.transformer, "forward", lambda s, view, **kw: seen.append(s) or original(s, view, **kw))
    with torch.no_grad():
        output = network.masked_prediction(x, masks)
    clean = network.slice_embeddings(x)
    for view, (position, stack) in enumerate(zip([2, 5, 7], network.view_stacks(x))):
        torch.testing.assert_close(output["target"][view], clean[view])
        torch.testing.assert_close(seen[view][0, position], network.mask_embedding(stack)[0])
        unmasked = torch.ones(clean[view].shape[1], dtype=torch.bool)
        unmasked[position] = False
        torch.testing.assert_close(seen[view][0, unmasked], clean[view][0, unmasked])
    with pytest.raises(ValueError, match="slice_masks cover 10 slices, the volume has 60"):
        network.masked_prediction(x, masks[:, :10])


def test_quality_pass_predicts_every_slice_once_and_compares_with_the_mean_baseline():
    network = MedicalTransformer().eval()
    x = torch.rand(1, 1, 20, 24, 16)
    output = network.embed_with_quality(x)
    assert output["embedding"].shape == (1, 192) and output["masked_slice_error"].shape == (1, 1)
    torch.testing.assert_close(output["embedding"], network(x))
    # an untrained transformer predicts worse than the mean of the visible slices
    assert float(output["masked_slice_error"]) > 1


def test_mean_embedding_baseline_uses_visible_slices_only():
    target = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[False, False, True]])
    assert mean_embedding_baseline(target, mask)[0, 2, 0] == 2.0


@pytest.mark.parametrize("task,outputs,shape", [("classification", 2, (2, 2)), ("regression", 1, (2, 1)),
                                                ("segmentation", 3, (2, 3, 20, 24, 16))])
def test_downstream_heads_give_their_shapes_and_train(task, outputs, shape):
    network = MedicalTransformer(task=task, num_outputs=outputs)
    x = torch.rand(2, 1, 20, 24, 16)
    prediction = network(x)
    assert prediction.shape == shape
    prediction.square().mean().backward()
    assert network.encoding.conv1.weight.grad.abs().sum() > 0  # the encoder is fine-tuned too


def test_bad_task_arguments_are_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        MedicalTransformer(task="detection")
    with pytest.raises(ValueError, match="needs num_outputs >= 1"):
        MedicalTransformer(task="classification")


def upstream_state_dict(network: MedicalTransformer) -> dict[str, torch.Tensor]:
    """The authors' Multiview_MEP key layout, written from a network of this package."""
    renames = [(r"^transformer\.view_embedding\.", "TF.pos_embed.seg_embedding."),
               (r"^transformer\.(.*norm.*)\.weight$", r"TF.encoding_block.\1.alpha"), (r"^transformer\.", "TF.encoding_block.")]
    state = {}
    for key, value in network.state_dict().items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        state[f"module.{key}"] = value.clone()
    state["module.TF.pos_embed.pe"] = torch.zeros(1, 229, 64)
    return state


def test_an_upstream_checkpoint_loads_strictly_and_gives_the_same_outputs():
    torch.manual_seed(0)
    source = MedicalTransformer().eval()
    upstream = upstream_state_dict(source)
    assert "module.TF.encoding_block.layers.0.norm_1.alpha" in upstream
    target = MedicalTransformer().eval()
    target.load_state_dict(checkpoint_filter_fn({"state_dict": upstream}, target))
    x = torch.rand(1, 1, 20, 24, 16)
    torch.testing.assert_close(target(x), source(x))


def test_a_fine_tuned_head_is_dropped_for_another_task():
    classifier = MedicalTransformer(task="classification", num_outputs=2)
    regressor = MedicalTransformer(task="regression", num_outputs=1)
    converted = checkpoint_filter_fn(classifier.state_dict(), regressor)
    assert not any(k.startswith("head.3.") for k in converted)
    assert "head.0.weight" in converted  # same shape in both tasks
    missing, unexpected = regressor.load_state_dict(converted, strict=False)
    assert missing == ["head.3.weight", "head.3.bias"] and unexpected == []
