"""Every medfm network, whatever its task head, gives its features one way: ``forward_features`` and ``embed``."""

import pytest
import torch

from medfm.networks import GenesisUNet3D, MedicalTransformer, SpadViT, UniversalModelSAR, VDTResNetUNet, vdt_resnet18

SMALL_VIT = {"in_channels": 1, "embed_dim": 32, "depth": 2, "num_heads": 2, "pos_embed_grid": (2, 4, 4)}
SMALL_MT = {"widths": (8, 8, 16, 16), "embed_dim": 16, "head_dim": 8, "ff_dim": 16, "max_slices": 40}

#: name -> (network, input, embedding width, whether its forward is the embedding itself); batch norm
#: with running statistics, since upstream's "cont_batch" uses each batch's own and so mixes items by design
NETWORKS = {
    "genesis": (lambda: GenesisUNet3D(out_channels=3, norm="batch"), (1, 1, 32, 32, 16), 512, False),
    "universal_model": (lambda: UniversalModelSAR(norm="batch"), (1, 1, 32, 32, 16), 512, False),
    "vdt_classification": (lambda: vdt_resnet18(num_classes=2), (1, 1, 48, 48, 48), 512, False),
    "vdt_embedding": (lambda: vdt_resnet18(num_classes=1, feed_forward=False), (1, 1, 48, 48, 48), 512, True),
    "vdt_segmentation": (lambda: VDTResNetUNet(out_channels=3), (1, 1, 32, 32, 32), 512, False),
    "spad_embedding": (lambda: SpadViT(**SMALL_VIT), (1, 1, 32, 32, 32), 64, True),
    "spad_classification": (lambda: SpadViT(**SMALL_VIT, task="classification", num_classes=3), (1, 1, 32, 32, 32), 64, False),
    "mt_embedding": (lambda: MedicalTransformer(**SMALL_MT), (1, 1, 32, 32, 24), 48, True),
    "mt_regression": (lambda: MedicalTransformer(**SMALL_MT, task="regression", num_classes=1), (1, 1, 32, 32, 24), 48, False),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_embed_gives_one_vector_per_item_from_the_features_alone(name):
    build, shape, width, forward_is_embedding = NETWORKS[name]
    torch.manual_seed(0)
    network = build().eval()
    x = torch.rand(2, *shape[1:])
    with torch.no_grad():
        features, vectors = network.forward_features(x), network.embed(x)
        second_alone = network.embed(x[1:])
    assert vectors.shape == (2, width) and torch.isfinite(vectors).all()
    assert features.shape[0] == 2
    torch.testing.assert_close(second_alone[0], vectors[1], rtol=1e-4, atol=1e-5)  # items do not mix
    assert not torch.allclose(vectors[0], vectors[1])
    if forward_is_embedding:
        with torch.no_grad():
            torch.testing.assert_close(network(x), vectors)


def test_the_embedding_does_not_depend_on_the_task_head():
    """A fine-tuned network's encoder embeds as the foundation network with the same weights does."""
    torch.manual_seed(0)
    foundation = vdt_resnet18(num_classes=1, feed_forward=False).eval()
    classifier = vdt_resnet18(num_classes=4).eval()
    classifier.load_state_dict(foundation.state_dict(), strict=False)
    x = torch.rand(1, 1, 48, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(classifier.embed(x), foundation(x))
    genesis, segmenter = GenesisUNet3D().eval(), GenesisUNet3D(out_channels=5).eval()
    segmenter.load_state_dict({k: v for k, v in genesis.state_dict().items() if not k.startswith("out_tr")}, strict=False)
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(segmenter.embed(x), genesis.forward_features(x).mean(dim=(2, 3, 4)))
