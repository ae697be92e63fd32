"""Neuron Atlas: what every MLP neuron of a language model reads and writes, in token space."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuron-atlas")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
