"""Unit tests of `labeling`."""
