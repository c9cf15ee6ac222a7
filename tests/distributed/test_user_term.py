"""A term of the user's own, loaded by path (``loss.terms: [{kind: path/to/file.py:Class}]``): it trains on one
process and under ZeRO-3 on two to the same losses, and a run directory naming it runs no code unasked."""

import re

import pytest

from conftest import read_metrics, reset_accelerate, run_job
from distill.config import ConfigError, load_config

MY_TERM = '''
import torch

from distill.config import LOGITS
from distill.objective import Term


class ProbabilityGap(Term):
    """sum_v |p_student(v) - p_teacher(v)| ** power: total variation at power 1, a Brier-like gap at 2."""

    wants = frozenset({LOGITS})

    def __init__(self, name, weight, power=2.0):
        super().__init__(name, weight)
        self.power = float(power)

    def per_token(self, student_logits, teacher_logits, labels):
        if teacher_logits is None:  # weight 0: the teacher did not run
            return student_logits.new_zeros(student_logits.shape[0], dtype=torch.float32)
        gap = torch.softmax(student_logits.float(), -1) - torch.softmax(teacher_logits.float(), -1)
        return gap.abs().pow(self.power).sum(-1)
'''


@pytest.fixture(scope="module")
def term_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("my_terms") / "my_term.py"  # outside the package, as a user's would be
    path.write_text(MY_TERM)
    return path


def terms(term_file) -> str:
    return f"loss.terms=[{{kind: '{term_file}:ProbabilityGap', name: gap, weight: 50.0, power: 2}}]"  # its values are ~1e-4 at V=320


@pytest.mark.slow
def test_a_users_term_trains_alone_and_under_zero3_to_the_same_losses(term_file, tiny, corpus, tmp_path):
    from test_launchers import STEPS, launch, losses

    one, result = run_job(tiny, corpus, tmp_path / "one", terms(term_file), f"train.max_steps={STEPS}", "train.micro_batch_size=4",
                          "eval.speed=false")
    gaps = [m["train/gap_loss"] for m in read_metrics(one) if "train/loss" in m]
    assert len(gaps) == STEPS and all(a > b > 0 for a, b in zip(gaps, gaps[1:]))  # it is what the student learns
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]  # it pulled the student to the teacher
    reset_accelerate()
    two = tmp_path / "two"
    done = launch(tiny, corpus, two, "--launcher", "deepspeed", "--nproc-per-node", "2", "--ds-config", "zero3",
                  sets=(terms(term_file), "eval.at_end=false"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    # Read back from the run directory, the config names code: distill eval refuses it unasked.
    from distill.finished_run import FinishedRun

    with pytest.raises(ConfigError, match=re.escape(f"names code to run (loss.terms[0].kind: {term_file}:ProbabilityGap)")):
        FinishedRun(one)
    assert FinishedRun(one, allow_code=True).cfg.loss.terms[0]["name"] == "gap"


BASE = ["teacher.path=t", "data.train_files=[a.txt]", "student.architecture={num_hidden_layers: 1}"]


def test_a_users_term_that_cannot_be_used_is_one_line(term_file, tmp_path):
    from distill.objective import build_objective

    with pytest.raises(ConfigError, match=re.escape(f"loss.terms[0].kind: the term's file {tmp_path / 'nope.py'} does not exist")):
        load_config(None, [*BASE, f"loss.terms=[{{kind: '{tmp_path / 'nope.py'}:Gap'}}]"])
    cfg = load_config(None, [*BASE, f"loss.terms=[{{kind: '{term_file}:Missing'}}]"])
    with pytest.raises(ConfigError, match=re.escape(f"loss.terms[0].kind: {term_file} has no class Missing derived from distill.objective.Term")):
        build_objective(cfg.loss)
    cfg = load_config(None, [*BASE, f"loss.terms=[{{kind: '{term_file}:ProbabilityGap', colour: red}}]"])
    with pytest.raises(ConfigError, match=re.escape("loss.terms[0]: ProbabilityGap does not take these options")):
        build_objective(cfg.loss)
    with pytest.raises(ConfigError, match=re.escape("is given the teacher model's logits; use teacher.source=model")):
        load_config(None, [*BASE, f"loss.terms=[{{kind: '{term_file}:ProbabilityGap'}}]", "teacher.source=cache"])
