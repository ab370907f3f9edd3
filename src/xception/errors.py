"""The library's own exceptions."""

from __future__ import annotations


class WeightFileError(ValueError):
    """A weight file that cannot be read, or that does not fit the model."""
