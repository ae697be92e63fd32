"""Prompt sets for attribution: the JSONL format, the shipped tasks, and the ids every method needs.

JSONL, one JSON object per line (blank lines are skipped):
    {"prompt": "The capital of France is", "target": " Paris"}
    {"prompt": "When Mary and John went to the store, John gave a drink to", "target": " Mary",
     "foil": " John", "corrupted": "When Mary and John went to the store, Tom gave a drink to"}
- prompt     required  the text the model continues (the tokenizer adds BOS where the model has one);
- target     required  the continuation to explain; its first token is the target (write the leading
                       space the model would produce: " Paris", not "Paris");
- foil       optional  a competing continuation: the metric becomes logit(target) − logit(foil), and a
                       prompt counts as right when the target's logit is the higher;
- corrupted  optional  the same prompt with the answer-relevant part changed, the same number of tokens:
                       the baseline of every method (EAP / EAP-IG node form, Hanna et al. 2024).
Without `corrupted`, GIM and IG start from the space baseline (targets.space_baseline, the GIM paper's
choice), gradient × activation and AttnLRP from zero (their definitions). A prompt is identified by
its line number. Errors name the file and line: a line that is not such an object, a target with no
token, a corrupted prompt of another length, a prompt longer than the model's context.
The shipped tasks (pipeline/attribution/tasks/*.jsonl, only single-token targets under SmolLM2's
tokenizer): capital (country → capital, 116), sentiment (four-shot yes/no on one-sentence reviews,
120, balanced), ioi (indirect object, corrupted = a third name in place of the repeated subject, 120).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from pipeline.attribution.targets import Target, space_baseline, token_id
from pipeline.errors import AtlasError

TASKS = ("capital", "sentiment", "ioi")
FIELDS = {"prompt": True, "target": True, "foil": False, "corrupted": False}  # name -> required
ZERO_BASELINE_METHODS = ("grad_x_act", "attnlrp")


@dataclass(frozen=True)
class Prompt:
    """One line of a prompt file, as written."""

    id: int  # line number, from 1
    prompt: str
    target: str
    foil: str | None = None
    corrupted: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """A task's name, where it came from, and its prompts."""

    task: str
    source: str
    prompts: tuple[Prompt, ...]


@dataclass(frozen=True)
class Encoded:
    """A prompt as token ids, with its metric and its corrupted ids (if any), checked against one model."""

    prompt: Prompt
    ids: torch.Tensor  # [seq]
    target: Target
    corrupted: torch.Tensor | None  # [seq]

    def baseline(self, method: str, tokenizer) -> torch.Tensor | None:
        """The baseline input of `method` for this prompt (None: zero), as the module docstring says."""
        if self.corrupted is not None:
            return self.corrupted
        return None if method in ZERO_BASELINE_METHODS else space_baseline(tokenizer, self.ids)


def shipped_task(package: str, name: str) -> Path:
    """The JSONL file of a task shipped in `package` (its `tasks/<name>.jsonl`)."""
    return Path(str(resources.files(package) / "tasks" / f"{name}.jsonl"))


TASK_FILES = {name: shipped_task("pipeline.attribution", name) for name in TASKS}


def task_path(spec: str | Path, tasks: dict[str, Path], kind: str) -> Path:
    """A shipped task's file by name, else `spec` as a path; a missing file is one error line."""
    path = tasks.get(str(spec), Path(spec))
    if not path.is_file():
        raise AtlasError(f"no {kind} file {spec} (give a .jsonl file or a shipped task: {', '.join(tasks)})")
    return path


def load_prompts(spec: str | Path) -> PromptSet:
    """A shipped task by name (capital, sentiment, ioi) or a JSONL file, parsed and checked line by line."""
    return read_prompts(task_path(spec, TASK_FILES, "prompt"))


def read_prompts(path: Path) -> PromptSet:
    """A JSONL prompt file, parsed and checked line by line."""
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                prompts.append(_parse_line(line, number, path))
    if not prompts:
        raise AtlasError(f"{path}: no prompts in the file")
    return PromptSet(path.stem, str(path), tuple(prompts))


def _parse_line(line: str, number: int, path: Path) -> Prompt:
    """One JSON object with the format's fields, or an error naming the file and line."""
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise AtlasError(f"{where}: not valid JSON ({e.msg} at character {e.pos + 1})") from None
    if not isinstance(row, dict):
        raise AtlasError(f"{where}: expected a JSON object with prompt and target, got {type(row).__name__}")
    if unknown := sorted(set(row) - set(FIELDS)):
        raise AtlasError(f"{where}: unknown field {', '.join(unknown)} (fields: {', '.join(FIELDS)})")
    for name, required in FIELDS.items():
        value = row.get(name)
        if (required and value is None) or (value is not None and not isinstance(value, str)):
            raise AtlasError(f"{where}: field {name} must be a string{'' if required else ' when given'}")
    if not row["prompt"]:
        raise AtlasError(f"{where}: empty prompt")
    return Prompt(number, row["prompt"], row["target"], row.get("foil"), row.get("corrupted"))


def _token(tokenizer, word: str, where: str, field: str) -> int:
    try:
        return token_id(tokenizer, word)
    except AtlasError:
        raise AtlasError(f"{where}: {field} {word!r} has no token in this tokenizer") from None


def encode(prompts: PromptSet, tokenizer, context: int | None) -> list[Encoded]:
    """Token ids and targets of every prompt, or one error naming the first bad line."""
    encoded = []
    for p in prompts.prompts:
        where = f"{prompts.source}:{p.id}"
        ids = torch.tensor(tokenizer(p.prompt).input_ids)
        if context is not None and ids.numel() > context:
            raise AtlasError(f"{where}: prompt of {ids.numel()} tokens is longer than the model's context ({context})")
        target = _token(tokenizer, p.target, where, "target")
        foil = None if p.foil is None else _token(tokenizer, p.foil, where, "foil")
        corrupted = None if p.corrupted is None else torch.tensor(tokenizer(p.corrupted).input_ids)
        if corrupted is not None and corrupted.numel() != ids.numel():
            raise AtlasError(f"{where}: the corrupted prompt has {corrupted.numel()} tokens, the prompt "
                             f"{ids.numel()}; they must match")
        kind = "logit" if foil is None else "logit_diff"
        encoded.append(Encoded(p, ids, Target(target, foil, kind), corrupted))
    return encoded


def is_right(model: torch.nn.Module, item: Encoded) -> bool:
    """Whether the model predicts the target: top-1 next token, or above the foil when there is one."""
    with torch.no_grad():
        last = model(input_ids=item.ids[None].to(model.device), use_cache=False).logits[0, -1]
    t = item.target
    return bool(last[t.token] > last[t.foil]) if t.foil is not None else int(last.argmax()) == t.token
