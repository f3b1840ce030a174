"""The one exception type vrlab raises for problems a user can fix (bad names, cards, files, shapes).

The CLI prints these as a single line without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VrlabError(Exception):
    """A user-facing error: the message says what is wrong, where (file, key, encoder) and what to do."""


class UnknownNameError(VrlabError, KeyError):
    """A name (encoder, benchmark, task) that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CardError(VrlabError):
    """A malformed encoder or benchmark card."""


class ImageDecodeError(VrlabError):
    """An image file that cannot be decoded."""


class ShapeError(VrlabError):
    """Tensors whose shapes cannot be combined (grids, widths, adapter inputs)."""
