import torch

from medfm.networks import vdt_resnet18
from medfm.networks.vdt_resnet3d import checkpoint_filter_fn


def test_backbone_layout_matches_the_upstream_network():
    network = vdt_resnet18()
    backbone = {k: v for k, v in network.state_dict().items() if not k.startswith("fc.")}
    assert len(backbone) == 120
    assert sum(p.numel() for n, p in network.named_parameters() if not n.startswith("fc.")) == 33_160_000
    assert backbone["conv1.weight"].shape == (64, 1, 7, 7, 7) and "layer2.0.downsample.1.weight" in backbone


def test_pretraining_geometry_keeps_depth_and_shares_the_weights():
    pretraining, fine_tuning = vdt_resnet18(pretraining_geometry=True), vdt_resnet18()
    fine_tuning.load_state_dict(pretraining.state_dict())  # same keys and shapes
    features = {}
    pretraining.layer4.register_forward_hook(lambda module, inputs, output: features.update(out=output))
    with torch.no_grad():
        logits = pretraining.eval()(torch.rand(1, 1, 3, 224, 224))
    assert features["out"].shape == (1, 512, 3, 7, 7) and logits.shape == (1, 1000)
    with torch.no_grad():
        assert fine_tuning.eval()(torch.rand(1, 1, 48, 48, 48)).shape == (1, 1000)


def test_checkpoint_filter_accepts_mmcls_layouts():
    source = vdt_resnet18()
    state = {f"backbone.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    state["head.fc.weight"], state["head.fc.bias"] = source.fc.weight.detach(), source.fc.bias.detach()
    checkpoint = {"meta": {"epoch": 100}, "state_dict": state}
    target = vdt_resnet18()
    target.load_state_dict(checkpoint_filter_fn(checkpoint, target), strict=True)
    torch.testing.assert_close(target.fc.weight, source.fc.weight)
    other_head = vdt_resnet18(num_classes=2)
    converted = checkpoint_filter_fn(checkpoint, other_head)
    assert "fc.weight" not in converted and len(converted) == 120  # a head of another size is dropped


def test_checkpoint_filter_drops_a_head_the_network_does_not_have():
    source = vdt_resnet18()
    embedding_network = vdt_resnet18(feed_forward=False)
    converted = checkpoint_filter_fn({"state_dict": source.state_dict()}, embedding_network)
    embedding_network.load_state_dict(converted, strict=True)
    with torch.no_grad():
        assert embedding_network.eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 512)
