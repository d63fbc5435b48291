"""Unit tests of `loop.scoring`."""
