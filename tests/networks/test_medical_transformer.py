"""MedicalTransformer: sizes from the paper, view slicing, masking, heads, upstream key import."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from medfm.bundles import bundle_network
from medfm.networks import MedicalTransformer
from medfm.networks.medical_transformer import checkpoint_filter_fn, mean_embedding_baseline
from medfm.weights import import_weights, load_checkpoint
from tests.conftest import REPO

BUNDLE = REPO / "bundles" / "medical_transformer_brain_mri"


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
    network = MedicalTransformer(task=task, **{"out_channels" if task == "segmentation" else "num_classes": outputs})
    x = torch.rand(2, 1, 20, 24, 16)
    prediction = network(x)
    assert prediction.shape == shape
    prediction.square().mean().backward()
    assert network.encoding.conv1.weight.grad.abs().sum() > 0  # the encoder is fine-tuned too


def test_bad_task_arguments_are_refused():
    with pytest.raises(ValueError, match="task must be one of"):
        MedicalTransformer(task="detection")
    with pytest.raises(ValueError, match="needs num_classes >= 1"):
        MedicalTransformer(task="classification")
    with pytest.raises(ValueError, match="needs out_channels >= 1"):
        MedicalTransformer(task="segmentation", num_classes=3)


# The authors' Multiview_MEP state dict (ejjun92/MedicalTransformer, stage 2 models/ResNet_Model.py),
# transcribed from their code, saved through nn.DataParallel (``module.``): name -> shape.
AUTHORS_LAYOUT = {
    "encoding.conv1.weight": (16, 1, 7, 7, 1),
    **{f"encoding.layer1.{b}.conv{c}.weight": (16, 16, 3, 3, 1) for b in (0, 1) for c in (1, 2)},
    **{key: shape for layer, (width, previous) in enumerate([(32, 16), (64, 32), (128, 64)], start=2)
       for key, shape in {f"encoding.layer{layer}.0.conv1.weight": (width, previous, 3, 3, 1),
                          f"encoding.layer{layer}.0.conv2.weight": (width, width, 3, 3, 1),
                          f"encoding.layer{layer}.0.downsample.0.weight": (width, previous, 1, 1, 1),
                          f"encoding.layer{layer}.1.conv1.weight": (width, width, 3, 3, 1),
                          f"encoding.layer{layer}.1.conv2.weight": (width, width, 3, 3, 1)}.items()},
    "encoding.fc.weight": (64, 128), "encoding.fc.bias": (64,),
    "TF.pos_embed.pe": (1, 114, 64),  # a persistent buffer
    "TF.pos_embed.seg_embedding.weight": (3, 64),
    **{f"TF.encoding_block.layers.0.{norm}.{p}": (64,) for norm in ("norm_1", "norm_2") for p in ("alpha", "bias")},
    **{f"TF.encoding_block.layers.0.attn.{n}_linear.{p}": shape for n in "qkv"
       for p, shape in (("weight", (1024, 64)), ("bias", (1024,)))},
    "TF.encoding_block.layers.0.attn.out.weight": (64, 1024), "TF.encoding_block.layers.0.attn.out.bias": (64,),
    "TF.encoding_block.layers.0.ff.linear_1.weight": (128, 64), "TF.encoding_block.layers.0.ff.linear_1.bias": (128,),
    "TF.encoding_block.layers.0.ff.linear_2.weight": (64, 128), "TF.encoding_block.layers.0.ff.linear_2.bias": (64,),
    "TF.encoding_block.norm.alpha": (64,), "TF.encoding_block.norm.bias": (64,),
}
AUTHORS_PARAMETERS = 988_816  # every entry but the position table


def authors_position_table(length: int = 114, dim: int = 64) -> torch.Tensor:
    """Upstream's loop: pe[p, i] = sin(p / L ** (2 i / d)), pe[p, i + 1] = cos(p / L ** (2 (i + 1) / d))."""
    table = torch.zeros(length, dim)
    for position in range(length):
        for i in range(0, dim, 2):
            table[position, i] = math.sin(position / (length ** ((2 * i) / dim)))
            table[position, i + 1] = math.cos(position / (length ** ((2 * (i + 1)) / dim)))
    return table[None]


def authors_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values in the authors' layout (norm scales near 1, small linear weights, their table)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in AUTHORS_LAYOUT.items():
        value = torch.randn(shape, generator=generator)
        if key.endswith(".alpha"):
            value = 1 + 0.1 * value
        elif "linear" in key or key.endswith(("out.weight", "fc.weight", "fc.bias")) or key.endswith("norm.bias"):
            value = 0.05 * value
        state[f"module.{key}"] = value
    state["module.TF.pos_embed.pe"] = authors_position_table()
    return state


def authors_norm(x, alpha, bias, eps=1e-6):
    return alpha * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, unbiased=True) + eps) + bias


def authors_slice_embeddings(w: dict[str, torch.Tensor], stack: torch.Tensor) -> torch.Tensor:
    """Their ResNet-18 with ``AvgPool3d((3, 3, 1))`` and the fc over channels: (B, 1, H, W, S) -> (B, S, 64)."""
    def conv(x, key, stride, padding):
        return F.conv3d(x, w[key], stride=(stride, stride, 1), padding=(padding, padding, 0))

    def block(x, prefix, stride):
        out = F.relu(F.instance_norm(conv(x, f"{prefix}.conv1.weight", stride, 1)))
        out = F.instance_norm(conv(out, f"{prefix}.conv2.weight", 1, 1))
        shortcut = F.instance_norm(conv(x, f"{prefix}.downsample.0.weight", stride, 0)) \
            if f"{prefix}.downsample.0.weight" in w else x
        return F.relu(out + shortcut)

    x = F.relu(F.instance_norm(conv(stack, "encoding.conv1.weight", 2, 3)))
    x = F.max_pool3d(x, (3, 3, 1), stride=(2, 2, 1), padding=(1, 1, 0))
    for layer in range(1, 5):
        x = block(block(x, f"encoding.layer{layer}.0", 1 if layer == 1 else 2), f"encoding.layer{layer}.1", 1)
    pooled = F.avg_pool3d(x, (3, 3, 1))  # stride = kernel: a 3x4 map gives one window
    features = pooled.reshape(pooled.shape[0], -1, pooled.shape[-1])  # (B, 128, S)
    return F.linear(features.transpose(1, 2), w["encoding.fc.weight"], w["encoding.fc.bias"])


def authors_transformer(w: dict[str, torch.Tensor], slices: torch.Tensor, view: int) -> torch.Tensor:
    """Their pos_embed + one pre-norm layer + final Norm, in eval mode: (B, S, 64) -> (B, S, 64)."""
    prefix = "TF.encoding_block.layers.0."
    x = slices * math.sqrt(64) + w["TF.pos_embed.pe"][:, :slices.shape[1]] + w["TF.pos_embed.seg_embedding.weight"][view]
    normed = authors_norm(x, w[prefix + "norm_1.alpha"], w[prefix + "norm_1.bias"])
    q, k, v = (F.linear(normed, w[f"{prefix}attn.{n}_linear.weight"], w[f"{prefix}attn.{n}_linear.bias"])
               .view(*x.shape[:2], 4, 256).transpose(1, 2) for n in "qkv")
    attended = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(256), dim=-1) @ v).transpose(1, 2)
    x = x + F.linear(attended.reshape(*x.shape[:2], 1024), w[prefix + "attn.out.weight"], w[prefix + "attn.out.bias"])
    normed = authors_norm(x, w[prefix + "norm_2.alpha"], w[prefix + "norm_2.bias"])
    hidden = F.relu(F.linear(normed, w[prefix + "ff.linear_1.weight"], w[prefix + "ff.linear_1.bias"]))
    x = x + F.linear(hidden, w[prefix + "ff.linear_2.weight"], w[prefix + "ff.linear_2.bias"])
    return authors_norm(x, w["TF.encoding_block.norm.alpha"], w["TF.encoding_block.norm.bias"])


def test_the_network_has_the_authors_keys_shapes_and_parameter_count():
    assert sum(math.prod(s) for k, s in AUTHORS_LAYOUT.items() if k != "TF.pos_embed.pe") == AUTHORS_PARAMETERS
    network = MedicalTransformer()
    converted = checkpoint_filter_fn({"state_dict": authors_checkpoint()}, network)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert count(network) == AUTHORS_PARAMETERS


def test_the_position_table_is_the_authors_and_travels_with_the_weights():
    network = MedicalTransformer()
    torch.testing.assert_close(network.transformer.positions, authors_position_table()[0])
    assert "transformer.positions" in network.state_dict()


def test_window_pooling_reads_the_first_three_columns_of_a_three_by_four_map():
    encoder = MedicalTransformer().encoding
    deepest = torch.rand(1, 128, 3, 4, 2)
    changed = deepest.clone()
    changed[:, :, :, 3] += 10  # the column upstream's window never reaches
    torch.testing.assert_close(encoder.pool(changed), encoder.pool(deepest))
    torch.testing.assert_close(encoder.pool(deepest), F.avg_pool3d(deepest, (3, 3, 1))[:, :, 0, 0])
    with pytest.raises(ValueError, match="covers maps up to 5x5"):
        encoder.pool(torch.rand(1, 128, 6, 4, 2))
    plane = MedicalTransformer(slice_pooling="plane").encoding
    torch.testing.assert_close(plane.pool(deepest), deepest.mean(dim=(2, 3)))


def test_an_authors_checkpoint_imports_and_computes_the_authors_formulas(tmp_path):
    """``medfm weights import`` of an authors'-layout file, then each view's contextual slice embeddings
    on the 96 x 114 x 96 grid against the three formulas written out above (pooling, table, norm)."""
    bundle = tmp_path / "medical_transformer_brain_mri"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("eval", "pretrain", "finetune"))
    checkpoint = authors_checkpoint(seed=1)
    torch.save(checkpoint, tmp_path / "pretrained_model.pt")
    report = import_weights(bundle, tmp_path / "pretrained_model.pt")
    assert report.missing_keys == [] and report.unexpected_keys == []
    network = bundle_network(bundle).eval()
    network.load_state_dict(load_checkpoint(bundle / "models" / "model.pt"))
    authors = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    x = torch.rand(1, 1, 96, 114, 96)
    with torch.no_grad():
        slices = network.slice_embeddings(x)
        contextual = network.contextual_embeddings(slices)
        for view, stack in enumerate(MedicalTransformer.view_stacks(x)):
            expected_slices = authors_slice_embeddings(authors, stack)
            torch.testing.assert_close(slices[view], expected_slices, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(contextual[view], authors_transformer(authors, expected_slices, view),
                                       rtol=1e-4, atol=1e-4)


def test_a_fine_tuned_head_is_dropped_for_another_task():
    classifier = MedicalTransformer(task="classification", num_classes=2)
    regressor = MedicalTransformer(task="regression", num_classes=1)
    converted = checkpoint_filter_fn(classifier.state_dict(), regressor)
    assert not any(k.startswith("head.3.") for k in converted)
    assert "head.0.weight" in converted  # same shape in both tasks
    missing, unexpected = regressor.load_state_dict(converted, strict=False)
    assert missing == ["head.3.weight", "head.3.bias"] and unexpected == []
