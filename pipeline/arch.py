"""Model families: where each keeps its MLP weights, norms and LM head — the only module that knows.

A `Family` is a declaration in Hugging Face checkpoint names, relative to the body prefix (`model.`,
`transformer.`, `model.language_model.`, ...), which `ArchAdapter` finds in the checkpoint itself.
GGUF files use one naming scheme for every family (`blk.{l}.ffn_up.weight`, ...), so they need no
table. Two quirks depend on the file format, and both are handled here:
- GPT-2 stores its MLP as Conv1D (`[in, out]`) in HF checkpoints; GGUF converters transpose to `[out, in]`.
- Gemma RMSNorm multiplies by `1 + weight` in HF checkpoints; GGUF stores the `+1` already.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import AtlasError
from pipeline.sources.base import WeightSource


@dataclass(frozen=True)
class Family:
    """Where one model family keeps the tensors the atlas reads (HF names, relative to the body)."""

    name: str
    model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    layer: str  # e.g. "layers.{l}"
    up: str  # for fused families: the fused gate+up tensor (gate first)
    gate: str | None
    down: str
    mlp_norm: str  # the norm whose output the MLP reads
    final_norm: str
    embed: str
    head: str = "lm_head.weight"  # relative to the checkpoint root, not the body
    fused_gate_up: bool = False
    conv1d: bool = False
    norm_offset: float = 0.0


_LLAMA_MLP = dict(layer="layers.{l}", up="mlp.up_proj.weight", gate="mlp.gate_proj.weight",
                  down="mlp.down_proj.weight", final_norm="norm.weight", embed="embed_tokens.weight")

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), ("llama", "mistral", "qwen2", "qwen3"),
           mlp_norm="post_attention_layernorm.weight", **_LLAMA_MLP),
    Family("gemma", ("gemma",), ("gemma",),
           mlp_norm="post_attention_layernorm.weight", norm_offset=1.0, **_LLAMA_MLP),
    Family("gemma2", ("gemma2", "gemma3_text", "gemma3"), ("gemma2", "gemma3"),
           mlp_norm="pre_feedforward_layernorm.weight", norm_offset=1.0, **_LLAMA_MLP),
    Family("phi3", ("phi3",), ("phi3",), layer="layers.{l}", up="mlp.gate_up_proj.weight", gate=None,
           down="mlp.down_proj.weight", mlp_norm="post_attention_layernorm.weight",
           final_norm="norm.weight", embed="embed_tokens.weight", fused_gate_up=True),
    Family("gpt2", ("gpt2",), ("gpt2",), layer="h.{l}", up="mlp.c_fc.weight", gate=None,
           down="mlp.c_proj.weight", mlp_norm="ln_2.weight", final_norm="ln_f.weight",
           embed="wte.weight", conv1d=True),
    Family("gpt_neox", ("gpt_neox",), ("gptneox",), layer="layers.{l}", up="mlp.dense_h_to_4h.weight",
           gate=None, down="mlp.dense_4h_to_h.weight", mlp_norm="post_attention_layernorm.weight",
           final_norm="final_layer_norm.weight", embed="embed_in.weight", head="embed_out.weight"),
)

SUPPORTED = sorted({t for f in FAMILIES for t in f.model_types})

_GGUF = {"up": "blk.{l}.ffn_up.weight", "gate": "blk.{l}.ffn_gate.weight", "down": "blk.{l}.ffn_down.weight",
         "mlp_norm": "blk.{l}.ffn_norm.weight", "final_norm": "output_norm.weight",
         "embed": "token_embd.weight", "head": "output.weight"}


def live_family(model_type: str) -> Family:
    """The family of a live transformers model: HF module names, whatever file it was loaded from."""
    return family_for(model_type, "safetensors")


def family_for(model_type: str, source_format: str) -> Family:
    """The family declaration for a config `model_type` (or a GGUF architecture name)."""
    for fam in FAMILIES:
        if model_type in (fam.gguf_archs if source_format == "gguf" else fam.model_types):
            return fam
    raise AtlasError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED)}")


class ArchAdapter:
    """Reads a layer's neuron vectors, norm gains and the LM head from a source, whatever the family."""

    def __init__(self, source: WeightSource) -> None:
        self.source = source
        self.family = family_for(source.model_type, source.format)
        self.gguf = source.format == "gguf"
        self._body = "" if self.gguf else self._find_body_prefix()
        self._head = self._find_head()
        self.n_layers = source.n_layers
        down = self.source.shape(self._name("down", 0))
        self.n_neurons = down[0] if (self.family.conv1d and not self.gguf) else down[1]
        self.d_model = self.head_shape()[1]

    @property
    def gated(self) -> bool:
        return self.family.gate is not None or self.family.fused_gate_up

    @property
    def matrices(self) -> tuple[str, ...]:
        return ("up", "gate", "down") if self.gated else ("up", "down")

    def _find_body_prefix(self) -> str:
        suffix = self.family.layer.format(l=0) + "." + self.family.down
        for name in self.source.names():
            if name == suffix or name.endswith("." + suffix):
                return name[: len(name) - len(suffix)]
        raise AtlasError(f"{self.source.path}: no tensor named *{suffix}; is this a "
                         f"{self.family.name} checkpoint?")

    def _name(self, role: str, layer: int | None = None) -> str:
        fam = self.family
        if role == "gate" and fam.fused_gate_up:
            role = "up"
        if self.gguf:
            return _GGUF[role].format(l=layer)
        rel = getattr(fam, role)
        if role in ("up", "gate", "down", "mlp_norm"):
            return self._body + fam.layer.format(l=layer) + "." + rel
        return self._body + rel

    def _find_head(self) -> str | None:
        """The untied head's tensor name, or None where the head is tied to the embedding."""
        if self.gguf:
            candidates = [_GGUF["head"]]
        else:  # the head sits at the root or beside any enclosing prefix of the body
            parts = self._body.split(".")[:-1]
            candidates = [".".join(parts[:i] + [self.family.head]) for i in range(len(parts) + 1)]
        names = set(self.source.names())
        head = next((c for c in candidates if c in names), None)
        if head is None and self.source.config.get("tie_word_embeddings") is False:
            raise AtlasError(f"{self.source.path}: the config says the LM head is untied, but the "
                             f"checkpoint has no {self.family.head}")
        return head

    def head_shape(self) -> tuple[int, int]:
        shape = self.source.shape(self._head or self._name("embed"))
        return int(shape[0]), int(shape[1])

    @property
    def tied(self) -> bool:
        return self._head is None

    def head(self, rows: slice | None = None, compact: bool = False) -> torch.Tensor:
        """The unembedding `W_U`, `[vocab, d_model]` float32 (the tied embedding where there is no head), or
        some of its rows; `compact` as `WeightSource.read`."""
        return self.source.read(self._head or self._name("embed"), rows, compact)

    def gain(self, role: str, layer: int | None = None) -> torch.Tensor:
        """A norm's effective multiplicative gain `[d_model]` (Gemma's `1 + weight` resolved here)."""
        g = self.source.read(self._name(role, layer))
        return g if self.gguf else g + self.family.norm_offset

    def neuron_vectors(self, matrix: str, layer: int, compact: bool = False) -> torch.Tensor:
        """Neuron vectors `[n_neurons, d_model]`: rows of up/gate, columns of down; `compact` as
        `WeightSource.read`."""
        w, transposed = self.neuron_matrix(matrix, layer, compact)
        return w.T.contiguous() if transposed else w

    def neuron_matrix(self, matrix: str, layer: int, compact: bool = False) -> tuple[torch.Tensor, bool]:
        """The matrix as stored that holds a layer's neuron vectors, and whether they are its columns (a
        build on an accelerator transposes it there)."""
        if matrix not in self.matrices:
            raise AtlasError(f"{self.family.name} has no {matrix!r} matrix; it has {', '.join(self.matrices)}")
        n = self.n_neurons
        name = self._name(matrix, layer)
        if self.family.fused_gate_up and matrix != "down":
            rows = slice(0, n) if matrix == "gate" else slice(n, 2 * n)
            return self.source.read(name, rows, compact), False
        return self.source.read(name, compact=compact), (matrix == "down") != (self.family.conv1d and not self.gguf)
