"""The computational graph EAP scores: nodes, edges and their indices (Hanna et al. 2024, §2).

Sources, in forward order: the input embedding (the residual entering layer 0), then per layer every
attention head's own write to the residual stream (`a{l}.h{h}`) and the MLP's output (`m{l}`).
Destinations: per layer, each head's query, key and value inputs (`a{l}.h{h}<q>`, `<k>`, `<v>`, head by
head), then the MLP's input (`m{l}`); last the logits (the residual before the final norm). Every source
feeds every later destination; a head does not feed the other heads of its own layer, but feeds its
layer's MLP. Edge count: E = Σ_l [3H(1 + l(H+1)) + (1 + l(H+1) + H)] + (1 + L(H+1)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("q", "k", "v")


def expected_edges(n_layers: int, n_heads: int) -> int:
    """The number of edges of an `n_layers` × `n_heads` model, by the closed formula."""
    per_layer = (3 * n_heads * (1 + l * (n_heads + 1)) + (1 + l * (n_heads + 1) + n_heads) for l in range(n_layers))
    return sum(per_layer) + 1 + n_layers * (n_heads + 1)


@dataclass(frozen=True)
class Graph:
    """Sources, destinations and which (source, destination) pairs are edges."""

    n_layers: int
    n_heads: int  # query heads
    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    valid: torch.Tensor = field(compare=False, repr=False)  # bool [n_sources, n_destinations]

    @classmethod
    def build(cls, n_layers: int, n_heads: int) -> Graph:
        """The graph of a decoder with `n_layers` layers of `n_heads` query heads each."""
        sources, destinations = ["input"], []
        for l in range(n_layers):
            sources += [f"a{l}.h{h}" for h in range(n_heads)] + [f"m{l}"]
            destinations += [f"a{l}.h{h}<{k}>" for h in range(n_heads) for k in KINDS] + [f"m{l}"]
        destinations.append("logits")
        valid = torch.zeros(len(sources), len(destinations), dtype=torch.bool)
        for l in range(n_layers):
            start = l * (3 * n_heads + 1)
            valid[: 1 + l * (n_heads + 1), start: start + 3 * n_heads] = True
            valid[: 1 + l * (n_heads + 1) + n_heads, start + 3 * n_heads] = True
        valid[:, -1] = True
        return cls(n_layers, n_heads, tuple(sources), tuple(destinations), valid)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> Graph:
        """The graph of a live Hugging Face model of a supported family."""
        from pipeline.circuits.model_parts import parts_of

        parts = parts_of(model)
        return cls.build(len(parts.blocks), parts.n_heads)

    @property
    def n_edges(self) -> int:
        """How many (source, destination) pairs are edges."""
        return int(self.valid.sum())

    # Index arithmetic; scores and patching address the matrix with these.
    def upstream(self, layer: int, kind: str) -> int:
        """How many sources (a prefix of `sources`) feed the attention (`"attn"`) or `"mlp"` inputs of `layer`."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if kind == "mlp" else 0)

    def head_sources(self, layer: int) -> slice:
        """The source indices of `layer`'s heads."""
        start = 1 + layer * (self.n_heads + 1)
        return slice(start, start + self.n_heads)

    def mlp_source(self, layer: int) -> int:
        """The source index of `layer`'s MLP."""
        return (layer + 1) * (self.n_heads + 1)

    def qkv_destinations(self, layer: int, kind: str) -> slice:
        """The destination indices of `kind` (q, k or v) of every head of `layer`, in head order."""
        start = layer * (3 * self.n_heads + 1) + KINDS.index(kind)
        return slice(start, start + 3 * self.n_heads, 3)

    def mlp_destination(self, layer: int) -> int:
        """The destination index of `layer`'s MLP input."""
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_destination(self) -> int:
        """The destination index of the logits."""
        return len(self.destinations) - 1

    def edge_name(self, src: int, dst: int) -> str:
        """A readable edge name, e.g. `a3.h2->a5.h1<q>` or `m4->logits`."""
        return f"{self.sources[src]}->{self.destinations[dst]}"

    def kind(self, dst: int) -> str:
        """What the destination is: q, k, v, mlp or logits."""
        if dst == self.logits_destination:
            return "logits"
        offset = dst % (3 * self.n_heads + 1)
        return "mlp" if offset == 3 * self.n_heads else KINDS[offset % 3]

    def layer_of_source(self, src: int) -> int | None:
        """The layer of a head or MLP source; None for the input."""
        return None if src == 0 else (src - 1) // (self.n_heads + 1)

    def layer_of_destination(self, dst: int) -> int | None:
        """The layer of a q/k/v or MLP destination; None for the logits."""
        return None if dst == self.logits_destination else dst // (3 * self.n_heads + 1)
