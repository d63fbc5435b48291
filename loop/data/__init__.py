"""Data: what sortloop knows about each photo (manifest, items, splits, labels) and how its pixels are read.

May import the kernel (`loop.errors`, `loop.config`, `loop.workspace`, ...) only: no model, no sorting.
"""
