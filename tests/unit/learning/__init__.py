"""Unit tests of `loop.learning`."""
