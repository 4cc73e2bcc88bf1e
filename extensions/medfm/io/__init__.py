"""Reading scans and writing results that line up with them."""

from .embeddings import SaveEmbedding, SaveEmbeddingd, input_stem
from .reading import DicomSeries, LoadScan, LoadScand, ScanError, list_dicom_series, safe_extract_zip

__all__ = [
    "DicomSeries",
    "LoadScan",
    "LoadScand",
    "SaveEmbedding",
    "SaveEmbeddingd",
    "ScanError",
    "input_stem",
    "list_dicom_series",
    "safe_extract_zip",
]
