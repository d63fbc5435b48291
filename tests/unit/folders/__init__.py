"""Unit tests of `loop.folders`."""
