"""Backwards-compatible names of the rewriting state (``fold.rewriter``)."""
from nepenthe_compress.fold.rewriter import FoldEvent, FoldOptions, GraphRewriter

FoldGraph = GraphRewriter

__all__ = ["FoldEvent", "FoldGraph", "FoldOptions"]
