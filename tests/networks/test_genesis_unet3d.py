import pytest
import torch

from medfm.networks import GenesisUNet3D
from medfm.networks.genesis_unet3d import FIRST_CONV, ContBatchNorm3d, checkpoint_filter_fn
from medfm.networks.layers import adapt_input_channels

# shapes published for the authors' Genesis_Chest_CT.pt
UPSTREAM_SHAPES = {
    "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
    "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
    "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
    "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
    "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
    "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3),
    "up_tr64.ops.0.conv1.weight": (64, 192, 3, 3, 3),
    "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
    "down_tr64.ops.0.bn1.num_batches_tracked": (),
}


def test_upstream_key_layout_and_parameter_count():
    net = GenesisUNet3D()
    state = net.state_dict()
    assert len(state) == 106
    assert sum(p.numel() for p in net.parameters()) == 19_073_665
    assert sum(p.numel() for k, p in net.named_parameters() if k.startswith("down_tr")) == 7_027_776
    for key, shape in UPSTREAM_SHAPES.items():
        assert tuple(state[key].shape) == shape, key


def test_forward_and_encoder_shapes():
    net = GenesisUNet3D(out_channels=3, output_activation="softmax")
    x = torch.rand(2, 1, 32, 24, 16)
    with torch.no_grad():
        out = net(x)
        skips, bottleneck = net.encode(x)
    assert out.shape == (2, 3, 32, 24, 16)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2, 32, 24, 16))
    assert [tuple(s.shape[1:]) for s in skips] == [(64, 32, 24, 16), (128, 16, 12, 8), (256, 8, 6, 4)]
    assert tuple(bottleneck.shape) == (2, 512, 4, 3, 2)


def test_sigmoid_output_in_unit_range_and_logits_option():
    x = torch.rand(1, 1, 16, 16, 16)
    net = GenesisUNet3D()
    logits = GenesisUNet3D(output_activation=None)
    logits.load_state_dict(net.state_dict())
    with torch.no_grad():
        out = net(x)
        assert 0 <= float(out.min()) and float(out.max()) <= 1
        torch.testing.assert_close(torch.sigmoid(logits(x)), out)


def test_forward_with_bottleneck_matches_forward():
    net = GenesisUNet3D(norm="batch").eval()
    x = torch.rand(1, 1, 16, 16, 8)
    with torch.no_grad():
        both = net.forward_with_bottleneck(x)
        torch.testing.assert_close(both["restored"], net(x))
        assert both["bottleneck"].shape == (1, 512, 2, 2, 1)


@pytest.mark.parametrize("shape", [(1, 1, 30, 32, 32), (1, 1, 32, 32, 12)])
def test_rejects_sizes_not_divisible_by_8(shape):
    with pytest.raises(ValueError, match="divisible by 8"):
        GenesisUNet3D()(torch.rand(shape))


def test_rejects_non_5d_input():
    with pytest.raises(ValueError, match="5D"):
        GenesisUNet3D()(torch.rand(1, 32, 32, 32))


def test_cont_batch_norm_uses_batch_statistics_in_eval_and_batch_norm_does_not():
    torch.manual_seed(0)
    faithful = GenesisUNet3D(norm="cont_batch").eval()
    standard = GenesisUNet3D(norm="batch").eval()
    standard.load_state_dict(faithful.state_dict())
    a, b = torch.rand(1, 1, 16, 16, 8), torch.rand(1, 1, 16, 16, 8) * 3
    with torch.no_grad():
        alone = faithful(a)
        with_other = faithful(torch.cat([a, b]))[:1]
        assert not torch.allclose(alone, with_other, atol=1e-4), "upstream norm depends on the batch"
        torch.testing.assert_close(standard(a), standard(torch.cat([a, b]))[:1])
    assert isinstance(faithful.down_tr64.ops[0].bn1, ContBatchNorm3d)


def test_cont_batch_norm_updates_running_stats_only_in_training():
    norm = ContBatchNorm3d(4)
    x = torch.randn(2, 4, 4, 4, 4) * 5 + 3
    norm.eval()(x)
    assert torch.all(norm.running_mean == 0)
    norm.train()(x)
    torch.testing.assert_close(norm.running_mean, 0.1 * x.mean(dim=(0, 2, 3, 4)))


def test_checkpoint_filter_accepts_upstream_layout_and_loads_strictly():
    source = GenesisUNet3D()
    upstream = {
        "epoch": 7,
        "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1.0}]},
    }
    target = GenesisUNet3D()
    target.load_state_dict(checkpoint_filter_fn(upstream), strict=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_checkpoint_filter_rejects_non_state_dicts():
    with pytest.raises(ValueError, match="no state dict"):
        checkpoint_filter_fn({"state_dict": [1, 2]})
    with pytest.raises(ValueError, match="no tensors"):
        checkpoint_filter_fn({"epoch": 3})


def test_input_channel_adaptation_preserves_response_to_repeated_image():
    one = GenesisUNet3D(norm="batch").eval()
    three = GenesisUNet3D(in_channels=3, norm="batch").eval()
    three.load_state_dict(checkpoint_filter_fn(one.state_dict(), three))
    x = torch.rand(1, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(three(x.repeat(1, 3, 1, 1, 1)), one(x), atol=1e-5, rtol=1e-4)
    state = one.state_dict()
    assert adapt_input_channels(state, 1, key=FIRST_CONV) is state, "the same channel count leaves the weights alone"
    adapted = adapt_input_channels(state, 2, key=FIRST_CONV)
    assert adapted[FIRST_CONV].shape[1] == 2 and state[FIRST_CONV].shape[1] == 1, "a new dict; the original is kept"
    torch.testing.assert_close(adapted[FIRST_CONV].sum(dim=1, keepdim=True), state[FIRST_CONV])


@pytest.mark.parametrize("norm", ["cont_batch", "batch"])
def test_torchscript_matches_eager_and_keeps_the_size_check(norm):
    net = GenesisUNet3D(norm=norm).eval()
    scripted = torch.jit.script(net)
    x = torch.rand(2, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
    with pytest.raises(Exception, match="divisible by 8"):
        scripted(torch.rand(1, 1, 12, 16, 8))


def test_forward_features_is_the_bottleneck_without_running_the_decoder():
    torch.manual_seed(0)
    network = GenesisUNet3D(norm="batch").eval()
    decoder_calls = []
    for module in (network.up_tr256, network.up_tr128, network.up_tr64, network.out_tr):
        module.register_forward_hook(lambda *_: decoder_calls.append(1))
    x = torch.rand(2, 1, 32, 32, 16)
    with torch.no_grad():
        features = network.forward_features(x)
        assert decoder_calls == []
        torch.testing.assert_close(features, network.forward_with_bottleneck(x)["bottleneck"])
    assert features.shape == (2, 512, 4, 4, 2) and decoder_calls
