"""GGUF files (llama.cpp): memory-mapped, each tensor dequantised to float32 only when read.

The header is walked here rather than by `gguf.GGUFReader`, which builds numpy views for every part of
every metadata value (5 s for SmolLM2's 100,000 tokenizer strings, against 0.1 s for a plain walk).
Dequantisation and the quantisation types' sizes are the `gguf` package's (Q8_0, common for LM heads, is
dequantised here with torch's threads, to the same values).
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from pipeline.errors import AtlasError
from pipeline.tokens import TokenTable

_STYLE = {"gpt2": "bytelevel", "llama": "sentencepiece"}
_SPECIAL_TYPES = (2, 3, 5)  # unknown, control, unused; 4 (user-defined) pieces are ordinary text
_VERSIONS = (2, 3)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9  # the other GGUF value types
_LENGTH = struct.Struct("<Q")  # a string's byte count
READ_VALUES = 1 << 22  # values dequantised at a time
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: its dims in GGUF order (innermost first), its type and its bytes in the mapped file."""

    dims: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # [rows..., values or bytes per row], a view of the map


class _Cursor:
    """Little-endian reads that advance through a buffer; one past its end raises `struct.error`."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> bytes:
        return self.strings(1)[0]

    def strings(self, n: int) -> list[bytes]:
        """`n` length-prefixed strings: a tokenizer's vocabulary and merges, 100,000 of them, in one loop."""
        buf, pos, length_at, out = self.buf, self.pos, _LENGTH.unpack_from, []
        for _ in range(n):
            (size,) = length_at(buf, pos)
            pos += 8 + size
            out.append(buf[pos - size:pos])
        if pos > len(buf):
            raise struct.error("a string runs past the end of the file")
        self.pos = pos
        return out

    def value(self, kind: int) -> object:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.unpack(_SCALARS[kind])[0]
        item, n = self.unpack("IQ")
        if item == _STRING:
            return self.strings(n)
        if item == _ARRAY:
            return [self.value(item) for _ in range(n)]
        dtype = np.dtype("<" + _SCALARS[item])
        values = np.frombuffer(self.buf, dtype, n, self.pos)  # raises ValueError past the end
        self.pos += n * dtype.itemsize
        return values


def _parse(buf: mmap.mmap) -> tuple[dict[str, object], dict[str, GGUFTensor]]:
    """The metadata and the tensor table of a GGUF file."""
    cur = _Cursor(buf)
    magic, version, n_tensors, n_fields = cur.unpack("4sIQQ")
    if magic != b"GGUF" or version not in _VERSIONS:
        raise ValueError(f"no GGUF v2/v3 header (magic {magic!r}, version {version})")
    fields = {}
    for _ in range(n_fields):
        key = cur.string().decode()
        fields[key] = cur.value(cur.unpack("I")[0])
    infos = []
    for _ in range(n_tensors):
        name = cur.string().decode()
        (n_dims,) = cur.unpack("I")
        dims = cur.unpack("Q" * n_dims)
        kind, offset = cur.unpack("IQ")
        infos.append((name, dims, GGMLQuantizationType(kind), offset))
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, kind, offset in infos:
        block, size = GGML_QUANT_SIZES[kind]
        shape = tuple(reversed(dims))
        n_bytes = int(np.prod(dims)) * size // block
        if start + offset + n_bytes > len(buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        if kind in _PLAIN:
            data = np.frombuffer(buf, _PLAIN[kind], int(np.prod(dims)), start + offset).reshape(shape)
        else:
            data = np.frombuffer(buf, np.uint8, n_bytes, start + offset).reshape(*shape[:-1], -1)
        tensors[name] = GGUFTensor(dims, kind, data)
    return fields, tensors


def _q8_0(data: np.ndarray, out: torch.Tensor) -> None:
    """Q8_0 blocks (an fp16 scale, then int8 values) to float32 with torch's threads: the same products as
    the gguf package's numpy code, 0.12 s against 0.34 on SmolLM2's LM head (often the one 8-bit tensor)."""
    _, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    blocks = torch.from_numpy(data.copy()).reshape(-1, size)  # the memory map is read-only
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    torch.mul(blocks[:, 2:].contiguous().view(torch.int8), scale, out=out.view(-1, size - 2))


class GGUFSource:
    """A `.gguf` file as a `WeightSource`: names are GGUF names, data comes back in HF `[out, in]` order."""

    format = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._fields, self._tensors = _parse(self._map)
        except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
            raise AtlasError(f"{self.path}: not a readable GGUF file (truncated or corrupt?): {e}") from None
        self.model_type = str(self._field("general.architecture"))
        self.n_layers = int(self._field(f"{self.model_type}.block_count"))
        self.config = {"model_type": self.model_type, "num_hidden_layers": self.n_layers}

    def _field(self, key: str, default: object = None) -> object:
        value = self._fields.get(key)
        if value is None:
            if default is not None:
                return default
            raise AtlasError(f"{self.path}: GGUF metadata has no {key!r}")
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).dims))

    def _tensor(self, name: str) -> GGUFTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise AtlasError(f"{self.path}: no tensor {name!r} in this GGUF file") from None

    def read(self, name: str, rows: slice | None = None, compact: bool = False) -> torch.Tensor:
        """Dequantised into one new float32 tensor, READ_VALUES at a time: a dequantisation's temporaries
        (several times its output for K-quants) stay small beside a head of GBs. Float32 even when
        `compact`: a quantised block has no smaller exact form."""
        t = self._tensor(name)
        shape = self.shape(name)
        data = t.data if rows is None else t.data[rows]  # rows are whole blocks
        out = torch.empty((len(data), *shape[1:]) if len(shape) > 1 else shape)
        flat = out.view(len(data), -1) if len(shape) > 1 else out.view(1, -1)
        data = data.reshape(len(flat), -1)
        step = max(1, READ_VALUES // max(1, flat.shape[1]))
        for s in range(0, len(flat), step):
            piece = np.ascontiguousarray(data[s:s + step])
            if t.tensor_type == GGMLQuantizationType.Q8_0:
                _q8_0(piece, flat[s:s + step])
            else:
                flat[s:s + step].numpy()[:] = dequantize(piece, t.tensor_type).reshape(len(piece), -1)
        return out

    def files(self) -> list[Path]:
        return [self.path]

    def token_table(self) -> TokenTable:
        if "tokenizer.ggml.tokens" not in self._fields:
            raise AtlasError(f"{self.path}: the GGUF file carries no tokenizer (tokenizer.ggml.tokens)")
        pieces = [p.decode("utf-8", errors="replace") for p in self._fields["tokenizer.ggml.tokens"]]
        types = np.asarray(self._fields.get("tokenizer.ggml.token_type", ()), dtype=np.int64)
        special = set(np.flatnonzero(np.isin(types, _SPECIAL_TYPES)).tolist())
        style = _STYLE.get(str(self._field("tokenizer.ggml.model", "")), "plain")
        return TokenTable.from_pieces(pieces, style, special)
