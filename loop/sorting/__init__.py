"""Sorting: copy new photos into DEST/<category>/ with the deployed model, flag the unsure ones, record it all.

May import every stage above it in `loop` (kernel, data, scoring, model, learning, review); not `loop.folders`.
"""
