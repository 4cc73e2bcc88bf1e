import pytest
import torch

from medfm.networks import VDTResNetUNet, vdt_resnet18


def test_five_encoder_maps_and_full_size_logits():
    network = VDTResNetUNet(out_channels=3).eval()
    x = torch.rand(1, 1, 32, 48, 16)
    with torch.no_grad():
        features = network.encode(x)
        logits = network(x)
    assert [f.shape[1] for f in features] == [64, 64, 128, 256, 512]
    assert [tuple(f.shape[2:]) for f in features] == [(32 // s, 48 // s, 16 // s) for s in (1, 2, 4, 8, 16)]
    assert logits.shape == (1, 3, 32, 48, 16)


def test_pretrained_resnet_fills_the_encoder_and_only_the_decoder_starts_fresh():
    pretrained = vdt_resnet18()
    network = VDTResNetUNet(out_channels=2)
    result = network.load_state_dict({k: v for k, v in pretrained.state_dict().items() if not k.startswith("fc.")},
                                     strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith(("decoder.", "segmentation_head.")) for k in result.missing_keys)
    # same weights, same stride-1 stem: the deepest map is the ResNet's last stage output
    reference = vdt_resnet18(conv1_t_stride=1, feed_forward=False).eval()
    reference.load_state_dict(network.state_dict(), strict=False)
    deepest = {}
    reference.layer4.register_forward_hook(lambda module, inputs, output: deepest.update(out=output))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        reference(x)
        torch.testing.assert_close(network.eval().encode(x)[-1], deepest["out"])


def test_sizes_not_divisible_by_16_are_refused():
    with pytest.raises(ValueError, match="divisible by 16"):
        VDTResNetUNet()(torch.rand(1, 1, 32, 32, 36))
