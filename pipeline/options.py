"""click options that several commands share, so they read and behave the same everywhere."""
from __future__ import annotations

from pathlib import Path

import click

OUT_OPTION = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs"),
                          show_default=True, help="Root folder of all outputs (atlases, comparisons, runs).")
