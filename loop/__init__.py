"""sortloop: sort photos into category folders with a classifier that learns from its users.

The library lives here; `loop.cli` is a thin typer layer over it. Labeling (Label Studio) lives in the
sibling package `labeling`, which depends on this one and never the other way round.
"""

__version__ = "0.1.0"
