"""The images a pre-training run reads: a folder and a glob, or a datalist file (the same keys in every bundle)."""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import MedfmError
from .image_folder import image_folder_datalist

__all__ = ["pretraining_datalist", "read_datalist"]


def pretraining_datalist(data_dir: str | os.PathLike | None, image_glob: str | Mapping[str, str] | None,
                         datalist: str | os.PathLike | None = None, group_key: str = "group",
                         required: Sequence[str] = ("image",), class_folders: bool = False) -> list[dict]:
    """``[{"image": path, "source": path, ...}, ...]``: the files a datalist file lists, or else those ``image_glob``
    matches in ``data_dir``.

    ``source`` repeats the path as a string, so a batch still names its scans once loading has
    replaced ``image`` by pixels (a diverging loss can be traced to its inputs; distributed tests
    check which ranks saw which scans).

    Args:
        data_dir: folder the glob is relative to (ignored when ``datalist`` is given).
        image_glob: a glob (``**`` descends into sub-folders), or a mapping name -> glob: every
            match of a pattern then carries ``{group_key: name}`` (the modality of each scan for the
            Universal Model, say). Matches are sorted, so runs are reproducible; hidden entries are left out.
        datalist: a ``.json`` file (a list of objects or of paths, or MONAI's ``{"training": [...]}``)
            or a ``.csv`` file with a header, listing one image per row; other fields are kept.
            Relative paths are relative to the datalist's folder.
        group_key: the field a mapping's names go to.
        required: fields every item must have.
        class_folders: ``data_dir`` is an ImageFolder tree (one sub-folder per class, the glob applies
            inside each) and every image's ``label`` is its folder's name.

    Raises:
        MedfmError: one line naming the folder or file and what is wrong (nothing matched, a listed
            image that does not exist, an item without a required field, a file that is not a datalist).
    """
    if datalist is not None and str(datalist) != "":
        items = read_datalist(datalist, required)
    elif class_folders:
        items = image_folder_datalist(data_dir, image_glob or "**/*")
    else:
        items = _globbed(data_dir, image_glob, group_key)
        missing = [name for name in required if name not in items[0]]
        if missing:
            raise MedfmError(f"{data_dir}: a folder and glob give only images; this run needs {', '.join(missing)} "
                             "per image as well: list them in a --datalist file")
    return [dict(item, source=item["image"]) for item in items]


def _globbed(data_dir, image_glob, group_key: str) -> list[dict]:
    if data_dir is None or not Path(data_dir).is_dir():
        raise MedfmError(f"{data_dir}: not a folder (set --data_dir to the folder of images, or give a --datalist file)")
    if not image_glob:
        raise MedfmError(f"{data_dir}: no --image_glob given (a pattern such as '*.nii.gz' or '**/*.dcm')")
    patterns = image_glob.items() if isinstance(image_glob, Mapping) else [(None, image_glob)]
    items = []
    for name, pattern in patterns:
        matches = sorted(glob.glob(str(pattern), root_dir=str(data_dir), recursive=True))
        matches = [match for match in matches if not any(part.startswith(".") for part in Path(match).parts)]
        if not matches:
            raise MedfmError(f"{data_dir}: no files match --image_glob {pattern!r}")
        for match in matches:
            item = {"image": str(Path(data_dir) / match)}
            if name is not None:
                item[group_key] = name
            items.append(item)
    return items


def read_datalist(path: str | os.PathLike, required: Sequence[str] = ("image",)) -> list[dict]:
    """The items of a ``.json`` or ``.csv`` datalist, with relative image paths made absolute (see
    :func:`pretraining_datalist`); a listed image that does not exist is an error naming its row."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise MedfmError(f"{path}: cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise MedfmError(f"{path}: not a UTF-8 text file") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        numbered = [(f"line {number}", row) for number, row in enumerate(rows, start=2)]
    else:
        numbered = [(f"item {number}", row) for number, row in enumerate(_json_items(path, text), start=1)]
    if not numbered:
        raise MedfmError(f"{path}: the datalist lists no images")
    items = []
    for where, row in numbered:
        if not isinstance(row, dict):
            raise MedfmError(f"{path}: {where} is neither a path nor an object with an 'image' field")
        missing = [name for name in required if row.get(name) in (None, "")]
        if missing:
            raise MedfmError(f"{path}: {where} has no {', '.join(missing)}")
        image = Path(str(row["image"]).strip()).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.exists():
            raise MedfmError(f"{path}: {where} lists {image}, which does not exist")
        items.append(dict(row, image=str(image)))
    return items


def _json_items(path: Path, text: str) -> list:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise MedfmError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if isinstance(content, dict):
        if not isinstance(content.get("training"), list):
            raise MedfmError(f"{path}: a JSON datalist is a list of images or an object with a 'training' list")
        content = content["training"]
    if not isinstance(content, list):
        raise MedfmError(f"{path}: a JSON datalist is a list of images or an object with a 'training' list")
    return [{"image": item} if isinstance(item, str) else item for item in content]
