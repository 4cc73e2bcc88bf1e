import dataclasses
import json

import pytest
import torch

from medfm.errors import WeightsError
from medfm.weights import (
    fetch_weights,
    import_weights,
    installed_weights_id,
    load_checkpoint,
    registry,
    sha256_of,
    verify_bundle_weights,
)
from tests.conftest import save_upstream_checkpoint


@pytest.fixture
def registered_test_weights(monkeypatch, http_root, server):
    """A registry entry for a checkpoint written like the upstream one and served on loopback."""
    path = http_root / "Genesis_Test.pt"
    weights = save_upstream_checkpoint(path, legacy=True, seed=3)
    entry = dataclasses.replace(
        registry.get("genesis_chest_ct"), name="genesis_test", file_name=path.name,
        sha256=sha256_of(path), size=path.stat().st_size, url=server.url(path.name))
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    return entry, weights


def _assert_model_file_holds(bundle, weights):
    saved = load_checkpoint(bundle / "models" / "model.pt")
    assert set(saved) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(saved[key].to(value.dtype), value)


@pytest.mark.parametrize("legacy", [True, False])
def test_import_upstream_layout(genesis_bundle, tmp_path, legacy):
    source = tmp_path / "upstream.pt"
    weights = save_upstream_checkpoint(source, legacy=legacy)
    report = import_weights(genesis_bundle, source)
    _assert_model_file_holds(genesis_bundle, weights)
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.weights is None
    assert report.output_sha256 == sha256_of(genesis_bundle / "models" / "model.pt")
    provenance = json.loads((genesis_bundle / "models" / "weights.json").read_text())
    assert provenance["source_sha256"] == sha256_of(source)
    lines = verify_bundle_weights(genesis_bundle)
    assert "loads strictly (106 tensors" in lines[0] and "unregistered weights" in lines[1]


def test_registered_file_with_wrong_hash_is_refused_and_nothing_written(genesis_bundle, tmp_path):
    before = sha256_of(genesis_bundle / "models" / "model.pt")
    fake = tmp_path / "Genesis_Chest_CT.pt"  # the registered official file name
    save_upstream_checkpoint(fake)
    with pytest.raises(WeightsError, match="does not match registered weights 'genesis_chest_ct'"):
        import_weights(genesis_bundle, fake)
    assert sha256_of(genesis_bundle / "models" / "model.pt") == before


def test_registered_hash_is_recognised(genesis_bundle, registered_test_weights, http_root):
    entry, weights = registered_test_weights
    report = import_weights(genesis_bundle, http_root / entry.file_name)
    assert report.weights == "genesis_test"
    assert any("registered weights 'genesis_test'" in line for line in verify_bundle_weights(genesis_bundle))


def test_foreign_checkpoint_is_rejected_with_keys_listed(genesis_bundle, tmp_path):
    before = sha256_of(genesis_bundle / "models" / "model.pt")
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(WeightsError, match=r"keys do not match the bundle network: missing \['down_tr64"):
        import_weights(genesis_bundle, other)
    assert sha256_of(genesis_bundle / "models" / "model.pt") == before
    wrong_shape = tmp_path / "wrong_shape.pt"
    state = load_checkpoint(genesis_bundle / "models" / "model.pt")
    state["out_tr.final_conv.weight"] = torch.zeros(3, 64, 1, 1, 1)
    torch.save(state, wrong_shape)
    with pytest.raises(WeightsError, match="does not fit the bundle network"):
        import_weights(genesis_bundle, wrong_shape)


def test_input_channels_are_adapted_and_dtype_converted(genesis_bundle, tmp_path):
    source = tmp_path / "upstream.pt"
    weights = save_upstream_checkpoint(source)
    report = import_weights(genesis_bundle, source, in_channels=2, dtype="float16")
    saved = load_checkpoint(genesis_bundle / "models" / "model.pt")
    first = saved["down_tr64.ops.0.conv1.weight"]
    assert first.shape == (32, 2, 3, 3, 3) and first.dtype == torch.float16 and report.in_channels == 2
    torch.testing.assert_close(first.float().sum(dim=1, keepdim=True), weights["down_tr64.ops.0.conv1.weight"], atol=2e-3, rtol=1e-2)
    assert saved["down_tr64.ops.0.bn1.num_batches_tracked"].dtype == torch.int64


def test_fetch_downloads_verifies_imports_and_reuses_the_cache(genesis_bundle, registered_test_weights, server, medfm_home):
    entry, weights = registered_test_weights
    report = fetch_weights(genesis_bundle, weights=entry.name, progress=False)
    _assert_model_file_holds(genesis_bundle, weights)
    assert report.weights == entry.name
    assert (medfm_home / "weights" / entry.file_name).is_file()
    hits = len(server.requests)
    fetch_weights(genesis_bundle, weights=entry.name, progress=False)
    assert len(server.requests) == hits, "a verified cached copy is not downloaded again"


def test_fetch_of_the_official_entry_enforces_its_published_hash(genesis_bundle, server, http_root, medfm_home):
    save_upstream_checkpoint(http_root / "impostor.pt")
    with pytest.raises(WeightsError, match="size mismatch|sha256 mismatch"):
        fetch_weights(genesis_bundle, url=server.url("impostor.pt"), progress=False)
    assert not (medfm_home / "weights" / "Genesis_Chest_CT.pt").exists()


def test_fetch_refuses_weights_of_another_bundle_and_unknown_names(genesis_bundle, monkeypatch):
    other = dataclasses.replace(registry.get("genesis_chest_ct"), name="foreign", bundle="another_bundle")
    monkeypatch.setitem(registry.REGISTRY, other.name, other)
    with pytest.raises(WeightsError, match="belong to bundle 'another_bundle'"):
        fetch_weights(genesis_bundle, weights="foreign")
    with pytest.raises(WeightsError, match="unknown weights 'nope'"):
        fetch_weights(genesis_bundle, weights="nope")
    with pytest.raises(WeightsError, match="have no download URL"):
        fetch_weights(genesis_bundle, weights="medfm_genesis_demo")


def test_installed_weights_id(genesis_bundle, tmp_path):
    assert installed_weights_id(genesis_bundle) == "medfm_genesis_demo"
    source = tmp_path / "upstream.pt"
    save_upstream_checkpoint(source)
    import_weights(genesis_bundle, source)
    assert installed_weights_id(genesis_bundle) == f"unregistered:{sha256_of(genesis_bundle / 'models' / 'model.pt')[:16]}"
    (genesis_bundle / "models" / "model.pt").unlink()
    assert installed_weights_id(genesis_bundle) == "none"


def test_a_checkpoint_with_nan_in_one_tensor_is_refused_at_import_and_at_verify(genesis_bundle, tmp_path):
    source = tmp_path / "upstream.pt"
    weights = save_upstream_checkpoint(source)
    key = next(k for k in weights if k.endswith("conv1.weight"))
    weights[key][0, 0, 0, 0, 0] = float("nan")
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, source)
    before = sha256_of(genesis_bundle / "models" / "model.pt")
    with pytest.raises(WeightsError, match=r"upstream\.pt: 1 tensor\(s\) hold NaN or infinite values: .*conv1\.weight \(1\); nothing written"):
        import_weights(genesis_bundle, source)
    assert sha256_of(genesis_bundle / "models" / "model.pt") == before
    installed = load_checkpoint(genesis_bundle / "models" / "model.pt")
    installed["out_tr.final_conv.bias"] = installed["out_tr.final_conv.bias"] + float("inf")
    torch.save(installed, genesis_bundle / "models" / "model.pt")
    with pytest.raises(WeightsError, match=r"model\.pt: 1 tensor\(s\) hold NaN or infinite values: out_tr\.final_conv\.bias \(1\)$"):
        verify_bundle_weights(genesis_bundle)


def test_verify_names_the_tensors_a_partial_import_left_fresh(genesis_bundle, tmp_path):
    source = tmp_path / "encoder_only.pt"
    weights = save_upstream_checkpoint(source)
    encoder = {k: v for k, v in weights.items() if k.startswith("down_tr")}
    torch.save({"state_dict": encoder}, source)
    report = import_weights(genesis_bundle, source, strict=False)
    assert report.missing_keys and all(not k.startswith("down_tr") for k in report.missing_keys)
    (line, *_) = verify_bundle_weights(genesis_bundle)
    assert "loads strictly" not in line and f"found no weights for {len(report.missing_keys)} of them" in line
