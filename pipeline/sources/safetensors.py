"""Hugging Face model folders: `config.json` plus one or many `.safetensors` shards, read lazily."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pipeline.errors import AtlasError
from pipeline.tokens import TokenTable

READ_BYTES = 64 * 2**20  # bytes of output per block when reading a tensor
COMPACT = {"BF16": torch.bfloat16, "F16": torch.float16}  # stored dtypes `read(compact=True)` keeps


class SafetensorsSource:
    """A model folder as a `WeightSource`; a single `model.safetensors` is a one-shard weight map."""

    format = "safetensors"

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder)
        self.config = _read_json(self.path / "config.json")
        text = self.config.get("text_config") or {}
        self.model_type = str(self.config.get("model_type", "?"))
        layers = text.get("num_hidden_layers") or self.config.get("num_hidden_layers") or self.config.get("n_layer")
        if not layers:
            raise AtlasError(f"{self.path / 'config.json'}: no num_hidden_layers / n_layer")
        self.n_layers = int(layers)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._where = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = {k: self.path / v for k, v in _read_json(index).get("weight_map", {}).items()}
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise AtlasError(f"{self.path}: no .safetensors files (and no model.safetensors.index.json)")
            weight_map = {name: shard for shard in shards for name in self._header(shard)}
        missing = sorted({str(p.name) for p in weight_map.values() if not p.exists()})
        if missing:
            raise AtlasError(f"{self.path}: shards named in the index are missing: {', '.join(missing)}")
        for shard in set(weight_map.values()):
            self._header(shard)  # validates every header up front, before any output is written
        return weight_map

    def _header(self, shard: Path) -> dict[str, tuple[int, ...]]:
        """The shapes a shard holds (recorded, with the dtypes, for `shape` and `read`); one clear line for
        a corrupt file."""
        with self._open(shard) as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
            self._dtypes.update({name: s.get_dtype() for name, s in slices.items()})
        self._shapes.update(shapes)
        return shapes

    def _open(self, shard: Path):
        """A mapping of the shard for one read. Not kept: the pages a mapping has touched count in the
        process's memory until it is closed, so a kept one would grow to the whole checkpoint."""
        try:
            return safe_open(str(shard), framework="pt")
        except (SafetensorError, OSError) as e:
            raise AtlasError(f"{shard}: corrupt or truncated safetensors file: {e}") from None

    def names(self) -> list[str]:
        return list(self._where)

    def _check(self, name: str) -> None:
        if name not in self._where:
            raise AtlasError(f"{self.path}: no tensor {name!r} in this checkpoint")

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._shapes[name]

    def read(self, name: str, rows: slice | None = None, compact: bool = False) -> torch.Tensor:
        """Rows of a tensor as float32 (or, `compact`, a bf16 or fp16 one as stored), converted a block at a
        time, each block through its own mapping: a bf16 head never exists twice, and its mapped pages
        never all at once (they count as memory)."""
        self._check(name)
        shape = self._shapes[name]
        shard = self._where[name]
        dtype = COMPACT.get(self._dtypes[name], torch.float32) if compact else torch.float32
        if not shape:
            with self._open(shard) as f:
                return f.get_slice(name)[:].to(dtype)
        start, stop, _ = (rows or slice(None)).indices(shape[0])
        out = torch.empty((max(stop - start, 0), *shape[1:]), dtype=dtype)
        step = max(1, READ_BYTES // max(1, out.element_size() * out[0].numel())) if len(out) else 1
        for i in range(start, stop, step):
            with self._open(shard) as f:
                out[i - start:min(i + step, stop) - start] = f.get_slice(name)[i:min(i + step, stop)]
        return out

    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def token_table(self) -> TokenTable:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise AtlasError(f"{self.path}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        return TokenTable.from_pieces([p if p is not None else "" for p in pieces], _style(tok), special)


def _style(tok) -> str:
    """Which piece spelling a fast tokenizer uses, read from its decoder."""
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    text = json.dumps(decoder or {})
    if '"ByteLevel"' in text:
        return "bytelevel"
    if "▁" in text or '"Metaspace"' in text or '"ByteFallback"' in text:
        return "sentencepiece"
    return "plain"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AtlasError(f"{path.parent}: not a model folder (no {path.name})") from None
    except ValueError as e:
        raise AtlasError(f"{path}: invalid JSON: {e}") from None
