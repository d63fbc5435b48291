"""Unit tests of `loop.review`."""
