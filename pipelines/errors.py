"""User-facing errors: each says what went wrong and what to do about it."""

from __future__ import annotations


class GalleryMatchError(Exception):
    """An error the CLI reports as a message on stderr with a non-zero exit code."""

    exit_code = 1


class Refused(GalleryMatchError):
    """A request refused before any work was done (nothing was written)."""

    exit_code = 2


class ModelWeightsUnavailable(GalleryMatchError):
    """The weights of a requested model cannot be found or fetched."""

    exit_code = 3
