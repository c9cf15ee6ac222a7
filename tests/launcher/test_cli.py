"""The `distill` command line: help, start-up cost and error exits, through real processes."""

import subprocess
import sys

from conftest import REPO, distill_cli
from distill.config import iter_options


def test_help_lists_every_option():
    result = distill_cli("run", "--help")
    assert result.returncode == 0
    for key, _, _ in iter_options():
        assert key in result.stdout, key
    for command in ("run", "eval", "prepare-tiny", "launch", "submit"):
        assert command in distill_cli("--help").stdout
        assert distill_cli(command, "--help").returncode == 0


def test_cli_does_not_import_torch():
    code = "import sys, distill_launcher.cli; distill_launcher.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_config_errors_exit_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  path: x\ntrain:\n  lr: fast\n")
    result = distill_cli("run", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == "distill: error: train.lr: expected a number, got 'fast'"


def test_eval_of_a_non_run_directory(tmp_path):
    result = distill_cli("eval", str(tmp_path))
    assert result.returncode == 2 and "not a run directory" in result.stderr
