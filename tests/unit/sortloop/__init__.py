"""Unit tests of `sortloop`."""
