"""Facts written in more than one place agree: each bundle's input contract (``metadata.json``) against the values
its configs use and its ``network_data_format``; ``eval_metrics`` and the networks' sizes against the weights registry."""

import json

import pytest
import torch

from medfm.bundles import bundle_network
from medfm.catalog import with_current_eval_metrics
from medfm.weights import registry
from tests.conftest import BUNDLES

BUNDLE_DIRS = sorted(p for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())


def _metadata(bundle):
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def _configs(bundle):
    """Every config of the bundle with its parsed JSON."""
    return {path.name: json.loads(path.read_text()) for path in sorted((bundle / "configs").glob("*.json"))
            if path.name != "metadata.json"}


def _components(tree, target):
    """Every ``{"_target_": target, ...}`` anywhere in a config."""
    if isinstance(tree, dict):
        if tree.get("_target_") == target:
            yield tree
        for value in tree.values():
            yield from _components(value, target)
    elif isinstance(tree, list):
        for value in tree:
            yield from _components(value, target)


def _ct_window(contract):
    intensity = contract["intensity"]
    return intensity.get("window") or intensity.get("CT", {}).get("window")


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_configs_use_the_contracts_orientation_and_intensities(bundle):
    contract = _metadata(bundle)["input_contract"]
    for name, config in _configs(bundle).items():
        for orientation in _components(config, "Orientationd"):
            assert orientation["axcodes"] == contract["orientation"], name
        if "hu_window" in config:
            assert config["hu_window"] == _ct_window(contract), name
        if "percentiles" in config:
            assert config["percentiles"] == contract["intensity"]["percentiles"], name
        if "mni_grid" in config:
            assert config["mni_grid"] == contract["grid_shape"], name
        for statistic in ("vdt_mean", "vdt_std"):
            if statistic in config:
                assert str(config[statistic]) in contract["intensity"]["then"], (name, statistic)


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_network_data_format_and_inference_patch_follow_the_contract(bundle):
    metadata = _metadata(bundle)
    contract, image = metadata["input_contract"], metadata["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == contract["patch_size"] and image["num_channels"] == contract["channels"]
    inference = _configs(bundle)["inference.json"]
    if isinstance(inference["patch_size"], list):  # the others derive it (from the MNI grid) or take the whole volume
        assert inference["patch_size"] == contract["patch_size"]
    first_convolution = next(m for m in bundle_network(bundle).modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert first_convolution.in_channels == contract["channels"]


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_eval_metrics_are_the_registrys(bundle):
    """``eval_metrics`` is generated from the registry (``docs/update_model_cards.py``): numbers, named
    ``"<weights>: <task> (<unit>)"``, for every registered weights file."""
    text = (bundle / "configs" / "metadata.json").read_text(encoding="utf-8")
    assert with_current_eval_metrics(text, _metadata(bundle)["name"]) == text, \
        "out of date: run .venv/bin/python docs/update_model_cards.py"
    assert all(isinstance(value, float | int) for value in _metadata(bundle)["eval_metrics"].values())


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_registered_parameter_counts_are_the_bundle_networks(bundle):
    count = sum(parameter.numel() for parameter in bundle_network(bundle).parameters())
    entries = registry.for_bundle(_metadata(bundle)["name"])
    assert entries and {entry.num_params for entry in entries} == {count}


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_the_readme_bundle_table_states_the_registrys_size_and_licence_flags(bundle):
    """The README's table of bundles restates three registry facts: the network's size, the weights
    files, and which of them have no licence or a non-commercial one (flagged in bold)."""
    readme = (BUNDLES.parent / "README.md").read_text(encoding="utf-8")
    name = _metadata(bundle)["name"]
    row = next(line for line in readme.splitlines() if line.startswith(f"| [`{name}`]"))
    entries = registry.for_bundle(name)
    assert f"({entries[0].num_params / 1e6:.2f} M parameters" in row
    for entry in entries:
        assert f"`{entry.file_name}`" in row or (entry.availability == "ships with the bundle" and "bundled" in row)
        if entry.license_spdx is None:
            assert "**no licence" in row, entry.name
        elif not entry.commercial_use:
            assert "**non-commercial**" in row, entry.name
        else:
            assert entry.license_spdx in row, entry.name
