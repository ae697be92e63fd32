"""The faithfulness curves of one model as a PNG: a row per task; comprehensiveness, zero and mean ablation."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.atlas.schema import write_atomic  # noqa: E402
from pipeline.attribution.faithfulness import ABLATION_STEPS  # noqa: E402

PANELS = (("comprehensiveness_curve", "tokens replaced (top k)", "relative drop of the metric"),
          ("zero_curve", "neurons set to zero (top k)", "drop of the metric"),
          ("mean_curve", "neurons set to their mean (top k)", "drop of the metric"))


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """Point-wise mean over prompts; a prompt with a shorter curve (fewer tokens) counts where it has points."""
    length = max(len(c) for c in curves)
    return [sum(c[i] for c in curves if len(c) > i) / sum(1 for c in curves if len(c) > i) for i in range(length)]


def plot_curves(rows: list[dict], path: Path, model: str) -> Path:
    """Mean curve per method over each task's prompts; floors dashed."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(len(tasks), len(PANELS), figsize=(4.2 * len(PANELS), 3.2 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks):
        for ax, (key, xlabel, ylabel) in zip(row_axes, PANELS):
            for method in methods:
                curves = [r[key] for r in rows if r["task"] == task and r["method"] == method and r[key]]
                if not curves:
                    continue
                ys = _mean_curve(curves)
                xs = list(range(1, len(ys) + 1)) if key == "comprehensiveness_curve" else list(ABLATION_STEPS[: len(ys)])
                style = "--" if method in ("random", "activation") else "-"
                ax.plot(xs, ys, style, marker=".", label=method)
            if key != "comprehensiveness_curve":
                ax.set_xscale("log", base=2)
            ax.set_title(f"{task}", fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)  # the neuron panels show every method and floor
    fig.suptitle(f"{model}: faithfulness (higher is better)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return path
