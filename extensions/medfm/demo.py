"""``medfm demo``: the quick start's main job, on the embedded sample CT.

Runs the bundle's inference workflow on the sample as NIfTI and as a DICOM series written from it,
embeds both in one run of the embedding workflow, checks that both give the same geometry and
embedding, and draws a montage of the pretext task: input, corrupted and restored slices for each
kind of corruption.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image, ImageDraw

from . import samples
from .bundles import bundle_config, find_bundle
from .inference import embed, infer, warnings_once
from .errors import MedfmError
from .transforms.contract import logger as contract_logger
from .transforms import RandInPaint, RandLocalPixelShuffle, RandNonlinearIntensity, RandOutPaint
from .weights.checkpoint import load_checkpoint

__all__ = ["run_demo", "pretext_montage"]

CORRUPTIONS = {
    "local pixel shuffle": RandLocalPixelShuffle(prob=1.0),
    "non-linear intensity": RandNonlinearIntensity(prob=1.0),
    "in-painting": RandInPaint(prob=1.0),
    "out-painting": RandOutPaint(prob=1.0),
}


def run_demo(out: Path, bundle: str = "models_genesis_chest_ct") -> list[str]:
    """Run the demo into ``out``; returns human-readable result lines. Each warning is printed once."""
    with warnings_once():
        return _run_demo(Path(out), bundle)


def _run_demo(out: Path, bundle: str) -> list[str]:
    bundle_dir = find_bundle(bundle)
    out = Path(out)
    nifti_input = samples.path("ct_head")
    dicom_input = out / "input_dicom" / "ct_head"
    samples.write_dicom_series("ct_head", dicom_input)
    lines = [f"sample CT: {nifti_input}", f"same scan as a DICOM series: {dicom_input}"]
    original = nib.load(nifti_input)
    full_network_embeddings = {}
    for kind, source in (("nifti", nifti_input), ("dicom", dicom_input)):
        written = [Path(p) for p in infer(bundle_dir, source, out=out / kind)]
        full_network_embeddings[kind] = np.load(next(p for p in written if p.name.endswith("_embedding.npy")))
        restored_path = next(p for p in written if p.name.endswith("_restored.nii.gz"))
        restored = nib.load(restored_path)
        shift = np.abs(restored.affine - original.affine).max()
        lines += [f"{kind}: restored volume {restored_path}",
                  f"{kind}: output shape {restored.shape} (input {original.shape}), max affine difference {shift:.2e} mm"]
    summary = embed(bundle_dir, [nifti_input, dicom_input], out=out / "embeddings", progress=False)
    if summary.failed:
        raise MedfmError("; ".join(summary.failed.values()))
    vectors = {}
    for kind, source in (("nifti", nifti_input), ("dicom", dicom_input)):
        row = next(r for r in summary.rows if r["input"] == os.path.abspath(source))
        vectors[kind] = np.load(out / "embeddings" / row["embedding"])
        lines.append(f"{kind}: embedding {out / 'embeddings' / row['embedding']} {vectors[kind].shape}, cosine similarity "
                     f"{_cosine(vectors[kind], full_network_embeddings[kind]):.4f} with the full inference's "
                     "(its windows overlap)")
    lines.append(f"embeddings index (encoder only, one run for both inputs): {summary.index}")
    lines.append(f"embedding cosine similarity, NIfTI vs DICOM input: {_cosine(vectors['nifti'], vectors['dicom']):.6f}")
    contract_logger.disabled = True  # its warnings were printed above, once per input
    try:
        montage = pretext_montage(bundle_dir, nifti_input, out / "montage.png")
    finally:
        contract_logger.disabled = False
    lines.append(f"montage of input / corrupted / restored slices: {montage}")
    return lines


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def pretext_montage(bundle_dir: Path, image_path: str, target: Path, seed: int = 0) -> Path:
    """PNG with one row per corruption: input, corrupted and restored middle slice of a 64x64x32 cube."""
    parser = bundle_config(bundle_dir)
    preprocessing = parser.get_parsed_content("preprocessing")
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(load_checkpoint(bundle_dir / "models" / "model.pt"))
    network.eval()
    patch = parser.get_parsed_content("patch_size")

    volume = preprocessing({"image": image_path})["image"].as_tensor().float()
    start = [max((s - p) // 2, 0) for s, p in zip(volume.shape[1:], patch)]
    cube = volume[:, start[0] : start[0] + patch[0], start[1] : start[1] + patch[1], start[2] : start[2] + patch[2]]
    rows = []
    for index, (name, corruption) in enumerate(CORRUPTIONS.items()):
        corruption.set_random_state(seed + index)
        corrupted = corruption(cube.clone())
        with torch.no_grad():
            restored = network(corrupted[None])[0]
        rows.append((name, [cube, corrupted, restored]))

    scale, label_height = 3, 14

    def tile(volume: torch.Tensor, window: torch.Tensor) -> Image.Image:
        """Middle slice in the 1-99% window of ``window``'s values, enlarged without smoothing."""
        low, high = np.percentile(window.numpy(), [1, 99])
        middle = volume[0, :, :, volume.shape[-1] // 2].numpy().T
        grey = np.clip((middle - low) / max(high - low, 1e-6), 0, 1) * 255
        return Image.fromarray(grey.astype(np.uint8)).resize((patch[0] * scale, patch[1] * scale), Image.NEAREST)

    footer = _weights_lines(bundle_dir)
    width, height = patch[0] * scale, patch[1] * scale + label_height
    sheet = Image.new("L", (3 * width, label_height + len(rows) * height + label_height * len(footer) + 4), color=0)
    draw = ImageDraw.Draw(sheet)
    # the restoration is shown in the input's window, so it is judged on the input's scale; a corruption
    # such as the non-linear intensity map moves the values out of it, so it gets its own
    for column, title in enumerate(("input", "corrupted (own window)", "restored (input's window)")):
        draw.text((column * width + 4, 1), title, fill=255)
    for row, (name, (clean, corrupted, restored)) in enumerate(rows):
        top = label_height + row * height
        draw.text((4, top + 1), name, fill=255)
        for column, image in enumerate((tile(clean, clean), tile(corrupted, corrupted), tile(restored, clean))):
            sheet.paste(image, (column * width, top + label_height))
    for line_number, line in enumerate(footer):
        draw.text((4, label_height + len(rows) * height + 2 + line_number * label_height), line, fill=255)
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target)
    return target


def _weights_lines(bundle_dir: Path, width: int = 95) -> list[str]:
    """Which weights made the montage, what they are good for, and how to get the official ones (wrapped)."""
    import textwrap

    from .bundles import bundle_name
    from .weights import registry
    from .weights.importer import how_to_get_weights
    from .weights.records import installed_weights_id

    installed = installed_weights_id(bundle_dir)
    entry = registry.REGISTRY.get(installed)
    text = f"weights: {installed}" + (f". {entry.notes}" if entry is not None and entry.notes else "")
    downloadable = {other.name for other in registry.for_bundle(bundle_name(bundle_dir)) if other.url}
    if installed not in downloadable:
        text += f" Other weights: {how_to_get_weights(bundle_dir)}."
    return textwrap.wrap(text, width)
