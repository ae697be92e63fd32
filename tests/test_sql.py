"""The SQL in sql/ run for real over the tiny atlases of tests/synthetic_atlas.py (the `atlas`
fixture); expectations come from the Parquet files or the weights, never from the SQL under test."""
from __future__ import annotations

import csv
import io
import json
import re

import pyarrow.parquet as pq
import pytest

from pipeline.query import SQL_DIR, run_sql
from pipeline.words import matching_token_ids
from tests.conftest import assert_one_line_error, run_cli
from tests.synthetic_atlas import D_FF, K, N_LAYERS, PERTURBED, expected_comparison, read_table

# variables that make every file of sql/ return rows on the fixture's atlases
VARS = {
    "top_tokens": {"layer": "1", "neuron": "3", "model": "planted"},
    "compare_models": {"base": "base", "other": "instruct"},
    "find_concept": {"concept": "dog"},
    "coherent_neurons": {"model": "planted"},
    "clamp_candidates": {"concept": "water"},
    "layer_summary": {},
    "glitch_tokens": {"min_neurons": "2"},
    "specialised_neurons": {"model": "planted", "per_layer": "1"},
    "attributed_neurons": {"concept": "water"},
}
SQL_FILES = sorted(p for p in SQL_DIR.glob("*.sql") if p.name not in ("views.sql", "words.sql"))


def test_compare_models_agreement_is_exact_overall_per_matrix_and_per_layer(atlas):
    variables = {"base": "base", "other": "instruct", "changed": str(len(PERTURBED))}
    rows = run_sql(atlas, "compare_models", variables).to_pylist()
    expected = expected_comparison(atlas)
    total = 3 * N_LAYERS * D_FF
    assert len(expected) == total
    assert {(r.layer, r.neuron) for r in expected[~expected.same].itertuples()} == PERTURBED
    assert set(expected[~expected.same].matrix) == {"up"}

    by_level = {level: [r for r in rows if r["level"] == level] for level in ("overall", "matrix", "layer", "neuron")}
    (overall,) = by_level["overall"]
    assert overall["neurons"] == total and overall["top1_agreement"] == (total - len(PERTURBED)) / total
    assert overall["mean_jaccard"] == pytest.approx(expected.jaccard.mean())
    for level, key in (("matrix", ["matrix"]), ("layer", ["matrix", "layer"])):
        want = {k if isinstance(k, tuple) else (k,): (g.same.sum() / len(g), g.jaccard.mean())
                for k, g in expected.groupby(key)}
        got = {tuple(r[c] for c in key): (r["top1_agreement"], r["mean_jaccard"]) for r in by_level[level]}
        assert got.keys() == want.keys()
        for k, (share, jaccard) in want.items():
            assert got[k][0] == share and got[k][1] == pytest.approx(jaccard), k
    per_layer = {r["layer"]: r["top1_agreement"] for r in by_level["layer"] if r["matrix"] == "up"}
    for layer in range(N_LAYERS):
        n_moved = sum(1 for moved_layer, _ in PERTURBED if moved_layer == layer)
        assert per_layer[layer] == (D_FF - n_moved) / D_FF
    # unchanged neurons have identical top-k sets, so the most changed ones are exactly the moved ones
    assert {(r["matrix"], r["layer"], r["neuron"]) for r in by_level["neuron"]} == {("up", *p) for p in PERTURBED}
    assert all(r["same_top1"] == 0 and r["base_top1"] != r["other_top1"] for r in by_level["neuron"])


def test_find_concept_finds_the_planted_neurons_and_not_the_unrelated_one(atlas):
    found = run_sql(atlas, "find_concept", {"concept": "Dogs", "model": "planted", "matrix": "down"}).to_pylist()
    assert {(r["layer"], r["neuron"]) for r in found[:2]} == {(1, 3), (2, 5)}
    assert all(r["rank"] == 1 for r in found[:2]) and {found[0]["token"], found[1]["token"]} == {" dog", " dogs"}
    assert (1, 7) not in {(r["layer"], r["neuron"]) for r in found}  # the " cat" neuron
    assert [r["z"] for r in found] == sorted((r["z"] for r in found), reverse=True)
    bottom = run_sql(atlas, "find_concept", {"concept": "dog", "model": "planted", "side": "bottom",
                                             "max_rank": "1"}).to_pylist()
    assert [(r["matrix"], r["layer"], r["neuron"]) for r in bottom][:1] == [("down", 0, 9)]
    assert bottom[0]["z"] < 0 and bottom[0]["side"] == "bottom"


def test_matching_rules_on_the_tiny_vocabulary(atlas, tmp_path):
    query = tmp_path / "words.sql"
    query.write_text("SELECT token FROM tokens WHERE model = 'base'\n"
                     "  AND same_word(concept_word(token), concept_word(getvariable('concept')));\n")
    words = lambda concept: set(run_sql(atlas, query, {"concept": concept}).column("token").to_pylist())
    assert words("dog") == words(" DOGS") == words("Dog") == {" dog", " dogs", "Dog"}
    assert words("water") == words("Waters") == {" water", "Water"}
    assert words("california") == {"California", " California"}
    assert words("dogma") == words("hotdog") == set()


@pytest.mark.parametrize("token, concept, same", [
    (" Dog", "dog", True), ("▁dogs.", "Dog", True), ("ĠDOGS", "dog", True), ("dogma", "dog", False),
    ("hotdog", "dog", False), (" skies", "sky", True), ("boxes", "box", True), ("as", "a", False),
    (".", ".", False), (" California", "CALIFORNIA", True), ("\u00a0Dog\u00a0", "dog", True), ("\u00a0", "", False),
])
def test_concept_word_macros(atlas, tmp_path, token, concept, same):
    query = tmp_path / "same.sql"
    query.write_text("SELECT same_word(a, b) AS same, word_key(a) = word_key(b) AS same_key FROM\n"
                     "(SELECT concept_word(getvariable('token')) AS a, concept_word(getvariable('concept')) AS b);\n")
    (row,) = run_sql(atlas, query, {"token": token, "concept": concept}).to_pylist()
    assert row["same"] == same and (row["same_key"] or not same)


def test_the_planted_coherent_neuron_ranks_first(atlas):
    for variables in ({"model": "planted"}, {"model": "planted", "concept": "Water", "read": "up"}):
        first = run_sql(atlas, "coherent_neurons", variables).to_pylist()[0]
        assert (first["layer"], first["neuron"], first["word"]) == (2, 11, "water"), variables
        assert first["read_matrix"] == "up" and first["read_rank"] == first["write_rank"] == 1


def test_clamp_candidates_put_the_coherent_neuron_first_with_its_spec(atlas):
    rows = run_sql(atlas, "clamp_candidates", {"concept": "water", "model": "planted"}).to_pylist()
    assert rows[0]["spec"] == "2:11" and rows[0]["sign"] == 1 and rows[0]["coherent"]
    assert "reads" in rows[0]["reason"] and "writes" in rows[0]["reason"]
    against = next(r for r in rows if r["spec"] == "0:13")
    assert against["sign"] == -1 and not against["coherent"]
    assert all(re.fullmatch(r"\d+:\d+", r["spec"]) and r["spec"] == f"{r['layer']}:{r['neuron']}" for r in rows)


def test_layer_summary_and_glitch_tokens_count_like_the_parquet(atlas):
    neurons = read_table(atlas, "neurons", "base").to_pandas()
    summary = run_sql(atlas, "layer_summary", {"model": "base"}).to_pylist()
    assert len(summary) == 3 * N_LAYERS
    for row in summary:
        part = neurons[(neurons.matrix == row["matrix"]) & (neurons.layer == row["layer"])]
        assert row["neurons"] == len(part) and row["median_max_z"] == pytest.approx(part.max_z.median())
        assert row["distinct_top1_share"] == part.top1_token_id.nunique() / len(part)
        assert row["most_common_top1_neurons"] == part.top1_token_id.value_counts().max()
    glitch = run_sql(atlas, "glitch_tokens", {"model": "base", "min_neurons": "3"}).to_pylist()
    counts = neurons.groupby(["matrix", "top1_token_id"]).size()
    assert {(r["matrix"], r["token_id"]): r["neurons"] for r in glitch} == counts[counts >= 3].to_dict()
    assert all(r["share"] == r["neurons"] / (N_LAYERS * D_FF) for r in glitch)


def test_specialised_neurons_are_the_highest_max_z_of_each_layer_with_their_tokens(atlas):
    rows = run_sql(atlas, "specialised_neurons", {"model": "base", "per_layer": "2", "tokens": "3"}).to_pylist()
    neurons = read_table(atlas, "neurons", "base").to_pandas()
    ranked = read_table(atlas, "atlas", "base").to_pandas().sort_values("rank")
    want = (neurons.sort_values(["max_z", "neuron"], ascending=[False, True])
            .groupby(["matrix", "layer"]).head(2))
    assert {(r["matrix"], r["layer"], r["neuron"]) for r in rows} == set(zip(want.matrix, want.layer, want.neuron))
    assert len(rows) == 3 * N_LAYERS * 2
    for r in rows:
        mine = ranked[(ranked.matrix == r["matrix"]) & (ranked.layer == r["layer"]) & (ranked.neuron == r["neuron"])]
        assert r["top_tokens"] == list(mine[mine.side == "top"].token[:3])
        assert r["bottom_tokens"] == list(mine[mine.side == "bottom"].token[:3])


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: p.stem)
def test_every_sql_file_documents_its_variables_and_runs_from_any_folder(path, atlas, tmp_path, monkeypatch):
    text = path.read_text()
    assert text.startswith(f"-- {path.name} — ") and "-- Example:" in text
    for name in set(re.findall(r"getvariable\('(\w+)'\)", re.sub(r"--[^\n]*", "", text))):
        assert re.search(rf"^--\s+{name}\s+(required|optional)\b", text, re.MULTILINE), name
    monkeypatch.chdir(tmp_path)
    args = [f"--var={name}={value}" for name, value in VARS[path.stem].items()]
    result = run_cli("query", path.stem, "--out", atlas, "--format", "json", *args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)


def test_output_formats_limit_and_file_paths(atlas, tmp_path):
    args = ["--out", atlas, "--var", "layer=2", "--var", "neuron=11", "--var", "model=planted", "--var", "matrix=up"]
    table = run_cli("query", "top_tokens", *args)
    assert table.exit_code == 0 and table.stdout.splitlines()[0].split()[:3] == ["model", "matrix", "layer"]
    assert table.stdout.rstrip().endswith(f"({K} rows)") and " water" in table.stdout
    as_csv = run_cli("query", SQL_DIR / "top_tokens.sql", *args, "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(as_csv)))
    assert [int(r["rank"]) for r in rows] == list(range(1, K + 1)) and rows[0]["token"] == " water"
    records = json.loads(run_cli("query", "top_tokens.sql", *args, "--format", "json", "--limit", 2).stdout)
    assert [r["rank"] for r in records] == [1, 2] and records[0]["token"] == " water"
    target = tmp_path / "top.parquet"
    assert run_cli("query", "top_tokens", *args, "--format", "parquet", "--output", target).exit_code == 0
    assert pq.read_table(target).column("token").to_pylist() == [r["token"] for r in rows]
    own = tmp_path / "mine.sql"
    own.write_text("CREATE TEMP VIEW two AS SELECT 2 AS layer;\n"
                   "SELECT count(*) AS n FROM neurons JOIN two USING (layer);\n")
    n_layer_2 = 3 * 3 * D_FF  # 3 models × 3 matrices
    assert json.loads(run_cli("query", own, "--out", atlas, "--format", "json").stdout) == [{"n": n_layer_2}]
    quoted = run_cli("query", "find_concept", "--out", atlas, "--var", "concept=it's'; DROP VIEW atlas; --")
    assert quoted.exit_code == 0 and "(0 rows)" in quoted.stdout


@pytest.mark.parametrize("args, code, message", [
    (["top_tokens", "--var", "layer=0", "--var", "neuron=1", "--var", "colour=red"], 1, "reads no variable colour"),
    (["top_tokens", "--var", "layer=0"], 1, "needs --var neuron=VALUE"),
    (["top_tokens", "--var", "layer=zero", "--var", "neuron=1"], 1, "Could not convert string 'zero'"),
    (["compare_models", "--var", "base=base", "--var", "other=nobody"], 1,
     "compare_models.sql: no atlas of model 'nobody' under"),
    (["top_tokens", "--var", "layer=0", "--var", "neuron=1", "--var", "model=plantd"], 1,
     "(it has: base, instruct, planted)"),
    (["top_tokens", "--var", "layer=0", "--var", "neuron=1", "--var", "matrix=upp"], 1,
     "top_tokens.sql: matrix must be one of up, gate, down, not 'upp'"),
    (["find_concept", "--var", "concept=dog", "--var", "side=Top"], 1, "side must be one of top, bottom"),
    (["coherent_neurons", "--var", "read=down"], 1, "read must be one of up, gate, not 'down'"),
    (["attributed_neurons", "--var", "concept=dog", "--var", "method=eap"], 1,
     "method must be one of gim, attnlrp, ig, grad_x_act"),
    (["no_such_query"], 1, "no SQL file no_such_query"),
    (["top_tokens", "--var", "layer"], 2, "'layer' is not NAME=VALUE"),
    (["layer_summary", "--format", "parquet"], 2, "parquet needs --output"),
])
def test_bad_queries_fail_in_one_line(args, code, message, atlas):
    result = run_cli("query", *args, "--out", atlas)
    assert result.exit_code == code and message in result.stderr, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
    if code == 1:
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sql, message", [("SELEC 1;", "Parser Error"), ("SELECT nothing FROM atlas;", "Binder Error")])
def test_sql_errors_and_a_missing_atlas_fail_in_one_line(sql, message, atlas, tmp_path):
    bad = tmp_path / "bad.sql"
    bad.write_text(sql)
    for out, expected in ((atlas, f"bad.sql: {message}"), (tmp_path / "empty", "no atlas under")):
        result = run_cli("query", bad, "--out", out)
        assert_one_line_error(result, expected)


def test_matching_token_ids_follows_the_sql_rule():
    tokens = ["dog", " Dog", "Ġdogs", "▁DOG.", "dogma", "hotdog", " cat", "", " do"]
    assert matching_token_ids(tokens, " dog") == [0, 1, 2, 3]
    assert matching_token_ids(tokens, "Dogs") == [0, 1, 2, 3]
    assert matching_token_ids(tokens, "zebra") == []
