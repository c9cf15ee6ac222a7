"""The README's quickstart, exactly: prepare the tiny default, distill it, read the table."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, distill_cli


@pytest.mark.slow
def test_quickstart_distills_meaningfully(tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_MODE": "offline"}  # `~/.cache/distill/tiny` lands in tmp_path
    # Two users (or two sweep tasks) preparing the shared cache at once: one builds, the other waits and reuses it.
    logs = [(tmp_path / f"prepare-{i}.out", tmp_path / f"prepare-{i}.err") for i in range(2)]
    both = [subprocess.Popen([sys.executable, "-m", "distill_launcher.cli", "prepare-tiny"], cwd=REPO, env={**os.environ, **env},
                             stdout=open(out, "w"), stderr=open(err, "w")) for out, err in logs]  # files: a full pipe would stall a builder
    outputs = [(p.wait(timeout=1200), out.read_text(), err.read_text()) for p, (out, err) in zip(both, logs)]
    assert [code for code, _, _ in outputs] == [0, 0], [err[-3000:] for _, _, err in outputs]
    assert sorted("(cached)" in out for _, out, _ in outputs) == [False, True]
    assert any("another process is building" in err for _, _, err in outputs)
    assert not list((tmp_path / ".cache" / "distill").glob(".tiny.tmp-*"))
    again = distill_cli("prepare-tiny", env=env)
    assert "(cached)" in again.stdout
    run_dir = tmp_path / "runs" / "tiny"
    result = distill_cli("run", str(REPO / "configs" / "tiny.yaml"), "--output-dir", str(run_dir), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| student" in result.stdout and "speedup" in result.stdout
    rows = {r["model"]: r for r in json.loads((run_dir / "eval.json").read_text())["rows"]}
    teacher, initial, student, baseline = rows["teacher"], rows["initial_student"], rows["student"], rows["baseline"]
    # The teacher really learned the corpus, clearly better than the student can from the data alone,
    # and distillation transferred it: the distilled student beats the same student trained without it.
    assert teacher["perplexity"] < 0.75 * baseline["perplexity"]
    assert student["perplexity"] < baseline["perplexity"]
    assert "against the baseline (the same student, data and steps, without the teacher): perplexity" in result.stdout
    assert student["perplexity"] < initial["perplexity"] / 5
    assert student["top1_agreement"] > 0.5
    # Smaller than the teacher, and measured for speed like it (timings themselves are not asserted).
    assert student["params"] * 3 < teacher["params"]
    assert student["throughput_tokens_per_s"] > 0 and teacher["throughput_tokens_per_s"] > 0
    assert list((run_dir / "wandb").glob("offline-run-*"))
    # The README's next step: benchmarks on the local task that prepare-tiny built, and the draft model.
    task_dir = tmp_path / ".cache" / "distill" / "tiny" / "lm_eval"
    judged = distill_cli("eval", str(run_dir), "--lm-eval", "stdlib_next_word", "--lm-eval-include", str(task_dir), "--speculative", env=env)
    assert judged.returncode == 0, judged.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((run_dir / "eval.json").read_text())["rows"]}
    assert rows["teacher"]["lm_eval/stdlib_next_word/acc"] > 0.4  # a trained model, well above the 0.25 of chance
    assert rows["student"]["spec_identical"] is True and rows["student"]["spec_accepted_per_step"] > 0.5
