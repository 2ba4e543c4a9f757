"""Search over large collections: `MetaEmbedIndex` (memory-mapped shards, exact and two-stage search), its
on-disk format (`storage`, the only code that reads or writes index files) and a Qdrant adapter (`qdrant`)."""

from .index import MetaEmbedIndex, SearchResults
from .storage import STORAGE_DTYPES

__all__ = ["STORAGE_DTYPES", "MetaEmbedIndex", "SearchResults"]
