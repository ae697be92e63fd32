"""The two experiments, one row per measured thing: next-token probability of a target over prompts,
and sampled answers to a question.

Each neuron is clamped on its own, at each of its values, at the chosen positions, with P the prompt's
length in tokens: `all`; `prompt` (< P); `generated` (>= P: the generated tokens as they are fed back,
so the first generated token is not yet affected); `last` (P - 1, the position that predicts the first
new token). Every row carries its unclamped reference. In generation mode the prompt goes through the
tokenizer's chat template when it has one, and each batch of samples starts from the same seed, so the
clamped and unclamped samples draw the same random numbers.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from pipeline.clamp.config import ClampConfig, NeuronSpec
from pipeline.clamp.measure import mentions, next_token
from pipeline.live.hooks import Clamp, Where, clamped
from pipeline.live.load import LiveModel


def position_rule(positions: str, prompt_len: int) -> Where | None:
    """The bool mask over absolute positions that `--positions` means, None for all of them."""
    rules: dict[str, Where | None] = {
        "all": None,
        "prompt": lambda pos: pos < prompt_len,
        "generated": lambda pos: pos >= prompt_len,
        "last": lambda pos: pos == prompt_len - 1,
    }
    return rules[positions]


def _row(live: LiveModel, cfg: ClampConfig, spec: NeuronSpec, value: float, prompt: str) -> dict:
    return {"mode": cfg.mode, "model": live.name, "layer": spec.layer, "neuron": spec.neuron, "site": cfg.site,
            "value": value, "positions": cfg.positions, "prompt": prompt, "target": "|".join(cfg.words)}


def _steps(cfg: ClampConfig, neurons: tuple[NeuronSpec, ...], units: int) -> int:
    """Forward passes (probability mode) or sampled batches (generation mode), for the progress bar."""
    return units * (1 + sum(len(spec.doses(cfg.values)) for spec in neurons))


@torch.no_grad()
def probability_rows(live: LiveModel, cfg: ClampConfig, neurons: tuple[NeuronSpec, ...], prompts: list[str],
                     target: list[int], progress: bool) -> list[dict]:
    """For every prompt × neuron × value: the target's next-token probability, log-odds change, KL, top-1."""
    model, tokenizer = live.model, live.tokenizer
    ids_of_target = torch.tensor(target, device=live.device)
    rows = []
    steps = _steps(cfg, neurons, len(prompts))
    with tqdm(total=steps, desc="clamp", unit="pass", disable=None if progress else True) as bar:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(live.device)  # [1, P]
            where = position_rule(cfg.positions, ids.shape[1])
            unclamped = model(ids).logits[0, -1]
            bar.update()
            for spec in neurons:
                for value in spec.doses(cfg.values):
                    with clamped(model, [Clamp(spec.layer, spec.neuron, value)], cfg.site, where):
                        logits = model(ids).logits[0, -1]
                    s = next_token(logits, unclamped, ids_of_target)
                    rows.append({**_row(live, cfg, spec, value, prompt), "p_target": s.p_target,
                                 "p_target_unclamped": s.p_target_unclamped, "log_odds_change": s.log_odds_change,
                                 "kl": s.kl, "top1": tokenizer.decode([s.top1]),
                                 "top1_unclamped": tokenizer.decode([s.top1_unclamped])})
                    bar.update()
    return rows


def prompt_ids(live: LiveModel, text: str) -> torch.Tensor:
    """The question as the model expects it: through the chat template when the tokenizer has one. [1, P]"""
    tokenizer = live.tokenizer
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(text, return_tensors="pt")
    return encoded["input_ids"].to(live.device)


def sample(live: LiveModel, cfg: ClampConfig, prompt: torch.Tensor, clamps: list[Clamp]) -> list[str]:
    """`cfg.samples` answers from the same seed, with `clamps` held at `cfg.positions`."""
    tokenizer = live.tokenizer
    batch = prompt.repeat(cfg.samples, 1)  # [samples, P]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    with clamped(live.model, clamps, cfg.site, position_rule(cfg.positions, prompt.shape[1])):
        out = live.model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, top_k=0,
                                  temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad)
    return tokenizer.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generation_rows(live: LiveModel, cfg: ClampConfig, neurons: tuple[NeuronSpec, ...], progress: bool) -> list[dict]:
    """For every neuron × value × sample: the answer, clamped and unclamped, and whether it names the concept."""
    prompt = prompt_ids(live, cfg.ask)
    rows = []
    with tqdm(total=_steps(cfg, neurons, 1), desc="clamp", unit="batch", disable=None if progress else True) as bar:
        reference = sample(live, cfg, prompt, [])
        reference_mentions = mentions(reference, cfg.words)
        bar.update()
        for spec in neurons:
            for value in spec.doses(cfg.values):
                texts = sample(live, cfg, prompt, [Clamp(spec.layer, spec.neuron, value)])
                for i, (text, hit) in enumerate(zip(texts, mentions(texts, cfg.words))):
                    rows.append({**_row(live, cfg, spec, value, cfg.ask), "sample": i, "seed": cfg.seed,
                                 "text": text, "text_unclamped": reference[i], "mentions": hit,
                                 "mentions_unclamped": reference_mentions[i]})
                bar.update()
    return rows
