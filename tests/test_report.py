"""`atlas compare` and `atlas report` on the synthetic models of tests/synthetic_atlas.py: exact agreement
against the written Parquet, the refusals, and the HTML page rendered by a real headless Chromium."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import pyarrow.parquet as pq
import pytest

from pipeline.atlas.schema import read_kv_metadata
from tests.conftest import assert_one_line_error, run_cli
from tests.synthetic_atlas import D_FF, N_LAYERS, PERTURBED, expected_comparison, synthetic_models

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOTAL = 3 * N_LAYERS * D_FF


def test_compare_builds_both_atlases_and_gives_the_exact_agreement(model_dir, tmp_path):
    models = synthetic_models(model_dir("llama", tie=True), tmp_path)
    out = tmp_path / "out"
    result = run_cli("compare", models["base"], models["instruct"], "--out", out, "--changed", "50", "-q")
    assert result.exit_code == 0, result.output
    base, other = models["base"].name, "instruct"
    written = out / "compare" / f"{base}--vs--{other}.parquet"
    rows = pq.read_table(written).to_pylist()
    expected = expected_comparison(out, base, other)
    (overall,) = [r for r in rows if r["level"] == "overall"]
    assert overall["neurons"] == TOTAL and overall["top1_agreement"] == (TOTAL - len(PERTURBED)) / TOTAL
    assert overall["mean_jaccard"] == pytest.approx(expected.jaccard.mean())
    up_layers = {r["layer"]: r["top1_agreement"] for r in rows if r["level"] == "layer" and r["matrix"] == "up"}
    assert up_layers == {layer: (D_FF - sum(moved == layer for moved, _ in PERTURBED)) / D_FF
                         for layer in range(N_LAYERS)}
    assert {(r["layer"], r["neuron"]) for r in rows if r["level"] == "neuron"} == PERTURBED  # nothing else changed
    meta = read_kv_metadata(written)
    digest = hashlib.sha256((models["base"] / "model.safetensors").read_bytes()).hexdigest()
    assert (meta["base"], meta["other"], meta["base_source_sha256"]) == (base, other, digest)
    assert meta["decoded_with"] == "each model's own LM head" and meta["k"] == "20"
    assert written.with_suffix(".png").read_bytes().startswith(PNG_SIGNATURE)

    again = run_cli("compare", models["base"], models["instruct"], "--out", out)
    assert again.exit_code == 0 and again.stderr.count("already built") == 2
    share = f"{100 * (TOTAL - len(PERTURBED)) / TOTAL:.1f}% of {TOTAL} neurons keep their top-1 token"
    assert share in again.stdout
    layer_line = next(line for line in again.stdout.splitlines() if line.startswith("0 "))
    assert layer_line.split()[1] == f"{100 * (D_FF - 3) / D_FF:.1f}%"  # three moved `up` neurons in layer 0


def test_compare_reuses_atlases_known_only_by_name(atlas):
    result = run_cli("compare", "base", "instruct", "--out", atlas, "-k", "3")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(atlas / "compare" / "base--vs--instruct.parquet").to_pylist()
    assert [r["top1_agreement"] for r in rows if r["level"] == "overall"] == [(TOTAL - len(PERTURBED)) / TOTAL]
    assert "mean top-3 Jaccard" in result.stdout


@pytest.mark.parametrize(("other", "message"), [
    ({"d_ff": 64}, "differ in shape (3 layers, 144 neurons vs 3 layers, 192 neurons)"),
    ({"tokenizer_kind": "sentencepiece"}, "vocabularies of 400 and 460 tokens"),
])
def test_compare_refuses_models_that_do_not_line_up(model_dir, tmp_path, other, message):
    base, different = model_dir("llama", tie=True), model_dir("llama", tie=True, **other)
    result = run_cli("compare", base, different, "--out", tmp_path / "out")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out" / "compare").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["base", "nothing-here"], "no such model 'nothing-here'"),
    (["base", "base"], "both models are base"),
    (["base", "instruct", "-k", "99"], "k=99 is more than the 5 tokens per neuron the atlases store"),
])
def test_compare_bad_input_is_one_line(atlas, args, message):
    result = run_cli("compare", *args, "--out", atlas)
    assert_one_line_error(result, message)


def chromium() -> str:
    """The headless browser the report is checked in; CI installs it (`make test`), elsewhere it may be absent."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; `make test` installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def render(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    return subprocess.run([chromium(), *flags, *args, page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120, check=True)


def test_report_is_one_self_contained_page_that_chromium_renders(atlas, tmp_path):
    result = run_cli("report", "planted", "--out", atlas, "--compare", "base", "--concept", "Dogs",
                     "--concept", "water", "--per-layer", "2")
    assert result.exit_code == 0, result.output
    page = atlas / "report" / "planted--vs--base.html"
    assert result.stdout.strip() == f"wrote {page}"
    html = page.read_text()
    # nothing outside the file: every src is inline data, every link an anchor in the page
    assert re.findall(r'\bsrc="([^"]*)"', html) and all(s.startswith("data:image/png;base64,")
                                                        for s in re.findall(r'\bsrc="([^"]*)"', html))
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', html))
    assert not re.search(r"https?://|@import|url\(", html)

    dom = render(page, tmp_path, "--dump-dom").stdout
    sections = re.findall(r'<section id="([\w-]+)"><h2>', dom)
    assert sections == ["overview", "zscores", "glitch-tokens", "layers", "agreement", "specialised",
                        "concept-dogs", "concept-water"]
    assert dom.count("<img ") == 3  # z-scores, glitch tokens, agreement
    concept = dom[dom.index('id="concept-dogs"'):dom.index('id="concept-water"')]
    assert '<code class="tok">␣dog</code>' in concept and '<code class="tok">␣dogs</code>' in concept
    assert "␣cat" not in concept  # the planted " cat" neuron is not a dog neuron
    specialised = dom[dom.index('id="specialised"'):dom.index('id="concept-dogs"')]
    assert specialised.count("<tr>") == 3 * N_LAYERS * 2 + 3  # two neurons per layer and matrix, plus headers

    shot = tmp_path / "report.png"
    render(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1200) and pixels.std() > 0.05  # drawn, not a blank page
