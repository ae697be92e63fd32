"""The dose-response plot of a clamping run, as a PNG beside its Parquet file.

matplotlib's object API (`Figure`, drawn by the Agg canvas), not pyplot: no global backend or state.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa


def plot_dose_response(summary: pa.Table, path: Path, title: str) -> Path:
    """One line per neuron over the clamped values, the unclamped level dashed; KL in a second panel
    in probability mode. Written under a temporary name and renamed, like the Parquet files."""
    from matplotlib.figure import Figure

    rows = summary.to_pylist()
    probability = "p_target" in summary.column_names
    panels = [("p_target", "p_unclamped", "mean P(target), next token"),
              ("kl", None, "mean KL(clamped ‖ unclamped), nats")]
    if not probability:
        panels = [("mentions", "mentions_unclamped", "share of answers that mention the target")]
    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (key, reference, label) in zip(axes[0], panels):
        for neuron in dict.fromkeys(r["neuron"] for r in rows):
            mine = [r for r in rows if r["neuron"] == neuron]
            ax.plot([r["value"] for r in mine], [r[key] for r in mine], marker="o",
                    label=f"{neuron} ({mine[0]['site']})")
        if reference:
            ax.axhline(rows[0][reference], color="grey", linestyle="--", label="unclamped")
        ax.set_xlabel("clamped value")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
