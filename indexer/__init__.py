"""The batch pipeline: walk -> diff against the store -> decode pool -> batched encode -> commit."""

from indexer.pipeline import Indexer, IndexSummary
from indexer.walk import FileInfo, scan

__all__ = ["FileInfo", "IndexSummary", "Indexer", "scan"]
