"""Reading scans and writing results that line up with them."""

from .embeddings import SaveEmbedding, SaveEmbeddingd, input_stem

__all__ = ["SaveEmbedding", "SaveEmbeddingd", "input_stem"]
