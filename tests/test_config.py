"""Option parsing: layer specs and matrix lists, including the errors a user sees."""
from __future__ import annotations

import pytest

from pipeline.config import AtlasConfig, parse_layers, parse_matrices
from pipeline.errors import AtlasError


def test_layer_spec_ranges_and_singletons():
    assert parse_layers("0-3,10") == (0, 1, 2, 3, 10)
    assert parse_layers(" 5 , 2-3,3") == (2, 3, 5)


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1-", "-2", "1,,2", "1.5"])
def test_invalid_layer_specs_are_refused(spec):
    with pytest.raises(AtlasError, match="invalid layer spec"):
        parse_layers(spec)


def test_matrices_in_canonical_order_and_unknown_refused():
    assert parse_matrices("down,up") == ("up", "down")
    with pytest.raises(AtlasError, match="invalid matrices"):
        parse_matrices("up,fc1")


def test_config_validates_once():
    with pytest.raises(AtlasError, match="normalisation"):
        AtlasConfig(model="m", norm="lens")
    with pytest.raises(AtlasError, match="invalid model name"):
        AtlasConfig(model="m", name="../x")
    with pytest.raises(AtlasError, match="lanes must be at least 1"):
        AtlasConfig(model="m", lanes=0)


def test_lanes_share_out_the_cores():
    import torch

    from pipeline.atlas.lanes import ACCELERATOR_LANES, lane_shape

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert lane_shape(torch.device("cpu")) == (4, 1)
        assert lane_shape(torch.device("cpu"), 2) == (2, 2)
        assert lane_shape(torch.device("cpu"), 8) == (8, 1)
        assert lane_shape(torch.device("cuda")) == (ACCELERATOR_LANES, 4 // ACCELERATOR_LANES)
        assert lane_shape(torch.device("cuda"), 2) == (2, 2)
    finally:
        torch.set_num_threads(threads)
