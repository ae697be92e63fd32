"""GGUF files (llama.cpp): memory-mapped, each tensor dequantised to float32 only when read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from pipeline.errors import AtlasError
from pipeline.tokens import TokenTable

_STYLE = {"gpt2": "bytelevel", "llama": "sentencepiece"}
_SPECIAL_TYPES = (2, 3, 5)  # unknown, control, unused; 4 (user-defined) pieces are ordinary text


class GGUFSource:
    """A `.gguf` file as a `WeightSource`: names are GGUF names, data comes back in HF `[out, in]` order."""

    format = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._reader = GGUFReader(self.path)
        except Exception as e:  # the reader raises assorted errors on a truncated or foreign file
            raise AtlasError(f"{self.path}: not a readable GGUF file (truncated or corrupt?): {e}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.model_type = self._field("general.architecture")
        self.n_layers = int(self._field(f"{self.model_type}.block_count"))
        self.config = {"model_type": self.model_type, "num_hidden_layers": self.n_layers}

    def _field(self, key: str, default: object = None) -> object:
        field = self._reader.fields.get(key)
        if field is None:
            if default is not None:
                return default
            raise AtlasError(f"{self.path}: GGUF metadata has no {key!r}")
        return field.contents()

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).shape))

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise AtlasError(f"{self.path}: no tensor {name!r} in this GGUF file") from None

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self._tensor(name)
        data = t.data if rows is None else t.data[rows]  # quantised rows are whole blocks: slice first
        arr = dequantize(np.ascontiguousarray(data), t.tensor_type).astype(np.float32, copy=False)
        if not arr.flags.writeable:  # F32 tensors come back as the read-only memory map itself
            arr = arr.copy()
        shape = self.shape(name)
        n = shape[0] if rows is None else len(range(*rows.indices(shape[0])))
        return torch.from_numpy(arr.reshape((n, *shape[1:]) if len(shape) > 1 else shape))

    def files(self) -> list[Path]:
        return [self.path]

    def token_table(self) -> TokenTable:
        fields = self._reader.fields
        if "tokenizer.ggml.tokens" not in fields:
            raise AtlasError(f"{self.path}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
        tokens = fields["tokenizer.ggml.tokens"]
        pieces = [bytes(tokens.parts[i]).decode("utf-8", errors="replace") for i in tokens.data]
        special: set[int] = set()
        if "tokenizer.ggml.token_type" in fields:
            types = fields["tokenizer.ggml.token_type"]
            special = {j for j, i in enumerate(types.data) if int(types.parts[i][0]) in _SPECIAL_TYPES}
        style = _STYLE.get(str(self._field("tokenizer.ggml.model", "")), "plain")
        return TokenTable.from_pieces(pieces, style, special)
