"""No file in a checkpoint runs code when a run is resumed; a piece that cannot be restored is an
error that names its file. Every planted payload writes a marker file if it is ever unpickled."""

import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, job_overrides, read_metrics, run_job, reset_accelerate
from distill import checkpoint
from distill_launcher.cli import main

EXTRA = ("train.max_steps=4", "train.save_every=2", "eval.at_end=false")


class Payload:
    """Unpickling this runs ``touch MARKER`` (pickle stores posix.system and its argument)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def finished_run(tiny, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    run_job(tiny, corpus, out, *EXTRA)
    reset_accelerate()
    return out


def resume_argv(tiny, corpus, out, *extra):
    config = out.parent / "empty.yaml"
    config.write_text("{}\n")
    sets = [a for o in job_overrides(tiny, corpus, out, *EXTRA, "train.max_steps=6", *extra) for a in ("--set", o)]
    return ["run", str(config), *sets, "--resume"]


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out, checkpoint.latest(out / "checkpoints")


def plant_torch_payload(path, marker, *, keep_real_state=True):
    """A torch archive holding the file's real state plus the payload (the variant that would
    otherwise resume with exit 0 and no trace)."""
    real = {}
    if keep_real_state and path.exists():
        with torch.serialization.safe_globals(checkpoint._allowed_globals()):
            real = torch.load(path, weights_only=True)
    torch.save({**real, "extra": Payload(marker)} if isinstance(real, dict) else Payload(marker), path)


def expect_refused(capsys, argv, marker, *fragments, code):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("distill: error: "), err[-5:]
    for fragment in fragments:
        assert fragment in err[-1], (fragment, err[-1])
    assert not marker.exists(), "the payload ran"
    return err[-1]


@pytest.mark.parametrize("name", ["optimizer.bin", "custom_checkpoint_0.pkl", "scaler.pt", "sampler.bin"])
def test_torch_archive_with_code_is_refused(finished_run, tiny, corpus, tmp_path, capsys, name):
    out, latest = copy_run(finished_run, tmp_path)
    marker = tmp_path / "PWNED"
    plant_torch_payload(latest / name, marker)
    line = expect_refused(capsys, resume_argv(tiny, corpus, out), marker, str(latest / name), "names code to run", code=4)
    assert "posix.system" in line or "os.system" in line


def test_plain_pickle_rng_state_is_refused_unread(finished_run, tiny, corpus, tmp_path, capsys):
    out, latest = copy_run(finished_run, tmp_path)
    marker = tmp_path / "PWNED"
    (latest / "random_states_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    expect_refused(capsys, resume_argv(tiny, corpus, out), marker, str(latest / "random_states_0.pkl"), "not a torch archive", code=4)


@pytest.mark.parametrize("name, content", [
    ("rng_state_0.json", '{"python": [3, [1, 2], null]}'),
    ("scheduler.json", "{not json"),
    ("trainer_state.json", '{"step": -4}'),
])
def test_state_that_cannot_be_restored_names_its_file(finished_run, tiny, corpus, tmp_path, capsys, name, content):
    out, latest = copy_run(finished_run, tmp_path)
    (latest / name).write_text(content)
    expect_refused(capsys, resume_argv(tiny, corpus, out), tmp_path / "none", str(latest / name), code=4)


def test_truncated_model_weights_name_the_file(finished_run, tiny, corpus, tmp_path, capsys):
    out, latest = copy_run(finished_run, tmp_path)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expect_refused(capsys, resume_argv(tiny, corpus, out), tmp_path / "none", str(weights), "cannot be read", code=4)


def test_missing_rng_state_is_an_error_not_ignored(finished_run, tiny, corpus, tmp_path, capsys):
    out, latest = copy_run(finished_run, tmp_path)
    (latest / "rng_state_0.json").unlink()
    expect_refused(capsys, resume_argv(tiny, corpus, out), tmp_path / "none", "rng_state_0.json", "random number generators", code=4)


def test_checkpoints_hold_no_pickles_but_the_optimizer(finished_run):
    files = {p.name for p in checkpoint.latest(finished_run / "checkpoints").iterdir()}
    assert files == {"model.safetensors", "optimizer.bin", "rng_state_0.json", "scheduler.json", "trainer_state.json"}


def test_clean_checkpoint_still_resumes_exactly(finished_run, tiny, corpus, tmp_path):
    """The JSON scheduler and RNG states restore what accelerate's pickles did: the same losses."""
    out, _ = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    shutil.rmtree(out / "student")
    run_job(tiny, corpus, out, *EXTRA, resume=True)
    expected = {m["step"]: m["train/loss"] for m in read_metrics(finished_run) if "train/loss" in m}
    got = {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}
    assert sorted(got) == [1, 2, 3, 4]
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_deepspeed_checkpoint_payload_is_refused_through_the_launcher(tiny, corpus, tmp_path):
    """DeepSpeed unpickles its files with weights_only=False: the check must come first."""
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text("{}\n")
    sets = [a for o in job_overrides(tiny, corpus, out, "train.max_steps=2", "train.save_every=2", "eval.at_end=false") for a in ("--set", o)]
    base = [sys.executable, "-m", "distill_launcher.cli", "launch", str(config), *sets, "--launcher", "deepspeed", "--nproc-per-node", "1",
            "--ds-config", "zero2"]
    first = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    latest = checkpoint.latest(out / "checkpoints")
    optim = next((latest / "pytorch_model").glob("*optim_states.pt"))
    model_states = next((latest / "pytorch_model").glob("*model_states.pt"))
    checkpoint.verify(latest)  # DeepSpeed's own classes are on the allowlist
    marker = tmp_path / "PWNED"
    plant_torch_payload(optim, marker)
    again = subprocess.run([*base, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 4, again.stderr[-3000:]
    assert f"distill: error: refusing to load {optim}" in again.stderr
    assert not marker.exists()
    # The model-states file, checked the same way (in-process: the check is file-type blind).
    shutil.copy(model_states, tmp_path / "model_states.pt")
    plant_torch_payload(model_states, marker)
    with pytest.raises(checkpoint.CheckpointError, match="model_states.pt"):
        checkpoint.verify(latest)
    assert not marker.exists()
    # The same payload in a DeepSpeed folder moved elsewhere and linked back (Path.rglob never entered it).
    shutil.copy(tmp_path / "model_states.pt", model_states)
    moved = tmp_path / "moved" / "pytorch_model"
    shutil.move(str(latest / "pytorch_model"), moved)
    plant_torch_payload(moved / model_states.name, marker)
    (latest / "pytorch_model").symlink_to(moved, target_is_directory=True)
    linked = subprocess.run([*base, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert linked.returncode != 0 and not marker.exists(), linked.stderr[-3000:]
    assert "pytorch_model is a symbolic link to" in linked.stderr.strip().splitlines()[-1]
    with pytest.raises(checkpoint.CheckpointError, match="outside the checkpoint"):
        checkpoint.verify(latest)
    # A link that stays inside the checkpoint is followed, and what it leads to is checked like any file.
    (latest / "pytorch_model").unlink()
    shutil.move(str(moved), latest / ".states")
    (latest / "pytorch_model").symlink_to(latest / ".states", target_is_directory=True)
    with pytest.raises(checkpoint.CheckpointError, match="names code to run"):
        checkpoint.verify(latest)
    assert not marker.exists()


def test_weights_of_another_layout_are_named_in_one_line(finished_run, tiny, corpus, tmp_path, capsys):
    """A checkpoint of an earlier distill (the student alone, names without "student.") fails with what differs."""
    from safetensors.torch import load_file, save_file

    out, latest = copy_run(finished_run, tmp_path)
    weights = latest / "model.safetensors"
    save_file({k.removeprefix("student."): v for k, v in load_file(weights).items()}, str(weights), metadata={"format": "pt"})
    line = expect_refused(capsys, resume_argv(tiny, corpus, out), tmp_path / "none", str(latest), "missing weights (e.g. student.",
                          "saved by an earlier distill", code=4)
    assert re.search(r"\d+ unexpected weights \(e.g. (?!student\.)", line), line
