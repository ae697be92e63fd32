"""`atlas clamp`: options mapped onto a `ClampConfig`; torch and transformers load only when it runs."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.clamp.config import DEFAULT_VALUES, POSITIONS, ClampConfig, parse_neuron, parse_values, parse_variables
from pipeline.errors import AtlasError
from pipeline.options import OUT_OPTION
from pipeline.live import DTYPES, SITES
from pipeline.sources.embedded import DEFAULT_MODEL


@click.command()
@click.argument("model", default=DEFAULT_MODEL)
@OUT_OPTION
@click.option("--neuron", "neurons", multiple=True, metavar="L:N[:VALUE]",
              help="A neuron to clamp, optionally at its own value instead of --values; repeatable.")
@click.option("--candidates", metavar="FILE.sql", help="Take the neurons from this query's `spec` and `sign` "
              "columns, e.g. clamp_candidates.")
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE", help="A variable of the --candidates file.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Candidates to clamp.")
@click.option("--values", default=",".join(f"{v:g}" for v in DEFAULT_VALUES), show_default=True,
              help="Clamped values (the dose range), times -1 for candidates of sign -1.")
@click.option("--site", type=click.Choice(SITES), default="act", show_default=True,
              help="act: the neuron's activation (input of down_proj); up/gate: that branch's pre-activation.")
@click.option("--positions", type=click.Choice(POSITIONS), default="all", show_default=True,
              help="Where in the sequence the clamp applies; last: the last prompt token.")
@click.option("--prompts", type=click.Path(dir_okay=False, path_type=Path),
              help="Probability mode: one prompt per line (or a .jsonl file).")
@click.option("--target", "targets", multiple=True, metavar="WORD",
              help="The concept measured, e.g. ' water' (any case, space, plural); repeatable.")
@click.option("--ask", metavar="TEXT", help="Generation mode: the question to answer, through the chat template.")
@click.option("--samples", type=click.IntRange(min=1), default=20, show_default=True, help="Answers per value.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every batch of samples.")
@click.option("--device", default="cpu", show_default=True, help="Torch device (cpu, cuda).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes; only the summary and errors.")
def clamp(model: str, out: Path, neurons: tuple[str, ...], candidates: str | None, variables: tuple[str, ...],
          top: int, values: str, site: str, positions: str, prompts: Path | None, targets: tuple[str, ...],
          ask: str | None, samples: int, max_new_tokens: int, temperature: float, seed: int, device: str,
          dtype: str, quiet: bool) -> None:
    """Clamp neurons of MODEL in the live model and measure what they do to its output.

    \b
    Probability mode (--prompts FILE --target WORD): for each value, the target's probability at
    the next token, its log-odds change, the KL divergence from the unclamped distribution, top-1.
    Generation mode (--ask TEXT --target WORD): for each value, sampled answers and the share that
    mention the target, beside unclamped answers drawn with the same seed.
    Results: OUT/clamp/model=<name>/<run>.parquet (joins to `neurons` on model, layer, neuron) and a
    dose-response plot beside it. MODEL is any model `atlas build` takes.

    \b
    Example:
      atlas clamp --candidates clamp_candidates --var concept=water --top 2 \\
                  --values 0,10,20,50 --prompts examples/prompts/water.txt
    """
    try:
        cfg = ClampConfig(model=model, out=out, neurons=tuple(parse_neuron(n) for n in neurons), candidates=candidates,
                          variables=parse_variables(variables), top=top, values=parse_values(values), site=site,
                          positions=positions, prompts=prompts, targets=targets, ask=ask, samples=samples,
                          max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, device=device,
                          dtype=dtype)
    except AtlasError as e:
        raise click.UsageError(str(e)) from None
    from pipeline.clamp.job import run_clamp
    from pipeline.query import render

    report = run_clamp(cfg, progress=not quiet)
    click.echo(render(report.summary, "table"), nl=False)
    if not quiet:
        click.echo(f"{report.model}: {len(report.neurons)} neurons in {report.seconds:.1f} s -> {report.path} "
                   f"and {report.plot.name}", err=True)
