"""Every command answers --help, quickly and without importing torch."""
from __future__ import annotations

import subprocess
import sys

from pipeline.cli import cli
from tests.conftest import run_cli


def test_help_for_every_command():
    assert "Neuron Atlas" in run_cli("--help").stdout
    for name in cli.commands:
        result = run_cli(name, "--help")
        assert result.exit_code == 0 and "Usage: " in result.stdout, name


def test_help_does_not_import_torch():
    code = "import sys; from pipeline.cli import main; sys.argv=['atlas','--help']\n" \
           "try: main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
