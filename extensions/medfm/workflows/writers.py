"""What a task bundle writes per input of a cohort run: segmentations (with statistics) or predictions.

Both are :class:`~medfm.workflows.cohort.CohortWriter` s: :class:`~medfm.workflows.cohort.CohortRunner`
calls them once per input with the network's output, and merges the rows they return into one
table per run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.utils.type_conversion import convert_data_type

from ..errors import MedfmError
from ..io.segmentation import SaveSegmentation, labels_by_value
from .cohort import ROW_COLUMNS, CohortWriter

__all__ = ["PredictionWriter", "SegmentationWriter", "STATISTICS_COLUMNS", "label_statistics"]

#: Columns of ``statistics.csv`` after :data:`~medfm.workflows.cohort.ROW_COLUMNS`: per input and label, its
#: size, the input's intensity inside it (the input's own units: HU for CT) and its bounding box (world mm, LPS,
#: of the label's voxel centres); empty cells for a label absent from the input.
STATISTICS_COLUMNS = ("label", "name", "voxels", "volume_ml", "mean", "std", "min", "max",
                      "bbox_min_x", "bbox_min_y", "bbox_min_z", "bbox_max_x", "bbox_max_y", "bbox_max_z")
#: RAS -> LPS: the first two world axes change sign.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def label_statistics(label: np.ndarray, image: np.ndarray, affine: np.ndarray, labels: Mapping[int, str]) -> list[dict]:
    """One row per label value in ``labels`` (present or not): voxel count, volume (ml), the image's mean,
    standard deviation (population), minimum and maximum inside the label, and the bounding box of its voxel
    centres in world mm (LPS).

    ``label`` and ``image``: ``(X, Y, Z)`` arrays on one grid; ``affine``: that grid's voxel-to-world (RAS, mm).
    """
    label, image = np.asarray(label), np.asarray(image)
    if label.shape != image.shape:
        raise ValueError(f"the label {label.shape} and the image {image.shape} are not on one grid")
    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    rows = []
    for value, name in sorted(labels.items()):
        inside = label == value
        voxels = int(inside.sum())
        row = {"label": value, "name": name, "voxels": voxels, "volume_ml": f"{voxels * voxel_ml:.6g}"}
        if voxels:
            values = image[inside].astype(np.float64)
            indices = np.argwhere(inside).astype(np.float64)
            world = (affine[:3, :3] @ indices.T).T + affine[:3, 3]
            world *= _RAS_TO_LPS
            low, high = world.min(axis=0), world.max(axis=0)
            row.update({"mean": f"{values.mean():.6g}", "std": f"{values.std():.6g}", "min": f"{values.min():.6g}",
                        "max": f"{values.max():.6g}"})
            row.update({f"bbox_{end}_{axis}": f"{bound[i]:.3f}" for end, bound in (("min", low), ("max", high))
                        for i, axis in enumerate("xyz")})
        rows.append(row)
    return rows


def _postprocessed(postprocessing: Callable | None, image, output) -> torch.Tensor:
    """The bundle's postprocessing run on one input's output, as its evaluator runs it on a decollated item."""
    prediction = output[0] if isinstance(output, torch.Tensor) else output
    if postprocessing is None:
        return prediction
    return postprocessing({"image": image, "pred": prediction})["pred"]


class SegmentationWriter(CohortWriter):
    """A label volume per input on the input's own grid: NIfTI, and a DICOM-SEG for DICOM inputs
    (:class:`~medfm.io.SaveSegmentation`), indexed in ``segmentations.csv``; with ``statistics``, the rows of
    ``statistics.csv`` (:func:`label_statistics`) as well.

    Args:
        postprocessing: turns the network's output for one input (``pred``, with the preprocessed ``image``) into
            label values on the input's grid (e.g. softmax, argmax, ``Invertd``).
        labels: the label names, Decathlon style (``{"0": "background", "1": "liver"}``) or in value order.
        dicom_seg: also write a DICOM-SEG for DICOM inputs.
        statistics: also write ``statistics.csv``.
        algorithm: the name the DICOM-SEG gives its algorithm (the task bundle's name).
        preview: also write ``<input>_preview.png``: the input's middle planes with the segmentation overlaid.
        modality: the model's modality (the input contract's), for the preview's display window when the input
            does not say.
    """

    file_columns = ("segmentation", "dicom_seg")
    action = "segmented"

    def __init__(self, postprocessing: Callable | None, labels: Mapping[int | str, str] | Sequence[str],
                 dicom_seg: bool = True, statistics: bool = False, algorithm: str = "medfm", preview: bool = False,
                 modality: str | Sequence[str] = "") -> None:
        self.postprocessing = postprocessing
        self.labels = labels_by_value(labels)
        self.dicom_seg = bool(dicom_seg)
        self.statistics = bool(statistics)
        self.preview = bool(preview)
        self.modality = modality if isinstance(modality, str) else ""
        self.needs_source = self.statistics or self.preview
        self.algorithm = algorithm
        self.tables = {"segmentations.csv": (*ROW_COLUMNS, "segmentation", "dicom_seg")}
        if self.statistics:
            self.tables["statistics.csv"] = (*ROW_COLUMNS, *STATISTICS_COLUMNS)

    def result(self, image, output, name: str):
        """The label volume ``(1, X, Y, Z)`` on the input's grid (a MetaTensor with the input's affine)."""
        return _postprocessed(self.postprocessing, image, output)

    def __call__(self, item: dict, image, output, source, output_dir: Path, row: dict) -> dict[str, list[dict]]:
        mask = self.result(image, output, item["image"])
        statistics = []
        if self.statistics:
            values = convert_data_type(mask, np.ndarray)[0]
            values = values[0] if values.ndim == 4 else values
            statistics = [{**_cells(row), **cells} for cells in label_statistics(
                np.rint(values), convert_data_type(source, np.ndarray)[0], convert_data_type(source.affine, np.ndarray)[0],
                self.labels)]
        saver = SaveSegmentation(output_dir, self.labels, dicom_seg=self.dicom_seg, algorithm=self.algorithm)
        written = saver(mask, image.meta)
        if self.preview:
            self._write_preview(item["image"], source, written[0], output_dir)
        files = {"segmentation": written[0].name, "dicom_seg": written[1].name if len(written) > 1 else ""}
        return {"segmentations.csv": [{**_cells(row), **files}], "statistics.csv": statistics}

    def _write_preview(self, name: str, source, segmentation: Path, output_dir: Path) -> None:
        """The input as read, its middle planes with the written segmentation overlaid (a CT model's input in the CT window)."""
        import nibabel as nib

        from ..io.embeddings import input_stem, output_stem
        from ..preview import write_scan_preview

        modality = source.meta.get("Modality") or (self.modality if self.modality == "CT" else "")
        write_scan_preview(output_dir / f"{output_stem(name)}_preview.png", convert_data_type(source, np.ndarray)[0],
                           convert_data_type(source.affine, np.ndarray)[0], modality,
                           [(segmentation.name, np.asarray(nib.load(segmentation).dataobj))], title=input_stem(name))


class PredictionWriter(CohortWriter):
    """One row per input in ``predictions.csv``: the predicted class and a probability column per class (named
    by the class), or for regression the predicted value.

    Args:
        postprocessing: turns the network's output for one input into class probabilities (e.g. softmax) or
            the value; ``None`` keeps the output.
        classes: class names in the network's output order; ``None`` for regression (one value).
    """

    action = "predicted"

    def __init__(self, postprocessing: Callable | None, classes: Sequence[str] | Mapping | None = None) -> None:
        self.postprocessing = postprocessing
        if isinstance(classes, Mapping):  # {"0": name, ...}
            classes = [classes[key] for key in sorted(classes, key=int)]
        self.classes = [str(name) for name in classes] if classes is not None else None
        clashing = sorted(set(self.classes or ()) & {*ROW_COLUMNS, "prediction"})
        if clashing:
            raise MedfmError(f"class names {clashing} clash with the columns of predictions.csv; rename those classes")
        self.tables = {"predictions.csv": (*ROW_COLUMNS, "prediction", *(self.classes or ()))}

    def result(self, image, output, name: str) -> dict[str, float] | float:
        """The class probabilities by class name, or the regression value."""
        values = convert_data_type(_postprocessed(self.postprocessing, image, output), np.ndarray)[0]
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            raise MedfmError(f"{name}: the prediction holds non-finite values (NaN or Inf); not written")
        if self.classes is None:
            if values.size != 1:
                raise MedfmError(f"{name}: a regression gives one value, the network gave {values.size}")
            return float(values[0])
        if values.size != len(self.classes):
            raise MedfmError(f"{name}: the network gave {values.size} values for {len(self.classes)} classes")
        return {class_name: float(value) for class_name, value in zip(self.classes, values)}

    def __call__(self, item: dict, image, output, source, output_dir: Path, row: dict) -> dict[str, list[dict]]:
        result = self.result(image, output, item["image"])
        if not isinstance(result, dict):
            return {"predictions.csv": [{**_cells(row), "prediction": f"{result:.6g}"}]}
        cells = {name: f"{value:.6g}" for name, value in result.items()}
        return {"predictions.csv": [{**_cells(row), "prediction": max(result, key=result.get), **cells}]}


def _cells(row: Mapping) -> dict:
    return {column: row[column] for column in ROW_COLUMNS}
