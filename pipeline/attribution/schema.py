"""The attribution tables as explicit Arrow schemas, and where each file lives under OUT/attributions/.

Hive layout, one file per (model, task, method) so a rerun replaces exactly what it recomputed:
    attributions/tokens/model=<m>/task=<t>/method=<method>.parquet    one row per prompt × position
    attributions/neurons/model=<m>/task=<t>/method=<method>.parquet   one row per prompt × layer × neuron
    attributions/faithfulness/model=<m>/task=<t>.parquet               one row per prompt × method
    attributions/faithfulness/model=<m>/curves.png
`neurons` joins the atlas's `neurons` view on (model, layer, neuron); `activation` is the neuron's mean
activation (input of down_proj) over the prompt's positions, `score` sums over positions.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

TOKEN_SCORES = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("method", pa.string()), ("prompt_id", pa.int32()),
    ("position", pa.int32()), ("token_id", pa.int32()), ("token", pa.string()), ("score", pa.float32()),
])
NEURON_SCORES = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("method", pa.string()), ("prompt_id", pa.int32()),
    ("layer", pa.int32()), ("neuron", pa.int32()), ("score", pa.float32()), ("activation", pa.float32()),
])
_CURVE = pa.list_(pa.float64())
FAITHFULNESS = pa.schema([
    ("model", pa.string()), ("task", pa.string()), ("method", pa.string()), ("prompt_id", pa.int32()),
    ("metric", pa.float64()), ("comprehensiveness", pa.float64()), ("sufficiency", pa.float64()),
    ("area_zero", pa.float64()), ("area_mean", pa.float64()), ("seconds", pa.float64()),
    ("cost", pa.float64()),  # seconds / seconds of one plain forward + backward on the same prompt
    ("comprehensiveness_curve", _CURVE), ("sufficiency_curve", _CURVE),
    ("zero_curve", _CURVE), ("mean_curve", _CURVE),
])


def scores_path(out: Path, level: str, model: str, task: str, method: str) -> Path:
    """Where one (model, task, method) file of `tokens` or `neurons` scores lives."""
    return out / "attributions" / level / f"model={model}" / f"task={task}" / f"method={method}.parquet"


def faithfulness_path(out: Path, model: str, task: str) -> Path:
    return out / "attributions" / "faithfulness" / f"model={model}" / f"task={task}.parquet"


def curves_path(out: Path, model: str) -> Path:
    return out / "attributions" / "faithfulness" / f"model={model}" / "curves.png"
