"""The library's own exceptions. Each is an :class:`XceptionError`, so that the command line can tell a problem
with the user's input, files or environment (one line, no traceback) from a bug (a traceback)."""

from __future__ import annotations


class XceptionError(Exception):
    """Base of the library's own errors: something about the input, a file or the environment, said in words."""


class WeightFileError(XceptionError, ValueError):
    """A weight file that cannot be read, or that does not fit the model."""


class InvalidArgumentError(XceptionError, ValueError):
    """An argument or option the library cannot take; the message says what was wrong and what to do."""


class UnknownOptionError(XceptionError, TypeError):
    """An option the model or function does not have; the message lists the valid ones."""
