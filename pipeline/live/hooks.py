"""Named hook points on a live model's MLP neurons, installed on module instances inside a `with`.

Sites, per layer; neuron N is column N of down_proj and row N of up_proj / gate_proj:
- `act`: the neuron's activation, the input of down_proj (`act_fn(gate(x)) * up(x)`, or `act_fn(up(x))`
  in non-gated MLPs): a forward pre-hook on the down projection;
- `up`, `gate`: that branch's pre-activation: a forward hook on the projection's output (Phi-3's fused
  `gate_up_proj` holds gate in its first half and up in the second, as its forward chunks it).
Which module plays which role comes from `pipeline.arch`, the one place that knows model families.
An edit sees absolute sequence positions (tokens already in the KV cache + index in the current
chunk), so a rule such as "generated tokens only" holds in cached generation, where each step feeds
one token. Every hook is removed in `finally`: an exception never leaves the model modified.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.arch import live_family
from pipeline.errors import AtlasError
from pipeline.live import SITES

# (values [batch, seq, n_neurons], absolute positions [seq]) -> replacement values, or None to keep them
Edit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
Where = Callable[[torch.Tensor], torch.Tensor]  # absolute positions [seq] -> bool mask [seq]
_ALL = slice(None)


@dataclass(frozen=True)
class MLP:
    """One layer's MLP modules; `up` is the fused gate+up projection where the family fuses them."""

    layer: int
    module: nn.Module
    up: nn.Module
    gate: nn.Module | None
    down: nn.Module
    fused_gate_up: bool
    n_neurons: int

    def site(self, site: str) -> tuple[nn.Module, bool, slice]:
        """The module holding `site`, whether it is that module's input (else its output), and its columns."""
        if site not in SITES:
            raise AtlasError(f"unknown site {site!r}: choose from {', '.join(SITES)}")
        if site == "act":
            return self.down, True, _ALL
        if self.fused_gate_up:
            n = self.n_neurons
            return self.up, False, slice(0, n) if site == "gate" else slice(n, 2 * n)
        module = self.up if site == "up" else self.gate
        if module is None:
            raise AtlasError("this model's MLPs are not gated: they have no gate branch; use --site act or up")
        return module, False, _ALL


@dataclass(frozen=True)
class Clamp:
    """Hold one neuron at a fixed value."""

    layer: int
    neuron: int
    value: float


@dataclass(frozen=True)
class Capture:
    """A site's values in one forward call of one layer."""

    layer: int
    positions: torch.Tensor  # [seq] absolute positions
    values: torch.Tensor  # [batch, seq, n_neurons]


def mlps(model: nn.Module) -> list[MLP]:
    """The MLP of every layer of a transformers causal LM, in layer order."""
    config = model.config.get_text_config()
    family = live_family(config.model_type)
    role = {r: getattr(family, r) and getattr(family, r).removesuffix(".weight") for r in ("up", "gate", "down")}
    suffix = f"{family.layer.format(l=0)}.{role['down']}"
    names = [name for name, _ in model.named_modules() if name == suffix or name.endswith("." + suffix)]
    if not names:
        raise AtlasError(f"no module named *{suffix} in this {config.model_type} model")
    body = names[0][: len(names[0]) - len(suffix)]
    layers = []
    for layer in range(config.num_hidden_layers):
        prefix = body + family.layer.format(l=layer) + "."
        down = model.get_submodule(prefix + role["down"])
        up, gate = (model.get_submodule(prefix + role[r]) if role[r] else None for r in ("up", "gate"))
        mlp = model.get_submodule(prefix + role["down"].rsplit(".", 1)[0])
        n_neurons = down.weight.shape[0 if family.conv1d else 1]
        layers.append(MLP(layer, mlp, up, gate, down, family.fused_gate_up, n_neurons))
    return layers


def mlp_at(layers: Sequence[MLP], layer: int) -> MLP:
    """The MLP of `layer`, or one clear line when the model has no such layer."""
    if not 0 <= layer < len(layers):
        raise AtlasError(f"layer {layer} is out of range: the model has layers 0-{len(layers) - 1}")
    return layers[layer]


def check_clamps(layers: Sequence[MLP], clamps: Sequence[Clamp]) -> None:
    """One clear line for a layer or neuron the model does not have."""
    for c in clamps:
        n = mlp_at(layers, c.layer).n_neurons
        if not 0 <= c.neuron < n:
            raise AtlasError(f"neuron {c.neuron} is out of range: layer {c.layer} has neurons 0-{n - 1}")


@contextmanager
def hooked(model: nn.Module, edits: Mapping[tuple[int, str], Edit]) -> Iterator[None]:
    """Apply `edits[(layer, site)]` on every forward inside the `with`; all hooks are removed on exit."""
    layers = mlps(model)
    points = [mlp_at(layers, layer).site(site) for layer, site in edits]  # validates all before hooking any
    positions: list[torch.Tensor] = []  # the current forward's absolute positions, set by `track`

    def track(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs["inputs_embeds"] if tokens is None else tokens
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # `cache` from transformers 5.2x
        start = past.get_seq_length() if past is not None else 0
        positions[:] = [torch.arange(start, start + tokens.shape[1], device=tokens.device)]

    handles = [model.register_forward_pre_hook(track, with_kwargs=True)]
    try:
        for (module, before, columns), edit in zip(points, edits.values()):
            handles.append(_register(module, before, columns, edit, positions))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _register(module: nn.Module, before: bool, columns: slice, edit: Edit,
              positions: list[torch.Tensor]) -> RemovableHandle:
    """Hook `edit` onto the module's input (pre-hook) or output, on `columns` of its last dimension."""

    def apply(values: torch.Tensor) -> torch.Tensor | None:
        new = edit(values[..., columns], positions[0])
        if new is None or columns == _ALL:
            return new
        values = values.clone()
        values[..., columns] = new
        return values

    if before:
        def pre_hook(m: nn.Module, args: tuple) -> tuple | None:
            new = apply(args[0])
            return None if new is None else (new, *args[1:])

        return module.register_forward_pre_hook(pre_hook)
    return module.register_forward_hook(lambda m, args, output: apply(output))


@contextmanager
def clamped(model: nn.Module, clamps: Sequence[Clamp], site: str = "act", where: Where | None = None) -> Iterator[None]:
    """Hold each neuron of `clamps` at its value at `site`, at the positions `where` selects (all if None)."""
    check_clamps(mlps(model), clamps)
    by_layer: dict[int, list[Clamp]] = {}
    for c in clamps:
        by_layer.setdefault(c.layer, []).append(c)
    with hooked(model, {(layer, site): _setter(cs, where) for layer, cs in by_layer.items()}):
        yield


def _setter(clamps: Sequence[Clamp], where: Where | None) -> Edit:
    """An edit that writes the clamped values, out of place so autograd sees a constant there."""

    def edit(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        rows = torch.ones_like(positions, dtype=torch.bool) if where is None else where(positions)  # [seq]
        if not rows.any():
            return None
        fixed = torch.zeros(values.shape[-1], dtype=values.dtype, device=values.device)  # [n_neurons]
        columns = torch.zeros(values.shape[-1], dtype=torch.bool, device=values.device)
        for c in clamps:
            fixed[c.neuron], columns[c.neuron] = c.value, True
        return torch.where(rows[:, None] & columns[None, :], fixed, values)

    return edit


@contextmanager
def captured(model: nn.Module, site: str = "act", layers: Sequence[int] | None = None) -> Iterator[list[Capture]]:
    """Record `site` of `layers` (all by default) on every forward inside the `with`, after any edit
    installed earlier (an enclosing `clamped` shows its values here)."""
    records: list[Capture] = []
    chosen = range(len(mlps(model))) if layers is None else layers

    def recorder(layer: int) -> Edit:
        def edit(values: torch.Tensor, positions: torch.Tensor) -> None:
            records.append(Capture(layer, positions, values.detach().clone()))

        return edit

    with hooked(model, {(layer, site): recorder(layer) for layer in chosen}):
        yield records
