"""What an experiment reads: prompts from a file, neurons from a candidates query, the target's token ids."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import transformers

from pipeline.clamp.config import ClampConfig, NeuronSpec, parse_neuron
from pipeline.errors import AtlasError
from pipeline.query import run_sql
from pipeline.words import matching_token_ids


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, used as written; or, for a .jsonl file, a JSON string or {"prompt": ...} per
    line. Blank lines are skipped."""
    try:
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    except OSError as e:
        raise AtlasError(f"cannot read the prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise AtlasError(f"{path}: the prompt file is not UTF-8 text") from None
    if not lines:
        raise AtlasError(f"{path}: the prompt file holds no prompt")
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str) or not prompt:
            raise AtlasError(f'{path}:{number}: expected a JSON string or an object with a "prompt" string')
        prompts.append(prompt)
    return prompts


def candidate_neurons(cfg: ClampConfig, model: str) -> tuple[NeuronSpec, ...]:
    """The first `cfg.top` rows of the candidates query for `model`: their `spec` (L:N[:VALUE]) and `sign`."""
    table = run_sql(cfg.out, cfg.candidates, dict(cfg.variables))
    if "spec" not in table.column_names:
        raise AtlasError(f"{cfg.candidates}: the result has no `spec` column (L:N), as clamp_candidates.sql gives")
    rows = [r for r in table.to_pylist() if r.get("model", model) == model][: cfg.top]
    if not rows:
        raise AtlasError(f"{cfg.candidates} finds no candidate neuron of {model} under {cfg.out}")
    return tuple(replace(parse_neuron(str(r["spec"])), sign=-1 if (r.get("sign") or 1) < 0 else 1) for r in rows)


def vocabulary(tokenizer: transformers.PreTrainedTokenizerBase) -> list[str]:
    """Every token id decoded on its own, as a person reads it (' water', not 'Ġwater')."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def target_ids(vocab: list[str], words: tuple[str, ...]) -> dict[str, list[int]]:
    """For each word, every token id a person means by it (sql/words.sql rule); a word with none is an error."""
    ids = {word: matching_token_ids(vocab, word) for word in words}
    if missing := [word for word, found in ids.items() if not found]:
        raise AtlasError(f"the target {missing[0]!r} maps to no token of this model's vocabulary")
    return ids
