"""Shared fixtures: tiny real models built once per session, and the CLI invoked in-process.

Where tests belong: tests/README.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import cli
from tests import tiny_models
from tests.synthetic_atlas import K, synthetic_models


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """`model_dir(family, **options)`: a saved tiny model, built once per distinct request."""
    cache: dict[tuple, Path] = {}

    def build(family: str, **options) -> Path:
        key = (family, *sorted(options.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-model")
            cache[key] = tiny_models.build_hf_model(folder, family, **options)
        return cache[key]

    return build


def run_cli(*args: str | Path) -> Result:
    """Invoke `atlas ...` in-process; stdout and stderr stay apart (click >= 8.2)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result: Result, message: str) -> None:
    """Bad input: exit code 1 and one line on stderr that says `message`."""
    assert result.exit_code == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.fixture(scope="session")
def atlas(model_dir, tmp_path_factory) -> Path:
    """OUT with the atlases of tests/synthetic_atlas.py's three models, named base, instruct, planted,
    and one attribution run on planted (so that every file of sql/ has something to read)."""
    root = tmp_path_factory.mktemp("synthetic")
    out = root / "out"
    models = synthetic_models(model_dir("llama", tie=True), root)
    for name, folder in models.items():
        assert run_cli("build", folder, "--out", out, "--name", name, "-k", K, "-q").exit_code == 0
    prompts = root / "water.jsonl"
    prompts.write_text('{"prompt": "The dog drinks", "target": " water"}\n')
    assert run_cli("attribute", models["planted"], "--prompts", prompts, "--out", out, "--name", "planted",
                   "-q").exit_code == 0
    return out
