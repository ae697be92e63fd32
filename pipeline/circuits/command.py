"""`atlas circuit`: options mapped onto a `CircuitConfig`; torch loads only when it runs."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.circuits.config import (
    DEFAULT_EDGES,
    METHODS,
    METRICS,
    SELECTIONS,
    CircuitConfig,
    parse_edges,
    parse_methods,
)
from pipeline.errors import AtlasError
from pipeline.live import DTYPES
from pipeline.options import OUT_OPTION
from pipeline.sources.embedded import DEFAULT_MODEL


def _parsed(parse):
    """A click callback mapping a parser's `AtlasError` to a usage error (exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str):
        try:
            return parse(value)
        except AtlasError as e:
            raise click.BadParameter(str(e)) from None

    return callback


@click.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--pairs", required=True, metavar="FILE.jsonl|TASK",
              help="Clean/corrupted pairs: a JSONL file (prompt, corrupted, target, foil on every line; see the "
                   "README) or a shipped task: ioi, greater-than, capital.")
@click.option("--method", "methods", default=",".join(METHODS), show_default=True, callback=_parsed(parse_methods),
              help="Comma list of eap, eap-ig and random (seeded random scores: the floor).")
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Integration steps of eap-ig.")
@click.option("--metric", type=click.Choice(METRICS), default="logit_diff", show_default=True,
              help="What the scores explain and faithfulness measures.")
@click.option("--edges", default=DEFAULT_EDGES, show_default=True, callback=_parsed(parse_edges),
              help="Edge budgets: counts, percentages of the graph's edges, all (the default is MIB's grid).")
@click.option("--selection", type=click.Choice(SELECTIONS), default="greedy", show_default=True,
              help="greedy: grow from the logits (the paper); topn: the largest |score| anywhere. Both are pruned.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many pairs (the file's first).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Pairs per batch (pairs are grouped by token length).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random scores.")
@OUT_OPTION
@click.option("--name", help="Name of the model in the outputs (default: derived from MODEL).")
@click.option("--device", default="cpu", show_default=True, help="Torch device (cpu, cuda).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes; only the tables and errors.")
def circuit(model: str, pairs: str, methods: tuple[str, ...], steps: int, metric: str, edges: tuple, selection: str,
            limit: int | None, batch_size: int, seed: int, out: Path, name: str | None, device: str, dtype: str,
            quiet: bool) -> None:
    """Find the circuit of MODEL for a task with edge attribution patching (EAP, EAP-IG), and measure it.

    \b
    Scores every edge between the input, attention heads (q, k, v inputs apart), MLPs and the logits
    on clean/corrupted pairs; keeps circuits of each edge budget; measures their faithfulness
    F = (m(circuit) - m(empty)) / (m(full) - m(empty)), every cut edge patched to its corrupted value.
    Prints F per budget and method, then per method CPR (area under F, higher is better), CMD (area
    under |1 - F|, lower is better), and the scoring time and its cost in forward + backward passes.
    Writes OUT/circuits/edges/model=M/task=T/method=X.parquet (one row per edge; MLP nodes join the
    atlas's `neurons` view on model and layer), OUT/circuits/faithfulness/model=M/task=T/ (a file per
    method, curves.png and circuit.png). MODEL is any model `atlas build` takes.

    Example: atlas circuit --pairs ioi --method eap,eap-ig,random --limit 40
    """
    try:
        cfg = CircuitConfig(model=model, pairs=pairs, methods=methods, steps=steps, metric=metric, edges=edges,
                            selection=selection, limit=limit, batch_size=batch_size, out=out, name=name,
                            device=device, dtype=dtype, seed=seed)
    except AtlasError as e:
        raise click.UsageError(str(e)) from None
    from pipeline.circuits.job import run_circuit
    from pipeline.query import render

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    report = run_circuit(cfg, progress=not quiet, log=log)
    click.echo(render(report.curves, "table"), nl=False)
    click.echo(render(report.summary, "table"), nl=False)
    if not quiet:
        click.echo(f"{report.model} · {report.task}: {report.n_right} of {report.n_pairs} pairs right, "
                   f"{report.seconds:.1f} s -> {cfg.out / 'circuits'}", err=True)
