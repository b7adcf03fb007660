"""Unit tests of revtorch."""
