"""Pruning that produces zero-entropy layers: NEPENTHE/EGP, iterative magnitude pruning, EASIER."""
from nepenthe_compress.prune.methods import METHODS
from nepenthe_compress.prune.run import PruneConfig, PruneResult, RoundResult, run_prune

__all__ = ["METHODS", "PruneConfig", "PruneResult", "RoundResult", "run_prune"]
