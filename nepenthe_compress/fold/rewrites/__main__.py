"""``python -m nepenthe_compress.fold.rewrites > docs/REWRITES.md``: print the rewrite table."""
from nepenthe_compress.fold.rewrites import table

print(table(), end="")
