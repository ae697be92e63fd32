"""Live models for experiments: loading (load.py) and named hook points on MLP neurons (hooks.py).

Importing this package is cheap (no torch); the modules import torch and transformers.
"""
from __future__ import annotations

SITES = ("act", "up", "gate")  # act: input of down_proj; up, gate: that branch's pre-activation
DTYPES = ("float32", "bfloat16", "float16")
