import pytest
import torch

from medfm.networks import SpadTokenizer, SpadViT


def tiny(**kwargs) -> SpadTokenizer:
    torch.manual_seed(0)
    return SpadTokenizer(**{"channels": (8, 16, 32), "codebook_size": 64, **kwargs}).eval().double()


def test_full_size_tokenizer_matches_the_paper():
    with torch.device("meta"):
        tokenizer = SpadTokenizer(in_channels=3)
    assert sum(p.numel() for p in tokenizer.parameters()) == 34_253_955  # paper: ~34.3 M
    assert tokenizer.codebook.weight.shape == (1024, 512)


@pytest.mark.parametrize("aniso_d", [0, 1, 2, 3, 4])
def test_adaptive_encoder_equals_the_full_encoder_on_a_depth_upsampled_input(aniso_d):
    tokenizer = tiny()
    x = torch.rand(1, 1, 32, 16, 2 * max(16 >> aniso_d, 1), dtype=torch.float64) * 2 - 1
    adaptive, grid, _ = tokenizer.code_probabilities(x, aniso_d=aniso_d)
    full, full_grid, _ = tokenizer.code_probabilities(x.repeat_interleave(2**aniso_d, dim=-1), aniso_d=0)
    assert grid == full_grid
    torch.testing.assert_close(adaptive, full)


@pytest.mark.parametrize("shape, spacing", [((2, 1, 32, 32, 32), None), ((1, 1, 32, 48, 8), (0.7, 0.7, 3.0)),
                                            ((1, 1, 32, 48, 1), None), ((1, 1, 32, 48), None)])
def test_one_code_per_spad_vit_token_and_full_size_reconstruction(shape, spacing):
    tokenizer = tiny()
    x = torch.rand(*shape, dtype=torch.float64)
    out = tokenizer(x, spacing=spacing)
    assert out["reconstruction"].shape == x.shape
    vit = SpadViT(in_channels=1, embed_dim=16, depth=1, num_heads=1)
    tokens = vit.tokens(x.float(), spacing=spacing)[0]
    assert out["probabilities"].shape == (shape[0], tokens.shape[1] - 1, 64)
    torch.testing.assert_close(out["probabilities"].sum(-1), torch.ones(out["probabilities"].shape[:2], dtype=torch.float64))


def test_usage_and_entropy_terms():
    uniform = torch.full((2, 5, 8), 1 / 8)
    usage, entropy = SpadTokenizer.usage_and_entropy(uniform)
    torch.testing.assert_close(usage, -torch.log(torch.tensor(8.0)))  # lowest possible: every code used
    one_hot = torch.nn.functional.one_hot(torch.zeros(2, 5, dtype=torch.long), 8).float()
    usage, entropy = SpadTokenizer.usage_and_entropy(one_hot)
    assert float(entropy) == pytest.approx(0.0, abs=1e-6) and float(usage) == pytest.approx(0.0, abs=1e-6)
