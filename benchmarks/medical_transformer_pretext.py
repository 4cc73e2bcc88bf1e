"""Held-out check of the Medical Transformer weights: masked-slice prediction and nearest neighbours.

    .venv/bin/python tests/testdata.py                      # the real T1 volumes
    .venv/bin/python benchmarks/medical_transformer_pretext.py [--weights FILE] [--out DIR]

Every real T1 brain volume reachable here (tests/testdata.py ``brain_t1_datalist``: 6 files of 4
subjects) goes through the bundle's own inference preprocessing, then gets ``--augmentations``
fresh draws of the pre-training augmentation (``RandT1Augmentation``) and slice masks, seeded
from ``--seed`` (the pre-training run never used these seeds: held-out draws, not held-out brains).

Masked encoding-vector prediction (stage 2 loss, MSE summed over the three views) is compared
with two baselines that see the same visible slices: the mean visible embedding of the view
("predict the mean embedding") and linear interpolation between the nearest visible neighbours.
Nearest neighbours: for each augmented volume, is the closest other augmented volume (Euclidean,
192-d volume embedding) of the same subject? Reported for the given weights and for a randomly
initialised network. Results: ``summary.csv`` (metric, value) and ``per_volume.csv`` in ``--out``;
the bundle's docs/heldout_summary.csv is this script's output for the committed weights.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from benchmark_tables import write_rows  # beside this script

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "medical_transformer_brain_mri"
sys.path.insert(0, str(REPO))


def neighbour_interpolation(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Predict each masked slice by linear interpolation between the nearest visible slices of its view."""
    visible = (~mask[0]).nonzero()[:, 0].float()
    positions = torch.arange(target.shape[1], dtype=torch.float32)
    right = torch.searchsorted(visible, positions).clamp(1, len(visible) - 1)
    left = right - 1
    span = (visible[right] - visible[left]).clamp(min=1)
    weight = ((positions - visible[left]) / span).clamp(0, 1)[None, :, None]
    return (1 - weight) * target[:, visible[left].long()] + weight * target[:, visible[right].long()]


def nearest_neighbour_accuracy(embeddings: torch.Tensor, subjects: list[str]) -> tuple[float, float, float]:
    """Share of items whose nearest other item is the same subject; mean same- and other-subject distances."""
    distances = torch.cdist(embeddings, embeddings)
    same = torch.tensor([[a == b for b in subjects] for a in subjects])
    eye = torch.eye(len(subjects), dtype=torch.bool)
    nearest = distances.masked_fill(eye, float("inf")).argmin(dim=1)
    accuracy = float(same[torch.arange(len(subjects)), nearest].float().mean())
    return accuracy, float(distances[same & ~eye].mean()), float(distances[~same].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(BUNDLE / "models" / "model.pt"))
    parser.add_argument("--augmentations", type=int, default=4, help="augmented copies per volume")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "medical_transformer_pretext"))
    args = parser.parse_args()

    from monai.bundle import ConfigParser

    from medfm.networks import MedicalTransformer
    from medfm.networks.medical_transformer import mean_embedding_baseline
    from medfm.transforms import RandSliceMask, RandT1Augmentation
    from medfm.weights import load_checkpoint
    from medfm.workflows import MaskedEmbeddingLoss
    from tests import testdata

    problems = testdata.fetch()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    parser_ = ConfigParser()
    parser_.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser_["bundle_root"] = str(BUNDLE)
    preprocessing = parser_.get_parsed_content("preprocessing")

    torch.manual_seed(args.seed)
    networks = {"weights": MedicalTransformer(), "random_init": MedicalTransformer()}
    networks["weights"].load_state_dict(load_checkpoint(args.weights))
    for network in networks.values():
        network.eval()

    rows, embeddings, subjects = [], {name: [] for name in networks}, []
    augment, masker = RandT1Augmentation(), RandSliceMask(0.1)
    for item_index, item in enumerate(testdata.brain_t1_datalist()):
        volume = preprocessing({"image": item["image"]})["image"].as_tensor()
        for draw in range(args.augmentations):
            seed = args.seed + 100 * item_index + draw
            augment.set_random_state(seed)
            masker.set_random_state(seed)
            image = augment(volume)[None].float()
            masks = masker(image[0])[None]
            with torch.no_grad():
                output = networks["weights"].masked_prediction(image, masks)
                targets, view_masks = output["target"], output["masks"]
                # the unmasked slice embeddings are the pretext targets: encode each volume once
                trained = networks["weights"]
                embeddings["weights"].append(trained.volume_embedding(trained.contextual_embeddings(targets))[0])
                embeddings["random_init"].append(networks["random_init"](image)[0])
            errors = {
                "model": MaskedEmbeddingLoss.view_errors(output["predicted"], targets, view_masks),
                "mean_embedding": MaskedEmbeddingLoss.view_errors(
                    [mean_embedding_baseline(t, m) for t, m in zip(targets, view_masks)], targets, view_masks),
                "neighbour_interpolation": MaskedEmbeddingLoss.view_errors(
                    [neighbour_interpolation(t, m) for t, m in zip(targets, view_masks)], targets, view_masks),
            }
            rows.append({"image": Path(item["image"]).name, "subject": item["subject"], "seed": seed,
                         **{f"{name}_mse": float(sum(values)) for name, values in errors.items()}})
            subjects.append(item["subject"])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out / "per_volume.csv")
    summary = {"held_out_volumes": len(rows)}
    for name in ("model", "mean_embedding", "neighbour_interpolation"):
        summary[f"masked_mse_{name}"] = sum(row[f"{name}_mse"] for row in rows) / len(rows)
    for name, vectors in embeddings.items():
        accuracy, same, other = nearest_neighbour_accuracy(torch.stack(vectors), subjects)
        summary[f"nn_same_subject_{name}"] = accuracy
        summary[f"distance_ratio_same_to_other_{name}"] = same / other
    with open(out / "summary.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["metric", "value"])
        writer.writerows([name, f"{value:.4f}" if isinstance(value, float) else value] for name, value in summary.items())
    for name, value in summary.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
