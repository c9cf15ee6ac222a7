"""What installing distill costs: packages, megabytes on disk and seconds, in a fresh virtual environment.

Each row installs ``torch==2.13.0`` (the CPU build, from this machine's disk) and the project from
a source tree, with the given extras, into a new venv, then counts the installed distributions
(``pip list``) and the venv's size on disk (``du``). ``--before REF`` also installs the tree of
that git commit (how it was), so a change to the dependencies is measured against it. The pip
cache is whatever this machine has (warm after the first row): seconds compare rows of one run.
With ``--smoke``, the core venv then runs a short real job (``distill prepare-tiny`` and 20 steps
of configs/tiny.yaml) to show that the core alone trains.

    python benchmarks/install_size.py [--before e716de4] [--rows core all] [--smoke] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


def install(source: Path, extras: str, root: Path) -> dict:
    venv = root / f"venv-{source.name}-{extras or 'core'}"
    run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    target = f"{source}[{extras}]" if extras else str(source)
    start = time.perf_counter()
    run(pip, "install", "-q", "--disable-pip-version-check", "torch==2.13.0", target)
    seconds = time.perf_counter() - start
    packages = json.loads(run(pip, "list", "--format=json", "--disable-pip-version-check").stdout)
    size = int(run("du", "-sb", venv).stdout.split()[0])
    names = {p["name"].lower() for p in packages}
    return {"source": source.name, "extras": extras or "core", "packages": len(packages), "mb": round(size / 2**20),
            "seconds": round(seconds), "has": {n: n in names for n in ("mlflow", "tensorboard", "deepspeed", "peft", "uvicorn", "wandb",
                                                                          "bitsandbytes", "matplotlib")}, "venv": str(venv)}


def smoke(venv: Path, home: Path) -> dict:
    """The README's quickstart, shortened, with the core install alone."""
    env = {**os.environ, "HOME": str(home), "WANDB_MODE": "offline", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    start = time.perf_counter()
    run(venv / "bin" / "distill", "prepare-tiny", env=env, cwd=home)
    run(venv / "bin" / "distill", "run", REPO / "configs" / "tiny.yaml", "--set", "train.max_steps=20", "--set", "eval.at_end=false",
        "--output-dir", home / "run", env=env, cwd=home)
    return {"ok": (home / "run" / "student" / "config.json").is_file(), "seconds": round(time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a git commit whose dependencies to measure as well")
    parser.add_argument("--rows", nargs="+", default=["core", "all"], help="extras to install (core: none)")
    parser.add_argument("--smoke", action="store_true", help="run a short real job with the core install")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distill-install-") as tmp:
        root = Path(tmp)
        sources = []
        if args.before:
            before = root / f"before-{args.before}"
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
            sources.append((before, ["core"]))
        now = root / "now"
        archive = subprocess.run(["git", "-C", str(REPO), "stash", "create"], capture_output=True, text=True).stdout.strip() or "HEAD"
        now.mkdir()
        subprocess.run(["tar", "-x", "-C", str(now)], input=subprocess.run(["git", "-C", str(REPO), "archive", archive], capture_output=True,
                                                                          check=True).stdout, check=True)
        sources.append((now, args.rows))
        rows = []
        for source, extras in sources:
            for extra in extras:
                row = install(source, "" if extra == "core" else extra, root)
                if args.smoke and extra == "core" and source is now:
                    home = root / "home"
                    home.mkdir()
                    row["smoke"] = smoke(Path(row["venv"]), home)
                rows.append(row)
                print(f"{row['source']:>22} {row['extras']:>6}: {row['packages']:4d} packages {row['mb']:6,d} MB {row['seconds']:5d} s "
                      f"{'' if 'smoke' not in row else 'quickstart with the core alone: ' + ('ok' if row['smoke']['ok'] else 'FAILED')}",
                      flush=True)
    print()
    print("| install | packages | MB | seconds | mlflow | tensorboard | deepspeed | peft | uvicorn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        has = r["has"]
        print(f"| {r['source']} {r['extras']} | {r['packages']} | {r['mb']:,} | {r['seconds']} | "
              + " | ".join("yes" if has[n] else "no" for n in ("mlflow", "tensorboard", "deepspeed", "peft", "uvicorn")) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "install_size.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
