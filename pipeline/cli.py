"""The `atlas` command line: click options mapped onto config dataclasses, nothing more.

Exit codes: 0 success, 1 bad input or environment (one line on stderr), 2 bad usage or option value.
Heavy imports (torch, transformers) happen inside commands so `atlas --help` is instant.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import click

from pipeline import __version__
from pipeline.config import DTYPES, ENGINES, NORMS, AtlasConfig, parse_layers, parse_matrices
from pipeline.errors import AtlasError
from pipeline.options import OUT_OPTION
from pipeline.sources.embedded import DEFAULT_MODEL



class AtlasGroup(click.Group):
    """Turns an `AtlasError` from any command into one error line and exit code 1 (unless --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AtlasError as e:
            if os.environ.get("ATLAS_DEBUG") or (ctx.obj or {}).get("debug"):
                raise
            raise click.ClickException(str(e)) from None


def _parsed(parse):
    """A click callback that maps a parser's `AtlasError` to a usage error (exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            return parse(value)
        except AtlasError as e:
            raise click.BadParameter(str(e)) from None

    return callback


@click.group(cls=AtlasGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="atlas")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Neuron Atlas: what every MLP neuron of a language model reads and writes, in token space."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@OUT_OPTION
@click.option("--name", help="Name of the model in the outputs (default: derived from MODEL).")
@click.option("-k", "--k", "k", type=click.IntRange(min=1), default=20, show_default=True,
              help="Top and bottom tokens kept per neuron.")
@click.option("--norm", type=click.Choice(NORMS), default="raw", show_default=True,
              help="raw: W_U·w; final: fold the final norm gain; both: also the pre-MLP gain for up/gate.")
@click.option("--center", is_flag=True, help="Subtract each layer's mean neuron vector before projecting.")
@click.option("--matrices", callback=_parsed(parse_matrices), help="Comma list of up,gate,down [default: all].")
@click.option("--layers", callback=_parsed(parse_layers), help="Layers to map, e.g. 0-3,10 [default: all].")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto picks the fastest exact path for this machine.")
@click.option("--device", default="cpu", show_default=True, help="Torch device for the projection (cpu, cuda).")
@click.option("--block-size", type=click.IntRange(min=1), default=AtlasConfig.block_size, show_default=True,
              help="Neurons per projection block and Parquet row group.")
@click.option("--force", is_flag=True, help="Recompute partitions that are already built.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="Where shards of layers run: this machine, or a Ray cluster (RAY_ADDRESS; pip install '.[ray]').")
@click.option("--workers", type=click.IntRange(min=1),
              help="Shards at once [default: 1 locally, in this process; on Ray one per 4 CPUs].")
@click.option("--lanes", type=click.IntRange(min=1),
              help="Partitions projected at once in a process [default: one per core; 3 on a GPU].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes; only errors.")
def build(model: str, out: Path, name: str | None, k: int, norm: str, center: bool, matrices, layers,
          dtype: str, device: str, block_size: int, force: bool, engine: str, workers: int | None,
          lanes: int | None, quiet: bool) -> None:
    """Map every MLP neuron of MODEL to its top and bottom tokens, as Parquet under OUT/atlas/.

    \b
    MODEL is one of
      - a Hugging Face model folder (config.json + safetensors, sharded or not),
      - a .gguf file,
      - a hub id already in the local Hugging Face cache (never downloaded),
      - an alias of a model shipped in a Python package:
        smollm2-135m-instruct (the default) or gemma3-270m.

    A rerun skips what is already built; a run that was killed resumes where it stopped.
    """
    from pipeline.atlas.job import AtlasJob

    cfg = AtlasConfig(model=model, out=out, name=name, k=k, norm=norm, center=center, matrices=matrices,
                      layers=layers, dtype=dtype, device=device, block_size=block_size, force=force,
                      engine=engine, workers=workers, lanes=lanes)
    job = AtlasJob(cfg)
    report = job.run(progress=not quiet, log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)))
    if not quiet:
        lanes = "" if report.lanes_seconds is None else f"{report.lanes_seconds:.1f} s of it on the partitions, "
        click.echo(f"{report.model}: {report.written} partitions written, {report.skipped} already built, "
                   f"in {report.seconds:.1f} s ({lanes}peak memory {report.peak_rss_bytes / 2**30:.2f} GiB) "
                   f"-> {report.out / 'atlas' / f'model={report.model}'}")


@cli.command()
@click.argument("sql_file", metavar="FILE")
@OUT_OPTION
@click.option("--var", "var", multiple=True, metavar="NAME=VALUE",
              help="Set a variable the file reads with getvariable('NAME'); repeat for several.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True, help="How to print the result (parquet needs --output).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the result here, not to stdout.")
@click.option("--limit", type=click.IntRange(min=0), help="At most this many rows.")
def query(sql_file: str, out: Path, var: tuple[str, ...], fmt: str, output: Path | None, limit: int | None) -> None:
    """Run the SQL in FILE over the atlas under OUT and print the result of its last statement.

    \b
    FILE is a path, or the name of a file in the repository's sql/ folder:
      compare_models, find_concept, coherent_neurons, clamp_candidates,
      layer_summary, glitch_tokens, top_tokens, specialised_neurons,
      attributed_neurons (each file's header lists its variables).
    The views atlas, neurons and tokens are defined first (sql/views.sql).

    Example: atlas query find_concept --var concept=water --var matrix=down
    """
    import pyarrow.parquet as pq

    from pipeline.query import render, run_sql

    if bad := [v for v in var if "=" not in v]:
        raise click.BadParameter(f"{bad[0]!r} is not NAME=VALUE", param_hint="'--var'")
    if fmt == "parquet" and output is None:
        raise click.BadParameter("parquet needs --output PATH", param_hint="'--format'")
    table = run_sql(out, sql_file, dict(v.split("=", 1) for v in var), limit)
    if fmt == "parquet":
        pq.write_table(table, output)
    elif output is not None:
        output.write_text(render(table, fmt))
    else:
        click.echo(render(table, fmt), nl=False)


@cli.command()
@click.argument("base")
@click.argument("other")
@OUT_OPTION
@click.option("-k", "--k", "k", type=click.IntRange(min=1),
              help="Top-k size for the Jaccard overlap [default: the atlases' k].")
@click.option("--changed", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many of the most changed neurons to list.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, notes or table; only errors.")
def compare(base: str, other: str, out: Path, k: int | None, changed: int, quiet: bool) -> None:
    """Compare the atlases of BASE and OTHER (e.g. a model and its instruct fine-tune), neuron by neuron.

    \b
    BASE and OTHER are models as `atlas build` takes them, or names of atlases already in OUT.
    A missing atlas is built first (with the settings already used in OUT, if any).
    Prints, per layer and matrix, the share of neurons whose top-1 token is the same in both and
    the mean Jaccard overlap of their top-k token sets, then the neurons that changed most; writes
    them to OUT/compare/BASE--vs--OTHER.parquet and a plot per layer to the .png beside it.
    """
    from pipeline.report.compare import CompareConfig, agreement_text
    from pipeline.report.compare import compare as run_compare

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    result = run_compare(CompareConfig(base, other, out, k, changed), progress=not quiet, log=log)
    if not quiet:
        click.echo(agreement_text(result))
        click.echo(f"wrote {result.parquet} and {result.plot}", err=True)


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@OUT_OPTION
@click.option("--compare", "other", metavar="OTHER", help="Also compare with OTHER (e.g. the base model).")
@click.option("--concept", "concepts", multiple=True, metavar="WORD",
              help="Look up the neurons of a concept word; repeat for several.")
@click.option("--per-layer", type=click.IntRange(min=1), default=3, show_default=True,
              help="Most specialised neurons listed per layer and matrix.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes; only errors.")
def report(model: str, out: Path, other: str | None, concepts: tuple[str, ...], per_layer: int, quiet: bool) -> None:
    """Write a static HTML report on MODEL's atlas to OUT/report/ (one self-contained file).

    \b
    The page shows, per layer, how specialised the neurons are (z-scores) and which glitch
    tokens top many of them; the most specialised neurons of every layer with their top and
    bottom tokens; with --compare, agreement with another model; with --concept, the neurons
    that read or write each word and the candidates for clamping. The atlas (and OTHER's) is
    built first if OUT does not have it.

    Example: atlas report smollm2-135m-instruct --concept water --concept dog
    """
    from pipeline.report.model_report import ReportConfig, write_report

    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    path = write_report(ReportConfig(model, out, other, concepts, per_layer), progress=not quiet, log=log)
    if not quiet:
        click.echo(f"wrote {path}")


from pipeline.clamp.command import clamp  # noqa: E402

cli.add_command(clamp)

from pipeline.attribution.command import attribute, evaluate  # noqa: E402

cli.add_command(attribute)
cli.add_command(evaluate)

from pipeline.circuits.command import circuit  # noqa: E402

cli.add_command(circuit)


def main() -> None:
    try:
        cli(prog_name="atlas")
    finally:  # the interpreter's last collections need not trace what torch left: exit after a build 0.3 s, not 1.1
        gc.freeze()
