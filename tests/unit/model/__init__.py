"""Unit tests of `loop.model`."""
