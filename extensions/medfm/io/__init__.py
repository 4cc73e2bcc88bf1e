"""Reading scans and writing results that line up with them."""

from .embeddings import (OutputLayout, SaveEmbedding, SaveEmbeddingd, append_index_rows, embedding_file_name, input_stem,
                         output_stem, read_index_rows)
from .dicomweb import DicomWebError, is_dicomweb_url, store_instances
from .input_list import expand_inputs
from .datalists import pretraining_datalist, read_datalist
from .regions import label_regions, read_points
from .image_folder import image_folder_classes, image_folder_datalist
from .archives import ArchiveError, MAX_UNPACKED_GIB_ENV, safe_extract_zip
from .reading import DicomSeries, LoadScan, LoadScand, ScanError, list_dicom_series
from .tables import HeaderedCSVSaver
from .target_table import target_table_datalist, target_table_labels
from .segmentation import SaveSegmentation, SaveSegmentationd, SegmentationWriteError
from .described_image import DescribedNibabelWriter, SaveDescribedImage, SaveDescribedImaged

__all__ = [
    "HeaderedCSVSaver",
    "ArchiveError",
    "DescribedNibabelWriter",
    "DicomWebError",
    "MAX_UNPACKED_GIB_ENV",
    "DicomSeries",
    "LoadScan",
    "LoadScand",
    "OutputLayout",
    "SaveDescribedImage",
    "SaveDescribedImaged",
    "SaveEmbedding",
    "SaveEmbeddingd",
    "SaveSegmentation",
    "SaveSegmentationd",
    "SegmentationWriteError",
    "ScanError",
    "append_index_rows",
    "embedding_file_name",
    "expand_inputs",
    "image_folder_classes",
    "image_folder_datalist",
    "input_stem",
    "is_dicomweb_url",
    "label_regions",
    "list_dicom_series",
    "output_stem",
    "pretraining_datalist",
    "read_datalist",
    "read_index_rows",
    "read_points",
    "safe_extract_zip",
    "store_instances",
    "target_table_datalist",
    "target_table_labels",
]
