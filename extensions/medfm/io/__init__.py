"""Reading scans and writing results that line up with them."""

from .embeddings import SaveEmbeddingd, input_stem

__all__ = ["SaveEmbeddingd", "input_stem"]
