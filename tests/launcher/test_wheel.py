"""A wheel, installed into a fresh virtual environment outside the source tree, finds its shipped
DeepSpeed configs and sbatch templates, and adds no generic top-level package."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO


def run(*argv, cwd, timeout=600):
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the tracked (and new, unignored) files: the checkout stays clean.
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout.split()
    source = root / "source"
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", source, cwd=root)
    (wheel,) = (root / "dist").glob("distill-*.whl")
    venv = root / "fresh"
    run(sys.executable, "-m", "venv", venv, cwd=root)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=root)
    # The dependencies (pyyaml, psutil) come from the test environment's site-packages as a plain
    # path entry: its .pth files (the editable install of this checkout) are not processed there.
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = root / "elsewhere"
    workdir.mkdir()
    return {"venv": venv, "python": python, "site": site, "cwd": workdir}


def test_the_installed_package_is_used_not_the_checkout(installed):
    code = ("import distill, distill_launcher, importlib.util; print(distill.__file__); print(distill_launcher.__file__); "
            "print(importlib.util.find_spec('launcher'))")
    lines = run(installed["python"], "-c", code, cwd=installed["cwd"]).stdout.split()
    assert lines[0].startswith(str(installed["site"])) and lines[1].startswith(str(installed["site"]))
    assert lines[2] == "None"  # no top-level `launcher` package


def test_launch_dry_run_finds_the_shipped_zero3_config(installed, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("teacher: {path: t}\nstudent: {architecture: {num_hidden_layers: 1}}\ndata: {train_files: [a.txt]}\n")
    out = run(installed["venv"] / "bin" / "distill", "launch", config, "--launcher", "deepspeed", "--nproc-per-node", "2",
              "--ds-config", "zero3", "--dry-run", cwd=installed["cwd"]).stdout
    shipped = installed["site"] / "distill_launcher" / "ds_configs" / "zero3.json"
    assert f"--ds-config {shipped}" in out and shipped.is_file()


def test_submit_dry_run_renders_the_shipped_template(installed, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("teacher: {path: t}\nstudent: {architecture: {num_hidden_layers: 1}}\ndata: {train_files: [a.txt]}\n")
    script = run(installed["venv"] / "bin" / "distill", "submit", config, "--nodes", "2", "--gpus-per-node", "4", "--ds-config", "zero2",
                 "--dry-run", "--output-dir", tmp_path / "run dir", cwd=installed["cwd"]).stdout
    assert script.startswith("#!/bin/bash") and "-m distill_launcher.cli launch" in script
    assert str(installed["site"] / "distill_launcher" / "ds_configs" / "zero2.json") in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
