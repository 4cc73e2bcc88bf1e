"""Bundle archives for ``monai.bundle.download``: contents, index, and downloads from a loopback server."""

import dataclasses
import json
import shutil
import sys
import zipfile

import monai.bundle
import numpy as np
import pytest
import torch

import medfm
from medfm.bundles import list_bundle_dirs
from medfm.networks import SpadViT, vdt_resnet18
from medfm.errors import MedfmError
from medfm.release import MODEL_INFO, download_bundle, release_bundles
from medfm.weights import fetch_weights, import_weights, load_checkpoint, registry, sha256_of
from tests.conftest import BUNDLES, run_command, save_upstream_checkpoint

ALL = [p.name for p in list_bundle_dirs()]
SHIPPED_WEIGHTS = {"models_genesis_chest_ct", "medical_transformer_brain_mri"}


def test_every_bundle_is_archived_under_one_top_level_folder_with_an_index(tmp_path):
    released = release_bundles(tmp_path, base_url="https://github.com/medfm/medfm/releases/download/v0.1.0")
    assert sorted(r.name for r in released) == sorted(ALL)
    index = json.loads((tmp_path / MODEL_INFO).read_text())
    for item in released:
        archive = tmp_path / item.file
        assert item.file == f"{item.name}_v{item.version}.zip" and index[item.key]["sha256"] == sha256_of(archive)
        assert index[item.key]["size"] == archive.stat().st_size and index[item.key]["source"].endswith("/" + item.file)
        names = zipfile.ZipFile(archive).namelist()
        assert all(n.startswith(f"{item.name}/") for n in names)
        assert {f"{item.name}/configs/metadata.json", f"{item.name}/LICENSE", f"{item.name}/docs/README.md"} <= set(names)
        assert (f"{item.name}/models/model.pt" in names) == (item.name in SHIPPED_WEIGHTS)
    again = release_bundles(tmp_path / "again", ["vdt_resnet3d18"])
    assert again[0].sha256 == index[again[0].key]["sha256"]  # byte-reproducible


def test_imported_or_self_trained_weights_never_enter_an_archive(tmp_path):
    bundle = tmp_path / "vdt_resnet3d18"
    shutil.copytree(BUNDLES / "vdt_resnet3d18", bundle)
    (bundle / "models").mkdir(exist_ok=True)
    torch.save({"conv1.weight": torch.zeros(1)}, bundle / "models" / "model.pt")
    (item,) = release_bundles(tmp_path / "out", [str(bundle)])
    assert item.weights == "none"
    assert not any("/models/" in n for n in zipfile.ZipFile(tmp_path / "out" / item.file).namelist())


def test_a_task_bundle_ships_its_own_weights_when_asked_and_their_source_allows(tmp_path):
    from medfm.task_bundle import make_label_bundle

    task = make_label_bundle("models_genesis_chest_ct", "tissue", tmp_path / "tissue_seg")  # from the demo weights
    (plain,) = release_bundles(tmp_path / "plain", [str(task)])
    assert plain.weights == "none"
    (item,) = release_bundles(tmp_path / "out", [str(task)], own_weights=True)
    assert item.weights == "tissue_seg (fine-tuned from medfm_genesis_demo)"
    copy = download_bundle("tissue_seg", str(tmp_path / "out" / MODEL_INFO), bundle_dir=tmp_path / "downloaded", progress=False)
    assert sha256_of(copy / "models" / "model.pt") == sha256_of(task / "models" / "model.pt")
    assert (copy / "configs" / "embed.json").is_file()

    official = registry.get("genesis_chest_ct")  # non-commercial research only: nothing derived from it ships
    metadata = json.loads((task / "configs" / "metadata.json").read_text())
    metadata["task_bundle"].update(source_weights=official.name, source_sha256=official.sha256)
    (task / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(MedfmError, match="fine-tuned from genesis_chest_ct, whose licence is ASU licence"):
        release_bundles(tmp_path / "refused", [str(task)], own_weights=True)
    assert not (tmp_path / "refused" / "tissue_seg_v0.1.0.zip").exists()
    with pytest.raises(MedfmError, match="is not a task bundle"):
        release_bundles(tmp_path / "refused", ["vdt_resnet3d18"], own_weights=True)


def test_release_cli_reports_and_fails_in_one_line(tmp_path):
    cli = [sys.executable, "-m", "medfm.cli", "release"]
    result = run_command(cli + ["spad_vit_base", "--out", str(tmp_path)])
    version = json.loads((BUNDLES / "spad_vit_base" / "configs" / "metadata.json").read_text())["version"]
    assert result.returncode == 0 and f"spad_vit_base_v{version}.zip" in result.stdout and (tmp_path / MODEL_INFO).is_file()
    bad = run_command(cli + ["no_such_bundle", "--out", str(tmp_path / "bad")])
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "unknown bundle 'no_such_bundle'" in bad.stderr


@pytest.mark.slow
def test_bundles_download_with_monai_from_loopback_and_run_from_the_copy(http_root, server, tmp_path, monkeypatch, small_ct):
    released = {r.name: r for r in release_bundles(http_root, base_url=server.url("").rstrip("/"))}
    downloaded = tmp_path / "downloaded"
    for name, item in released.items():
        monai.bundle.download(name=name, version=item.version, bundle_dir=str(downloaded), url=server.url(item.file),
                              progress=False)
        assert (downloaded / name / "configs" / "metadata.json").is_file()
    assert sha256_of(http_root / released["spad_vit_base"].file) == released["spad_vit_base"].sha256

    # the "github" source, its release URL pointed at the loopback server (in this process only)
    monkeypatch.setattr(monai.bundle.scripts, "_get_git_release_url",
                        lambda owner, repo, tag_name, filename: server.url(filename))
    from_github = tmp_path / "from_github"
    monai.bundle.download(name="models_genesis_chest_ct", version=released["models_genesis_chest_ct"].version,
                          bundle_dir=str(from_github), source="github",
                          repo="medfm/medfm/v0.1.0", progress=False)
    genesis = from_github / "models_genesis_chest_ct"
    assert sha256_of(genesis / "models" / "model.pt") == sha256_of(BUNDLES / "models_genesis_chest_ct" / "models" / "model.pt")

    network = monai.bundle.load(name="models_genesis_chest_ct", bundle_dir=str(from_github), workflow_type="inference",
                                device="cpu", progress=False)
    expected = load_checkpoint(genesis / "models" / "model.pt")
    assert all(torch.equal(network.state_dict()[k], v) for k, v in expected.items())

    # weights for the bundles that ship none: the registered download (its URL and hash pointed at a
    # file in the upstream layout on the loopback server), and imports of the authors' layouts
    upstream = http_root / "Universal_model.pt"
    save_upstream_checkpoint(upstream, seed=5)
    entry = dataclasses.replace(registry.get("universal_model"), sha256=sha256_of(upstream), size=upstream.stat().st_size,
                                url=server.url(upstream.name))
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "medfm_home"))
    assert fetch_weights(downloaded / "universal_model_sar", progress=False).weights == "universal_model"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in vdt_resnet18(feed_forward=False).state_dict().items()}},
               tmp_path / "vdt.pth")
    import_weights(downloaded / "vdt_resnet3d18", tmp_path / "vdt.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in SpadViT(task="mim").state_dict().items()}}, tmp_path / "pumit.ckpt")
    import_weights(downloaded / "spad_vit_base", tmp_path / "pumit.ckpt")

    # inference from every downloaded copy, run from an unrelated working directory; on a small crop of the sample
    # CT (what is tested is the copy, not the network), except the Medical Transformer, whose input is a whole brain
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ALL:
        bundle = downloaded / name
        scan = [] if name == "medical_transformer_brain_mri" else ["--input_image", str(small_ct)]
        result = run_command([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                              "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
                              "--output_dir", str(tmp_path / "out" / name), *scan], cwd=elsewhere)
        assert result.returncode == 0, result.stderr[-2000:]
        embedding = np.load(next((tmp_path / "out" / name).glob("*_embedding.npy")))
        assert np.isfinite(embedding).all()
    assert medfm.weights.installed_weights_id(downloaded / "models_genesis_chest_ct") == "medfm_genesis_demo"


def _cli(*args):
    return run_command([sys.executable, "-m", "medfm.cli", *args])


def test_medfm_download_checks_the_archive_against_the_index_before_unpacking(http_root, server, tmp_path):
    (item,) = release_bundles(http_root, ["spad_vit_base"], base_url=server.url("").rstrip("/"))
    index, target = server.url(MODEL_INFO), tmp_path / "bundles"
    result = _cli("download", "spad_vit_base", "--index", index, "--bundle_dir", str(target), "--progress", "False")
    assert result.returncode == 0, result.stderr
    assert (target / "spad_vit_base" / "configs" / "metadata.json").is_file()

    with open(http_root / item.file, "ab") as archive:  # a corrupted (or swapped) file on the server
        archive.write(b"tampered")
    bad = _cli("download", "spad_vit_base", "--index", index, "--bundle_dir", str(target), "--progress", "False")
    assert bad.returncode == 1 and "size mismatch" in bad.stderr and bad.stderr.count("\n") == 1
    assert sorted(p.name for p in target.iterdir()) == ["spad_vit_base"]  # the good copy stays, nothing half-written

    missing = _cli("download", "no_such_bundle", "--index", index, "--bundle_dir", str(target))
    assert missing.returncode == 1 and "lists no bundle 'no_such_bundle'" in missing.stderr


def test_medfm_download_refuses_archive_members_that_escape_the_folder(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    crafted = served / "evil_v0.1.0.zip"
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr("evil/configs/metadata.json", json.dumps({"name": "evil", "version": "0.1.0"}))
        archive.writestr("evil/../../escaped.txt", "outside")
    index = {"evil_v0.1.0": {"name": "evil", "version": "0.1.0", "file": crafted.name, "sha256": sha256_of(crafted),
                             "size": crafted.stat().st_size, "source": crafted.name}}
    (served / MODEL_INFO).write_text(json.dumps(index))
    target = tmp_path / "bundles"
    result = _cli("download", "evil", "--index", str(served / MODEL_INFO), "--bundle_dir", str(target))
    assert result.returncode == 1 and "outside the extraction folder" in result.stderr
    assert not (tmp_path / "escaped.txt").exists() and list(target.iterdir()) == []


def _serve_release(served, name="evil", members=None, **fields):
    """A release archive of ``name`` and a model_info.json for it, with ``fields`` replacing the entry's own."""
    served.mkdir(exist_ok=True)
    archive = served / f"{name}_v0.1.0.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as opened:
        opened.writestr(f"{name}/configs/metadata.json", json.dumps({"name": name, "version": "0.1.0"}))
        for member, data in (members or {}).items():
            opened.writestr(member, data)
    entry = {"name": name, "version": "0.1.0", "file": archive.name, "sha256": sha256_of(archive),
             "size": archive.stat().st_size, "source": archive.name}
    (served / MODEL_INFO).write_text(json.dumps({f"{name}_v0.1.0": {**entry, **fields}}))
    return served / MODEL_INFO


def test_an_index_file_field_cannot_write_outside_the_bundle_folder(tmp_path):
    victim = tmp_path / "victim.zip"
    victim.write_text("keep me")
    index = _serve_release(tmp_path / "served", file=str(victim))
    (tmp_path / "served" / "evil_v0.1.0.zip").replace(tmp_path / "served" / "x.zip")
    target = tmp_path / "bundles"
    result = _cli("download", "evil", "--index", str(index), "--bundle_dir", str(target))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "'file' must be a plain .zip file name (no folders, no '..')" in result.stderr
    assert victim.read_text() == "keep me" and list(target.iterdir()) == []


@pytest.mark.parametrize("fields, expected", [
    ({"file": "../../escaped.zip"}, r"'file' must be a plain \.zip file name .* not '\.\./\.\./escaped\.zip'"),
    ({"file": "/etc/passwd"}, r"'file' must be a plain \.zip file name"),
    ({"size": "322"}, r"'size' must be a whole number of bytes, not '322'"),
    ({"size": True}, r"'size' must be a whole number of bytes, not True"),
    ({"sha256": None}, r"'sha256' must be 64 hexadecimal digits, not None"),
    ({"sha256": "abc"}, r"'sha256' must be 64 hexadecimal digits, not 'abc'"),
    ({"version": ["0", "1"]}, r"'version' must be a version string"),
    ({"source": "ftp://example.org/evil.zip"}, r"'source' has the scheme 'ftp'; only http\(s\) or the index's own"),
    ({"source": 7}, r"'source' must be a URL or file name, not 7"),
])
def test_every_field_of_an_index_entry_is_checked(tmp_path, fields, expected):
    index = _serve_release(tmp_path / "served", **fields)
    with pytest.raises(MedfmError, match=r"model_info\.json: entry 'evil_v0\.1\.0': " + expected):
        download_bundle("evil", str(index), bundle_dir=tmp_path / "bundles")
    assert list((tmp_path / "bundles").iterdir()) == []


def test_an_index_that_is_not_an_object_and_a_name_that_is_a_path(tmp_path):
    (tmp_path / MODEL_INFO).write_text("[1, 2]")
    with pytest.raises(MedfmError, match=r"model_info\.json: not a model_info\.json: its top level is a JSON list"):
        download_bundle("evil", str(tmp_path / MODEL_INFO), bundle_dir=tmp_path / "bundles")
    with pytest.raises(MedfmError, match=r"'\.\./evil' is not a bundle name"):
        download_bundle("../evil", str(tmp_path / MODEL_INFO), bundle_dir=tmp_path / "bundles")


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_MAX_UNPACKED_GIB", "0.01")  # 10 MiB; the member below unpacks to 64 MiB
    index = _serve_release(tmp_path / "served", members={"evil/docs/zeros.bin": bytes(64 << 20)})
    assert (tmp_path / "served" / "evil_v0.1.0.zip").stat().st_size < 1 << 20
    with pytest.raises(MedfmError, match=r"evil_v0\.1\.0\.zip: refused: its members unpack to 0\.06 GiB, over the 0\.01 GiB "
                                         r"limit \(\$MEDFM_MAX_UNPACKED_GIB\)"):
        download_bundle("evil", str(index), bundle_dir=tmp_path / "bundles")
    assert list((tmp_path / "bundles").iterdir()) == []


@pytest.mark.parametrize("link_at", ["docs/notes.md", "docs", "LICENSE"])
def test_release_refuses_symbolic_links_instead_of_packing_their_targets(tmp_path, link_at):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for publication")
    bundle = tmp_path / "vdt_resnet3d18"
    shutil.copytree(BUNDLES / "vdt_resnet3d18", bundle)
    link = bundle / link_at
    if link.is_dir():
        shutil.rmtree(link)
    link.unlink(missing_ok=True)
    link.symlink_to(secret if link_at != "docs" else tmp_path)
    with pytest.raises(MedfmError, match=rf"{link}: is a symbolic link; a release holds only the bundle's own regular files"):
        release_bundles(tmp_path / "out", [str(bundle)])
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
