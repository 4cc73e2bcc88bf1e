import pytest
import torch

from medfm.networks import GenesisUNet3D, GradientReversal, UniversalModelSAR
from medfm.networks.universal_model_sar import checkpoint_filter_fn
from tests.conftest import save_upstream_checkpoint


def test_outputs_and_shapes():
    model = UniversalModelSAR(num_scales=3, num_domains=2)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32, 16))
    assert out["restored"].shape == (2, 1, 32, 32, 16) and 0 <= float(out["restored"].min()) <= float(out["restored"].max()) <= 1
    assert out["scale_logits"].shape == (2, 3) and out["domain_logits"].shape == (2, 2)
    assert out["bottleneck"].shape == (2, 512, 4, 4, 2)


def test_heads_read_the_clean_crop_when_given():
    torch.manual_seed(0)
    model = UniversalModelSAR().eval()
    corrupted, clean = torch.rand(2, 1, 16, 16, 8), torch.rand(2, 1, 16, 16, 8)
    with torch.no_grad():
        both, alone, clean_only = model(corrupted, clean=clean), model(corrupted), model(clean)
    torch.testing.assert_close(both["restored"], alone["restored"])
    torch.testing.assert_close(both["scale_logits"], clean_only["scale_logits"])
    torch.testing.assert_close(both["domain_logits"], clean_only["domain_logits"])


def test_unet_weights_are_the_genesis_layout_and_heads_are_apart():
    model = UniversalModelSAR()
    assert model.unet.state_dict().keys() == GenesisUNet3D().state_dict().keys()
    heads = model.heads_state_dict()
    assert heads and all(k.split(".")[0] in ("scale_head", "domain_head") for k in heads)
    assert len(heads) + len(model.unet.state_dict()) == len(model.state_dict())


def test_upstream_checkpoint_loads_into_the_unet(tmp_path):
    expected = save_upstream_checkpoint(tmp_path / "Universal_model.pt")
    model = UniversalModelSAR()
    checkpoint = torch.load(tmp_path / "Universal_model.pt", weights_only=True)
    model.unet.load_state_dict(checkpoint_filter_fn(checkpoint, model.unet))
    for key, value in expected.items():
        torch.testing.assert_close(model.unet.state_dict()[key], value)


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_gradient_reversal_flips_and_scales_the_gradient(weight):
    x = torch.randn(3, 4, requires_grad=True)
    y = GradientReversal(weight)(x)
    torch.testing.assert_close(y, x)
    (y * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, -weight * torch.arange(4.0).expand(3, 4))


def test_discriminator_and_encoder_pull_in_opposite_directions():
    """One backward pass of the domain loss: the discriminator descends it, the encoder ascends it."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16, 8)
    domains = torch.tensor([0, 1])
    reversed_model = UniversalModelSAR(adversarial_weight=1.0).eval()
    plain_model = UniversalModelSAR(adversarial_weight=-1.0).eval()  # -1: the reversal undone
    plain_model.load_state_dict(reversed_model.state_dict())
    grads = []
    for model in (reversed_model, plain_model):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x)["domain_logits"], domains).backward()
        grads.append((model.domain_head[2].weight.grad.clone(), model.unet.down_tr512.ops[1].conv1.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], -grads[1][1])
