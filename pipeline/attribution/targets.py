"""What an attribution explains (a scalar of the last position's logits) and the baseline input it compares with.

Targets, as in the GIM and EAP-IG papers: a token's logit, a logit difference (target − foil) and a
probability difference (p(target) − p(foil), softmax over the whole vocabulary). The baseline of the
GIM paper replaces every token but special ones (BOS) by the single-space token; we also keep the first
position where a model has no BOS (SmolLM2): it is the attention sink, and moving it sends the
integration path across near-jumps (SmolLM2, "The capital of France is": the target logit jumps by 15
within 0.1 % of the path, and IG's completeness error stays above 100 % at 200 steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import AtlasError

TARGET_KINDS = ("logit", "logit_diff", "prob_diff")


@dataclass(frozen=True)
class Target:
    """The metric m(logits) an attribution explains; `foil` is needed for the two differences."""

    token: int
    foil: int | None = None
    kind: str = "logit"

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise AtlasError(f"target kind {self.kind!r} not in {', '.join(TARGET_KINDS)}")
        if self.kind != "logit" and self.foil is None:
            raise AtlasError(f"target kind {self.kind} needs a foil token")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric per sequence, `[batch]`, from logits `[batch, seq, vocab]` at the last position."""
        last = logits[:, -1]
        if self.kind == "logit":
            return last[:, self.token]
        if self.kind == "logit_diff":
            return last[:, self.token] - last[:, self.foil]
        probs = torch.softmax(last.float(), dim=-1).to(last.dtype)
        return probs[:, self.token] - probs[:, self.foil]


def token_id(tokenizer, word: str) -> int:
    """The first token of `word` as the model would continue with it (include a leading space if meant)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] == unk:
        raise AtlasError(f"target word {word!r} has no token in this tokenizer")
    return ids[0]


def space_token(tokenizer) -> int:
    """The single-space token, the GIM paper's baseline token."""
    space = tokenizer.encode(" ", add_special_tokens=False)
    if len(space) != 1:
        raise AtlasError(f"the tokenizer spells a single space as {len(space)} tokens; no space baseline")
    return space[0]


def space_baseline(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """`input_ids` `[..., seq]` with every token but special ones and the first replaced by the space token."""
    space = space_token(tokenizer)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    keep = torch.isin(input_ids, special)
    keep[..., 0] = True
    return torch.where(keep, input_ids, torch.full_like(input_ids, space))
