"""Our GGUF header walk against the `gguf` package's own reader, on files written by its writer."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from pipeline.sources.gguf import GGUFSource
from tests import tiny_models as tm


@pytest.mark.parametrize("family, quant", [("llama", "F32"), ("qwen2", "F32"), ("gemma3_text", "Q8_0")])
def test_tensors_and_tokenizer_equal_the_gguf_readers(tmp_path, family, quant):
    kwargs = {"d_model": 64, "d_ff": 96} if quant == "Q8_0" else {}
    folder = tm.build_hf_model(tmp_path / family, family, **kwargs)
    path = tm.build_gguf(folder, tmp_path / "m.gguf", quant=quant)
    ours, theirs = GGUFSource(path), gguf.GGUFReader(path)
    assert ours.names() == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        expected = dequantize(np.ascontiguousarray(t.data), t.tensor_type).astype(np.float32)
        assert ours.shape(t.name) == tuple(int(n) for n in reversed(t.shape))
        assert np.array_equal(ours.read(t.name).numpy(), expected.reshape(ours.shape(t.name)))
        if len(t.shape) == 2:  # rows of a matrix, as the atlas reads a layer's neurons
            rows = ours.read(t.name, slice(1, 3)).numpy()
            assert np.array_equal(rows, expected.reshape(ours.shape(t.name))[1:3])
    fields = theirs.fields
    table = ours.token_table()
    assert table.pieces == fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert [i for i, s in enumerate(table.special) if s] == [i for i, t in enumerate(types) if t in (2, 3, 5)]
    assert ours.model_type == fields["general.architecture"].contents()
    assert ours.n_layers == fields[f"{ours.model_type}.block_count"].contents()
