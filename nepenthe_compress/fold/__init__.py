"""Fold pass: pure weight algebra (algebra.py) and the fx graph pass."""
