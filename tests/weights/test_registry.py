import dataclasses
import importlib

import pytest
import yaml

from medfm.errors import WeightsError

from medfm.weights import REGISTRY, default_for_bundle, fetch_weights, get, sha256_of
from medfm.weights.registry import OPEN_LICENSES
from tests.conftest import BUNDLES


def test_every_entry_points_at_a_bundle_and_an_importer():
    for entry in REGISTRY.values():
        assert (BUNDLES / entry.bundle / "configs" / "metadata.json").is_file(), entry.name
        module = importlib.import_module(entry.network_module)
        assert callable(module.checkpoint_filter_fn), entry.name
        assert entry.license and entry.trained_on and entry.preprocessing and entry.source
        assert entry.license_spdx is None or entry.license_spdx in OPEN_LICENSES or entry.license_spdx.startswith("LicenseRef-")


def test_each_bundle_has_exactly_one_default_and_shipped_weights_need_an_open_licence():
    assert {e.bundle for e in REGISTRY.values() if e.default} == {e.bundle for e in REGISTRY.values()}
    assert default_for_bundle("medical_transformer_brain_mri").name == "medfm_medical_transformer_brain_t1"
    with pytest.raises(WeightsError, match="no weights registered for bundle 'nope'"):
        default_for_bundle("nope")
    with pytest.raises(ValueError, match="only weights under an open licence"):
        dataclasses.replace(get("medfm_genesis_demo"), license_spdx=None)
    with pytest.raises(WeightsError, match="ship with the bundle as models/model.pt"):
        fetch_weights("medical_transformer_brain_mri")


def test_official_genesis_facts_as_published():
    entry = get("genesis_chest_ct")
    assert entry.sha256 == "62de21a05236d6a8d8d5b03ec740f6ac6b818d15d3e86eed4f38a2a17d63cc08"
    assert entry.size == 152_639_120 and not entry.commercial_use and not entry.redistributable
    assert default_for_bundle("models_genesis_chest_ct") is entry


def test_official_universal_model_facts_as_published():
    entry = get("universal_model")
    assert entry.sha256 == "bc7960eb31af5883468efb35b776993fe664250f98eca84244d4921dc3f7e3a5"
    assert entry.size == 152_640_882 and not entry.redistributable and not entry.commercial_use
    assert entry.network_module == "medfm.networks.genesis_unet3d"  # the released file is the Genesis U-Net
    assert default_for_bundle("universal_model_sar") is entry


def test_vdt_weights_are_import_only_and_say_where_to_get_them():
    entry = get("vdt_resnet3d18_imagenet")
    assert entry.url is None and entry.sha256 == "5ff2ecb7" and not entry.redistributable
    assert entry.matches("5ff2ecb7" + "0" * 56) and not entry.matches("5ff2ecb8" + "0" * 56)
    assert default_for_bundle("vdt_resnet3d18") is entry
    with pytest.raises(WeightsError, match=r"download res3d18_imagenet_BN_73\.07-5ff2ecb7\.pth yourself .*CSPR.*"
                                           r"medfm weights import vdt_resnet3d18"):
        fetch_weights("vdt_resnet3d18")


def test_large_files_yml_lists_the_downloadable_registry_entries():
    for bundle in {e.bundle for e in REGISTRY.values()}:
        listed = yaml.safe_load((BUNDLES / bundle / "large_files.yml").read_text())["large_files"]
        expected = [e for e in REGISTRY.values() if e.bundle == bundle and e.url]
        assert [(f["url"], f["hash_val"], f["hash_type"]) for f in listed] == [(e.url, e.sha256, "sha256") for e in expected]
        assert [f["path"] for f in listed] == [f"models/{e.file_name}" for e in expected]


def test_committed_weights_are_the_registered_project_weights():
    for entry in REGISTRY.values():
        if entry.url is None and entry.redistributable:  # shipped with the bundle
            path = BUNDLES / entry.bundle / "models" / entry.file_name
            assert sha256_of(path) == entry.sha256, f"{path} changed: update the registry entry {entry.name!r}"
            assert path.stat().st_size == entry.size


def test_pumit_weights_have_no_published_hash_so_they_are_import_only():
    entry = get("pumit_b_v1")
    assert entry.sha256 is None and entry.url is None and not entry.redistributable and not entry.commercial_use
    assert not entry.matches("0" * 64)
    with pytest.raises(WeightsError, match=r"download pumit-b\.ckpt yourself .*PUMIT/releases/tag/v1.*"
                                           r"medfm weights import spad_vit_base pumit-b\.ckpt"):
        fetch_weights("spad_vit_base")
    with pytest.raises(ValueError, match="needs a sha256"):
        dataclasses.replace(entry, url="https://example.invalid/pumit-b.ckpt")
