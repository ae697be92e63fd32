"""What a clamping experiment measures: next-token statistics against the unclamped run, and mentions.

For the target's token set T and next-token distributions p (clamped) and p0 (unclamped):
  p_target = sum_{t in T} p_t;  log-odds change = logit(p_target) - logit(p0_target), logit(q) = log(q/(1-q));
  kl = KL(p || p0) = sum_i p_i (log p_i - log p0_i), in nats.
All in float64 from log-softmax, so probabilities far below float32's resolution keep their precision.
A text mentions the concept when one of its words names a target word by the rule of sql/words.sql.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from pipeline.words import matching_token_ids

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class NextToken:
    """The next-token statistics of one clamped forward pass against its unclamped twin."""

    p_target: float
    p_target_unclamped: float
    log_odds_change: float
    kl: float
    top1: int
    top1_unclamped: int


def log_odds(log_p: float) -> float:
    """logit(p) from log p; +inf when p rounds to 1."""
    return log_p - math.log(-math.expm1(log_p)) if log_p < 0 else math.inf


def next_token(logits: torch.Tensor, unclamped: torch.Tensor, target: torch.Tensor) -> NextToken:
    """Statistics of the next-token logits [vocab] against the unclamped ones, for target ids [n]."""
    log_p, log_p0 = logits.double().log_softmax(-1), unclamped.double().log_softmax(-1)
    lt, lt0 = log_p[target].logsumexp(-1).item(), log_p0[target].logsumexp(-1).item()
    kl = (log_p.exp() * (log_p - log_p0)).sum().item()
    return NextToken(math.exp(lt), math.exp(lt0), log_odds(lt) - log_odds(lt0), max(kl, 0.0),
                     int(log_p.argmax()), int(log_p0.argmax()))


def mentions(texts: list[str], words: tuple[str, ...]) -> list[bool]:
    """Whether each text has a word that names one of `words` ('Water' and 'waters' name 'water')."""
    split = [_WORD.findall(text) for text in texts]
    vocab = sorted({w for ws in split for w in ws})
    hits = {vocab[i] for word in words for i in matching_token_ids(vocab, word)}
    return [any(w in hits for w in ws) for ws in split]
