"""Unit tests of `loop.sorting`."""
