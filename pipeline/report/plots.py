"""Matplotlib figures of an atlas, returned as PNG bytes so a caller can write or embed them."""
from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

MATRIX_COLORS = {"up": "tab:blue", "gate": "tab:orange", "down": "tab:green"}


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def agreement_plot(layer_rows: Sequence[dict], title: str) -> bytes:
    """Top-1 agreement and mean top-k Jaccard per layer, one line per matrix (rows of compare_models)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True)
    for matrix, color in MATRIX_COLORS.items():
        rows = sorted((r for r in layer_rows if r["matrix"] == matrix), key=lambda r: r["layer"])
        if rows:
            layers = [r["layer"] for r in rows]
            axes[0].plot(layers, [r["top1_agreement"] for r in rows], "o-", ms=3, color=color, label=matrix)
            axes[1].plot(layers, [r["mean_jaccard"] for r in rows], "o-", ms=3, color=color, label=matrix)
    for ax, label in zip(axes, ("share of neurons with the same top-1 token", "mean Jaccard of top-k sets")):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(title="matrix")
    fig.suptitle(title)
    return _png(fig)


def zscore_plot(max_z: dict[str, dict[int, Sequence[float]]]) -> bytes:
    """Distribution of each neuron's max z-score per layer: one box plot panel per matrix."""
    fig, axes = plt.subplots(len(max_z), 1, figsize=(11, 2.6 * len(max_z)), squeeze=False, sharex=True)
    for ax, (matrix, by_layer) in zip(axes[:, 0], max_z.items()):
        layers = sorted(by_layer)
        ax.boxplot([by_layer[layer] for layer in layers], positions=layers, widths=0.6, showfliers=False,
                   patch_artist=True, boxprops={"facecolor": MATRIX_COLORS.get(matrix, "grey"), "alpha": 0.5})
        ax.set_ylabel(f"{matrix}: max z")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle("How specialised neurons are, per layer (max z-score of each neuron's logits; whiskers 1.5 IQR)")
    return _png(fig)


def glitch_plot(layer_rows: Sequence[dict]) -> bytes:
    """Per layer, the share of neurons whose top-1 is the layer's most common top-1 token, labelled with it."""
    matrices = [m for m in MATRIX_COLORS if any(r["matrix"] == m for r in layer_rows)]
    fig, axes = plt.subplots(len(matrices), 1, figsize=(11, 2.6 * len(matrices)), squeeze=False, sharex=True)
    for ax, matrix in zip(axes[:, 0], matrices):
        rows = sorted((r for r in layer_rows if r["matrix"] == matrix), key=lambda r: r["layer"])
        shares = [r["most_common_top1_neurons"] / r["neurons"] for r in rows]
        ax.bar([r["layer"] for r in rows], shares, color=MATRIX_COLORS[matrix], alpha=0.7)
        for r, share in zip(rows, shares):
            ax.annotate(repr(r["most_common_top1"])[1:-1][:12], (r["layer"], share), ha="center", va="bottom",
                        rotation=90, fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_ylabel(f"{matrix}: share")
        ax.set_ylim(0, max(shares, default=0) * 1.6 + 1e-3)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel("layer")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Glitch tokens: share of a layer's neurons topped by its most common top-1 token")
    return _png(fig)
