"""A synthetic model family for comparisons and concept search: a tiny tied llama (its embedding is its
LM head), an "instruct" copy with known `up` rows moved to other tokens, and a copy with planted
concept neurons. Expectations come from the weights or the written Parquet, never from the SQL."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

K = 5
N_LAYERS, D_FF = 3, 48  # tiny_models defaults
# (layer, neuron) whose `up` row the instruct copy points at another token
PERTURBED = {(0, 3), (0, 17), (0, 40), (2, 5), (2, 33)}
# (matrix, layer, neuron) -> (token, sign) planted in the "planted" copy
PLANTED = {
    ("down", 1, 3): (" dog", 1), ("down", 2, 5): (" dogs", 1), ("down", 0, 9): (" dog", -1),
    ("down", 1, 7): (" cat", 1), ("up", 2, 11): (" water", 1), ("down", 2, 11): (" water", 1),
    ("down", 0, 13): (" water", -1),
}


def edited_copy(folder: Path, dest: Path, vectors: dict[tuple[str, int, int], torch.Tensor]) -> Path:
    """A copy of a saved llama with some neuron vectors replaced: `up`/`gate` rows, `down` columns."""
    shutil.copytree(folder, dest)
    path = dest / "model.safetensors"
    tensors = load_file(path)
    for (matrix, layer, neuron), vector in vectors.items():
        weight = tensors[f"model.layers.{layer}.mlp.{matrix}_proj.weight"]
        if matrix == "down":
            weight[:, neuron] = vector
        else:
            weight[neuron] = vector
    save_file(tensors, path, metadata={"format": "pt"})
    return dest


def synthetic_models(base: Path, root: Path) -> dict[str, Path]:
    """The three model folders (base, instruct, planted); `base` must be a tied tiny llama."""
    tensors = load_file(base / "model.safetensors")
    embedding = tensors["model.embed_tokens.weight"]  # [vocab, d_model]
    # each embedding row decodes to its own token first, so a neuron set to 3 × row t has top-1 t
    assert torch.equal((embedding @ embedding.T).argmax(1), torch.arange(len(embedding)))
    moved = {}
    for layer, neuron in PERTURBED:
        top1 = int((embedding @ tensors[f"model.layers.{layer}.mlp.up_proj.weight"][neuron]).argmax())
        moved["up", layer, neuron] = 3 * embedding[(top1 + 1) % len(embedding)]
    tok = AutoTokenizer.from_pretrained(base)
    planted = {key: sign * 3 * embedding[tok.convert_tokens_to_ids(tok.tokenize(text))[0]]
               for key, (text, sign) in PLANTED.items()}
    return {"base": base, "instruct": edited_copy(base, root / "instruct", moved),
            "planted": edited_copy(base, root / "planted", planted)}


def read_table(out: Path, table: str, model: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / table / f"model={model}").rglob("*.parquet")))


def expected_comparison(out: Path, base_model: str = "base", other_model: str = "instruct"):
    """Per neuron, from the two atlases' Parquet: same top-1 token id, Jaccard of the top-k id sets."""
    key = ["matrix", "layer", "neuron"]
    models = (base_model, other_model)
    base, other = (read_table(out, "neurons", m).to_pandas().set_index(key).top1_token_id for m in models)
    frame = (base == other.loc[base.index]).rename("same").to_frame()
    sets = [read_table(out, "atlas", m).to_pandas().query("side == 'top'").groupby(key).token_id.agg(set)
            for m in models]
    frame["jaccard"] = [len(a & b) / len(a | b) for a, b in zip(sets[0].loc[frame.index], sets[1].loc[frame.index])]
    return frame.reset_index()


if __name__ == "__main__":  # python -m tests.synthetic_atlas DIR: the three models, for trying `atlas compare`
    import sys

    from tests.tiny_models import build_hf_model

    root = Path(sys.argv[1])
    for name, folder in synthetic_models(build_hf_model(root / "base", "llama", tie=True), root).items():
        print(f"{name}: {folder}")
