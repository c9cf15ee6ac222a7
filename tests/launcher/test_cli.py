"""The `distill` command line: help, start-up cost and error exits, through real processes."""

import subprocess
import sys

import pytest

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


def test_the_readmes_configuration_reference_has_every_option():
    readme = (REPO / "README.md").read_text()
    reference = readme[readme.index("## Configuration reference"):readme.index("\n## ", readme.index("## Configuration reference") + 5)]
    # A row may group a section's keys: `student.lora.r`, `.alpha`, ...
    missing = [key for key, _, _ in iter_options()
               if f"`{key}`" not in reference and not (key.count(".") == 2 and f"`.{key.rsplit('.', 1)[1]}`" in reference)]
    assert missing == []


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


def test_version_print_config_and_did_you_mean(tmp_path):
    import yaml

    from importlib.metadata import version

    assert distill_cli("--version").stdout.startswith(f"distill {version('distill')} (Python ")
    config = tmp_path / "job.yaml"
    config.write_text("teacher: {path: t, url: 'http://bob:hunter2@pool:8765'}\nstudent: {path: s}\ndata: {train_files: [a.txt]}\ntrain: {lr: 1e-3}\n")
    printed = distill_cli("run", str(config), "--print-config", "--set", "loss.kind=jsd")
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["train"]["lr"] == 1e-3 and resolved["loss"]["kind"] == "jsd" and resolved["train"]["max_steps"] == 1000  # defaults too
    assert "hunter2" not in printed.stdout
    typo = distill_cli("run", str(config), "--set", "train.warmup_step=10")
    assert typo.returncode == 2 and typo.stderr.strip() == "distill: error: unknown config key: train.warmup_step; did you mean train.warmup_steps?"
    both = distill_cli("run", str(config), "--set", "train.epochs=2", "--set", "train.max_steps=10")
    assert both.returncode == 2 and both.stderr.strip() == ("distill: error: train.epochs=2 and train.max_steps=10 are both set: keep one "
                                                            "(epochs counts passes over the training data, max_steps optimizer steps)")
    config.write_text("teacher: {path: t}\nstudent: {path: s}\ndata: {train_files: [a.txt]}\ntrian: {lr: 1e-3}\n")
    assert distill_cli("run", str(config)).stderr.strip() == "distill: error: unknown config key: trian; did you mean train?"


def test_dry_run_loads_checks_and_plans_then_leaves_nothing(tiny, corpus, tmp_path):
    """--dry-run loads and pairs everything, prints the plan (train.epochs counted as steps, a warm-up longer than
    the run clipped, each with a note) and stops before training, leaving no run directory."""
    from conftest import job_overrides

    config = tmp_path / "job.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    sets = [a for o in job_overrides(tiny, corpus, out, "train.warmup_steps=50", "train.grad_accum=2") if not o.startswith("train.max_steps")
            for a in ("--set", o)]
    result = distill_cli("run", str(config), *sets, "--set", "train.epochs=0.5", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    sequences = int(result.stderr.split("distill: data: ")[1].split(" training sequences")[0].replace(",", ""))
    steps = -(-sequences // 2 // 8)  # ceil(0.5 x sequences / (4 x 2 x 1))
    assert f"distill: train.epochs=0.5: {steps} steps ({sequences:,} training sequences, 8 a step)" in result.stderr
    assert f"distill: train.warmup_steps=50 is longer than the run (train.max_steps={steps}): clipped to {steps}" in result.stderr
    assert "distill: launch: 1 process (no launcher), cpu, precision fp32" in result.stderr
    assert f"micro-batch 4 x grad_accum 2 x 1 process = 8 sequences of up to 64 tokens (512 tokens) a step; {steps} steps (warm-up {steps})" in result.stderr
    assert "distill: objective: kd x1, ce x0" in result.stderr and "distill: validation: 16 sequences" in result.stderr
    assert "--dry-run: everything loaded and checked" in result.stderr and "| model" not in result.stdout
    assert not out.exists()


BLOCKING = """
import sys
from importlib.machinery import PathFinder
found = PathFinder.find_spec
def find_spec(cls, name, path=None, target=None):  # the package is not on the path, as far as Python's import system can tell
    return None if name.split(".")[0] in {blocked!r} else found(name, path, target)
PathFinder.find_spec = classmethod(find_spec)
from distill_launcher.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("blocked, args, message", [
    ("mlflow", ["run", "{config}", "--set", "tracking.backend=[wandb, mlflow]"], "tracking.backend=mlflow needs mlflow: pip install 'distill[mlflow]'"),
    ("tensorboard", ["run", "{config}", "--set", "tracking.backend=tensorboard"], "needs tensorboard: pip install 'distill[tensorboard]'"),
    ("peft", ["run", "{config}", "--set", "student.lora={r: 4}"], "student.lora needs peft: pip install 'distill[peft]'"),
    ("deepspeed", ["launch", "{config}", "--nproc-per-node", "2", "--ds-config", "zero2", "--dry-run"], "needs deepspeed: pip install 'distill[deepspeed]'"),
    ("uvicorn", ["serve-teacher", "{config}"], "distill serve-teacher needs uvicorn: pip install 'distill[serve]'"),
])
def test_a_feature_whose_extra_is_missing_is_one_line_naming_it(tmp_path, blocked, args, message):
    """Before any model loads (the models here do not even exist), with the run directory left as it was."""
    config = tmp_path / "job.yaml"
    config.write_text(f"teacher: {{path: {tmp_path / 'no-teacher'}}}\nstudent: {{path: {tmp_path / 'no-student'}}}\n"
                      f"data: {{train_files: [{tmp_path / 'a.txt'}]}}\noutput_dir: {tmp_path / 'run'}\n")
    argv = [a.replace("{config}", str(config)) for a in args]
    result = subprocess.run([sys.executable, "-c", BLOCKING.format(blocked={blocked}, argv=argv)], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"distill: error: {result.stderr.split('error: ')[1].strip()}"]
    assert message in result.stderr and not (tmp_path / "run").exists(), result.stderr[-2000:]
