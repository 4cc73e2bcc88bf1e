"""NIfTI outputs that say which model made them: MONAI's ``SaveImage`` with the NIfTI header's
``descrip`` field set (``medfm.weights.weights_description``: bundle, version, weights)."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.transforms import SaveImage, SaveImaged

__all__ = ["DescribedNibabelWriter", "SaveDescribedImage", "SaveDescribedImaged"]

#: Bytes in a NIfTI-1 header's ``descrip`` field.
DESCRIP_BYTES = 80


class DescribedNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes ``description`` (at most 80 bytes of UTF-8) into ``descrip``."""

    @classmethod
    def create_backend_obj(cls, data_array, affine=None, dtype=None, description: str = "", **kwargs):
        image = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        image.header["descrip"] = description.encode("utf-8")[:DESCRIP_BYTES].decode("utf-8", "ignore").encode("utf-8")
        return image


class SaveDescribedImage(SaveImage):
    """``SaveImage`` to NIfTI with ``description`` in each file's header; other arguments as ``SaveImage``'s."""

    def __init__(self, description: str, **kwargs) -> None:
        super().__init__(writer=DescribedNibabelWriter, output_ext=kwargs.pop("output_ext", ".nii.gz"), **kwargs)
        self.set_options(write_kwargs={"description": description})


class SaveDescribedImaged(SaveImaged):
    """Dictionary version of :class:`SaveDescribedImage`."""

    def __init__(self, keys: KeysCollection, description: str, **kwargs) -> None:
        super().__init__(keys, writer=DescribedNibabelWriter, output_ext=kwargs.pop("output_ext", ".nii.gz"), **kwargs)
        self.set_options(write_kwargs={"description": description})
