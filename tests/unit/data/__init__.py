"""Unit tests of `loop.data`."""
