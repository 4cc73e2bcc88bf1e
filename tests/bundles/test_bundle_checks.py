"""The checks every bundle passes (the model zoo's, plus this project's layout rules), one row per bundle."""

import hashlib
import json
import re
import shutil
import sys

import pytest
import torch

from medfm.bundles import bundle_network
from medfm.weights import load_checkpoint
from tests.conftest import BUNDLES, run_command

pytestmark = pytest.mark.slow

BUNDLE_DIRS = sorted(p for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
REQUIRED_FILES = ["configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                  "configs/multi_gpu_train.json", "configs/pretrain.json", "configs/multi_gpu_pretrain.json", "configs/logging.conf", "docs/README.md",
                  "configs/embed.json", "LICENSE", "large_files.yml"]
#: Keys every inference.json / train.json defines, so the bundles read as rows of one table.
SHARED_KEYS = {
    "inference.json": {"bundle_root", "output_dir", "ckpt_path", "input_image", "series_uid", "input_contract",
                       "embeddings_index", "datalist", "device", "pin_memory", "patch_size", "network_def", "network", "preprocessing",
                       "dataset", "dataloader", "inferer", "postprocessing", "handlers", "evaluator", "initialize", "run"},
    "train.json": {"bundle_root", "output_dir", "ckpt_dir", "pretrained", "pretrained_path", "dataset_dir",
                   "datalist", "val_fraction", "device", "pin_memory", "seed", "num_classes", "label_names", "patch_size", "network_def",
                   "network", "loss", "optimizer", "resume", "training_state_dir", "amp", "accumulate", "train", "validate",
                   "initialize", "run"},
    "pretrain.json": {"bundle_root", "output_dir", "data_dir", "image_glob", "datalist", "images", "max_epochs", "device", "pin_memory",
                      "seed", "patch_size", "network_def", "network", "loss", "optimizer", "resume", "training_state_dir",
                      "rank_zero", "amp", "accumulate", "train", "initialize", "run"},
}


def test_every_bundle_is_found():
    assert {p.name for p in BUNDLE_DIRS} >= {"models_genesis_chest_ct", "universal_model_sar"}


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_required_files_and_shared_config_keys(bundle):
    assert [f for f in REQUIRED_FILES if not (bundle / f).is_file()] == []
    for config, keys in SHARED_KEYS.items():
        assert keys - set(json.loads((bundle / "configs" / config).read_text())) == set(), config
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["name"] == bundle.name


def test_every_segmentation_fine_tuning_has_the_one_evaluation_overlay():
    """A fine-tuning config that validates by Dice has an evaluation overlay (``evaluate.json`` for ``train.json``,
    else ``evaluate_<task>.json``), and these overlays are one file: the same bytes in every bundle."""
    overlays = {}
    for bundle in BUNDLE_DIRS:
        for config in sorted((bundle / "configs").glob("train*.json")):
            if "val_mean_dice" in json.loads(config.read_text()).get("validate", {}).get("key_metric", {}):
                name = "evaluate.json" if config.name == "train.json" else config.name.replace("train", "evaluate")
                overlays[f"{bundle.name}/{name}"] = (bundle / "configs" / name).read_bytes()
    assert len(overlays) == 4  # Genesis and SAR (train.json), VDT and SPAD-ViT (train_segmentation.json)
    assert len(set(overlays.values())) == 1, sorted(overlays)


def test_files_with_nothing_bundle_specific_are_one_file():
    """The fine-tuning DDP overlay, the logging configuration and the Apache licence text below each LICENSE's
    bundle-specific header are the same bytes in every bundle, so a fix to one cannot miss the others."""
    for shared in ("configs/multi_gpu_train.json", "configs/logging.conf"):
        assert len({(bundle / shared).read_bytes() for bundle in BUNDLE_DIRS}) == 1, shared
    licence_texts = {(bundle / "LICENSE").read_text().partition("                                 Apache License\n")
                     for bundle in BUNDLE_DIRS}
    assert all(separator for _, separator, _ in licence_texts), "every LICENSE carries the Apache text"
    assert len({text for _, _, text in licence_texts}) == 1


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_every_config_import_is_used(bundle):
    """A ``$import X`` is used as ``X.`` by its config or by an overlay that runs on top of it."""
    texts = {path.name: path.read_text() for path in (bundle / "configs").glob("*.json")}
    every = "\n".join(texts.values())
    for name, text in texts.items():
        for statement in json.loads(text).get("imports", []):
            module = statement.removeprefix("$import ").strip()
            assert re.search(rf"\b{re.escape(module)}\.", every), f"{name}: {statement} is never used"


def test_embedding_overlays_differ_only_in_what_the_embedding_runs():
    """Every configs/embed.json has the same keys and the same runner; only the inferer, the output key
    and the pooling (the layers the embedding needs) and the region crop size are the bundle's own, and the two
    sliding-window bundles set their windows' overlap."""
    own = {"embedding_inferer", "embedding_key", "embedding_pooling", "region_size", "window_overlap"}
    overlays = {bundle.name: json.loads((bundle / "configs" / "embed.json").read_text()) for bundle in BUNDLE_DIRS}
    reference = overlays["models_genesis_chest_ct"]
    for name, overlay in overlays.items():
        assert set(overlay) - {"window_overlap"} == set(reference) - {"window_overlap"}, name
        assert ("window_overlap" in overlay) == (name in ("models_genesis_chest_ct", "universal_model_sar")), name
        assert {key: value for key, value in overlay.items() if key not in own} == \
            {key: value for key, value in reference.items() if key not in own}, name
        assert overlay["run"] == ["$@embedder.run()"] and overlay["embedder"]["inferer"] == "@embedding_inferer"


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_training_saves_its_state_and_logs_on_rank_zero_only(bundle):
    for config in sorted((bundle / "configs").glob("train*.json")):
        content = json.loads(config.read_text())
        handlers = content["train"]["handlers"]
        targets = [h["_target_"] for h in handlers]
        assert targets[:2] == ["medfm.workflows.PretrainedWeightsLoader", "medfm.workflows.TrainingState"], config.name
        assert handlers[1]["resume"] == "@resume"
        # rank > 0 builds no log handler (a TensorBoard writer makes its file when built); savers stay on
        # every rank and write on rank 0 only
        for handler in handlers + content["validate"]["handlers"]:
            logs = handler["_target_"] in ("StatsHandler", "TensorBoardStatsHandler")
            assert (handler.get("_disabled_") == "$not @rank_zero") == logs, (config.name, handler["_target_"])
        assert content["rank_zero"] is True
    overlay = json.loads((bundle / "configs" / "multi_gpu_train.json").read_text())
    assert overlay["rank_zero"] == "$torch.distributed.get_rank() == 0"
    assert not [key for key in overlay if key.endswith("#_disabled_")], "no handler is muted by its list position"
    pretrain = json.loads((bundle / "configs" / "pretrain.json").read_text())
    state = [h for h in pretrain["train"]["handlers"] if h["_target_"] == "medfm.workflows.TrainingState"]
    assert len(state) == 1 and state[0]["resume"] == "@resume"
    assert ("lr_scheduler" in state[0]["objects"]) == ("lr_scheduler" in pretrain), "a schedule must resume with the rest"


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_every_trainer_takes_amp_and_accumulate(bundle):
    for config in sorted((bundle / "configs").glob("*train*.json")):
        content = json.loads(config.read_text())
        if "train" not in content or "trainer" not in content["train"]:
            continue  # an overlay
        trainer = content["train"]["trainer"]
        assert (content["amp"], content["accumulate"]) == (False, 1), config.name
        assert trainer["amp"] == "$medfm.workflows.mixed_precision(@amp, @device)", config.name
        assert trainer["amp_kwargs"] == "$medfm.workflows.autocast_kwargs(@device)", config.name
        assert trainer["accumulation_steps"] == "@accumulate", config.name
        # medfm's trainer: one all-reduce per accumulated step under DDP, and no trainable parameter left untrained
        assert trainer["_target_"] == "medfm.engines.SupervisedTrainer", config.name
        assert content["initialize"][0] == "$medfm.engines.seed_process(@seed)", config.name


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_inference_seeds_without_cudnn_determinism_and_every_loader_pins_memory_on_cuda(bundle):
    for config in sorted((bundle / "configs").glob("*.json")):
        text = config.read_text()
        assert "set_determinism" not in text, f"{config.name}: seed with medfm.engines.seed_process (one stream per rank)"
        content = json.loads(text)
        if config.name.startswith(("inference", "evaluate")):
            seeds = [line for line in content.get("initialize", []) if "seed_process" in line]
            assert seeds and all(line.endswith(", deterministic=False)") for line in seeds), config.name
        loaders = re.findall(r'"_target_": "DataLoader",\n\s*"pin_memory": "@pin_memory"', text)
        assert len(loaders) == text.count('"_target_": "DataLoader"'), config.name
        if loaders:  # torch.device(): MONAI Label overrides the device with a string
            assert content["pin_memory"] == "$torch.device(@device).type == 'cuda'", config.name


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_pretraining_logs_on_rank_zero_only(bundle):
    content = json.loads((bundle / "configs" / "pretrain.json").read_text())
    sections = [content["train"]["handlers"]] + ([content["validate"]["handlers"]] if "validate" in content else [])
    for handler in (h for handlers in sections for h in handlers):
        writes_logs = handler["_target_"] in ("StatsHandler", "TensorBoardStatsHandler", "medfm.workflows.LossComponentsLogger")
        assert (handler.get("_disabled_") == "$not @rank_zero") == writes_logs, handler["_target_"]
    assert content["rank_zero"] is True


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_metadata_is_valid_against_the_shipped_schema(bundle):
    """MONAI's own ``verify_metadata`` (in-process; the command line form is tested below) with medfm's copy."""
    from monai.bundle import verify_metadata

    from medfm.bundles import metadata_schema

    path = metadata_schema(bundle)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(path))  # raises when invalid
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_the_readme_offline_metadata_check_reads_the_shipped_schema_without_download():
    """The README's form, as a user runs it: ``verify_metadata --filepath "$(medfm schema .)"``."""
    bundle = BUNDLE_DIRS[0]
    schema = run_command([sys.executable, "-m", "medfm", "schema", "."], cwd=bundle)
    assert schema.returncode == 0, schema.stderr
    result = run_command([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                          "configs/metadata.json", "--filepath", schema.stdout.strip()], cwd=bundle)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "skipped downloading" in log and "metadata is verified with no error" in log


def test_a_schema_medfm_does_not_ship_is_named(tmp_path):
    shutil.copytree(BUNDLE_DIRS[0] / "configs", tmp_path / "configs")
    metadata = json.loads((tmp_path / "configs" / "metadata.json").read_text())
    metadata["schema"] = "https://example.org/schemas/meta_schema_29990101.json"
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(metadata))
    result = run_command([sys.executable, "-m", "medfm", "schema", str(tmp_path)])
    assert result.returncode == 1 and result.stderr.strip() == (
        f"medfm: error: {tmp_path}/configs/metadata.json: medfm ships no copy of the schema "
        "https://example.org/schemas/meta_schema_29990101.json (it has: meta_schema_20240725.json); "
        "verify_metadata would download it")


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_network_input_and_output_match_the_metadata(bundle, monkeypatch):
    """MONAI's ``verify_net_in_out`` in-process: it raises when the network's input or output disagrees."""
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(bundle)  # the configs' relative paths, as from the bundle folder
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json")


#: Bundles exported by tracing (as the model zoo allows), each with why scripting is not possible.
TRACED = {"spad_vit_base": "the token grid, positions and depth stride follow the input shape and spacing in Python; "
                           "the traced module serves the traced geometry only (docs/README.md)"}


@pytest.mark.parametrize("bundle", BUNDLE_DIRS, ids=lambda p: p.name)
def test_checkpoint_exports_to_torchscript(bundle, tmp_path):
    """The shipped weights, or (for bundles that ship none) freshly initialised ones."""
    weights = bundle / "models" / "model.pt"
    if not weights.is_file():
        weights = tmp_path / "model.pt"
        torch.save(bundle_network(bundle).state_dict(), weights)
    exported = tmp_path / "model.ts"
    result = run_command([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
                          "--ckpt_file", str(weights), "--meta_file", "configs/metadata.json",
                          "--config_file", "configs/inference.json",
                          *(["--use_trace", "True", "--input_shape", "[1, 1, 64, 64, 32]"] if bundle.name in TRACED else [])],
                         cwd=bundle)
    assert result.returncode == 0, result.stderr[-2000:]
    eager = bundle_network(bundle)
    eager.load_state_dict(load_checkpoint(weights))
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(exported))(x), eager.eval()(x))
