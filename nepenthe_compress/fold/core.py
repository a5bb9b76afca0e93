"""Backwards-compatible names of the fold pass (``fold.driver``)."""
from nepenthe_compress.fold.driver import FoldedModel, fold_model

FoldedGraph = FoldedModel
fold_graph = fold_model

__all__ = ["FoldedGraph", "fold_graph"]
