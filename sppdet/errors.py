"""User-facing errors.

Anything raised as :class:`SppdetError` is a problem with the user's input
(a file, a flag, a config value).  The CLI prints its message as one line,
``sppdet: error: <message>``, and exits with status 2 -- never a traceback.
Messages always name the file (or option) and say what is wrong with it.
"""

from __future__ import annotations


class SppdetError(Exception):
    """A problem with user input; printed as one line by the CLI (exit 2)."""

    exit_code = 2


class ConfigError(SppdetError):
    """A config file or value is wrong (unknown key, wrong type, bad value)."""


class DatasetError(SppdetError):
    """A dataset file (split list, annotation, image) is missing or malformed."""


class ImageDecodeError(DatasetError):
    """An image file cannot be decoded (missing, truncated, corrupt, unknown format)."""


class CacheError(SppdetError):
    """A cache file is unusable in a way that cannot be repaired by rebuilding it."""


class CheckpointError(SppdetError):
    """A checkpoint file is missing, corrupt, or from an incompatible version."""


class DiskFullError(SppdetError):
    """The disk (or quota) filled up while writing a file; the message names the file."""
