"""The one exception type for bad input: the CLI prints its message as a single line and exits 1."""
from __future__ import annotations


class AtlasError(Exception):
    """A problem with the user's input or environment, stated in one line."""
