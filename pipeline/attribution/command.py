"""`atlas attribute` and `atlas evaluate`: options mapped onto an `AttributionConfig`; torch loads only when they run."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.attribution.config import LEVELS, METHOD_NAMES, AttributionConfig
from pipeline.errors import AtlasError
from pipeline.live import DTYPES
from pipeline.options import OUT_OPTION
from pipeline.sources.embedded import DEFAULT_MODEL

_PROMPTS_HELP = ("A JSONL file (prompt, target, optional foil and corrupted; see the README) or a shipped "
                 "task: capital, sentiment, ioi. Repeat for several.")


def _options(f):
    """The options both commands share."""
    for option in reversed([
        click.argument("model", default=DEFAULT_MODEL),
        click.option("--prompts", "prompts", multiple=True, required=True, metavar="FILE.jsonl|TASK", help=_PROMPTS_HELP),
        click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Integration steps of ig."),
        OUT_OPTION,
        click.option("--name", help="Name of the model in the outputs (default: derived from MODEL)."),
        click.option("--device", default="cpu", show_default=True, help="Torch device (cpu, cuda)."),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes; only results and errors."),
    ]):
        f = option(f)
    return f


def _config(**kwargs) -> AttributionConfig:
    try:
        return AttributionConfig(**kwargs)
    except AtlasError as e:
        raise click.UsageError(str(e)) from None


@click.command()
@_options
@click.option("--method", type=click.Choice(METHOD_NAMES), default="gim", show_default=True)
@click.option("--level", type=click.Choice(LEVELS), default="both", show_default=True,
              help="Write token scores, neuron scores, or both.")
def attribute(model: str, prompts: tuple[str, ...], steps: int, out: Path, name: str | None, device: str, dtype: str,
              quiet: bool, method: str, level: str) -> None:
    """Score which tokens and which MLP neurons of MODEL carry each prompt's target.

    \b
    Writes OUT/attributions/tokens/model=M/task=T/method=X.parquet (prompt_id, position, token,
    score) and OUT/attributions/neurons/... (prompt_id, layer, neuron, score, activation), which
    joins the atlas's `neurons` view on (model, layer, neuron); see sql/attributed_neurons.sql.
    MODEL is any model `atlas build` takes.

    Example: atlas attribute --prompts capital --method gim
    """
    cfg = _config(model=model, prompts=prompts, methods=(method,), steps=steps, level=level, out=out, name=name,
                  device=device, dtype=dtype)
    from pipeline.attribution.job import run_attribution

    report = run_attribution(cfg, progress=not quiet)
    for path in report.paths:
        click.echo(str(path))
    if not quiet:
        click.echo(f"{report.model}: {report.n_prompts} prompts in {report.seconds:.1f} s", err=True)


@click.command()
@_options
@click.option("--methods", default=",".join(METHOD_NAMES), show_default=True,
              help="Comma list of methods to compare.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many prompts per task (of those the model "
              "gets right).")
@click.option("--max-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Comprehensiveness over the top 1..K tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random rankings.")
def evaluate(model: str, prompts: tuple[str, ...], steps: int, out: Path, name: str | None, device: str, dtype: str,
             quiet: bool, methods: str, limit: int | None, max_k: int, seed: int) -> None:
    """Measure how faithful each attribution method is on MODEL, per task, and print the table.

    \b
    On the prompts the model gets right: token comprehensiveness (higher is better) and
    sufficiency (lower is better) when the top or least important tokens become the space token;
    area of the metric's drop when the top-k neurons are set to zero or to their mean (higher is
    better); cost relative to one forward + backward pass. Floors: random, |activation|.
    Writes OUT/attributions/faithfulness/model=M/task=T.parquet and curves.png beside them.

    Example: atlas evaluate --prompts capital --prompts sentiment --prompts ioi --limit 20
    """
    cfg = _config(model=model, prompts=prompts, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                  steps=steps, out=out, name=name, limit=limit, max_k=max_k, device=device, dtype=dtype, seed=seed)
    from pipeline.attribution.evaluate import run_evaluation
    from pipeline.query import render

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    report = run_evaluation(cfg, progress=not quiet, log=log)
    click.echo(render(report.summary, "table"), nl=False)
    if not quiet:
        click.echo(f"{report.model}: {report.seconds:.1f} s -> {', '.join(map(str, report.paths))} "
                   f"and {report.plot}", err=True)
