"""student.init=teacher_layers: a student that starts as the teacher keeping a subset of its layers."""

import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_job
from distill.config import ConfigError, load_config


def test_the_student_starts_as_the_teacher_with_chosen_layers(tiny, corpus, tmp_path):
    """Layer 2 of the 2-layer teacher, embeddings and head copied: before any step the student
    has those exact weights, and starts far closer to the teacher than a random student."""
    _, result = run_job(tiny, corpus, tmp_path / "run", "student.init=teacher_layers", "student.init_layers=[2]", "student.architecture={}",
                        "train.max_steps=1", "train.lr=1e-9", "eval.speed=false")
    teacher = load_file(f"{tiny['teacher']}/model.safetensors")
    student = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert sorted(student) == sorted(k for k in teacher if not k.startswith("model.layers.1."))  # one layer left
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(student[key], teacher[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(student["model.layers.0.self_attn.q_proj.weight"], teacher["model.layers.1.self_attn.q_proj.weight"], atol=1e-6, rtol=0)
    copied = {r["model"]: r for r in result["rows"]}["initial_student"]

    _, random_result = run_job(tiny, corpus, tmp_path / "random", "student.architecture={num_hidden_layers: 1}", "train.max_steps=1",
                               "eval.speed=false")
    assert copied["kl_to_teacher"] < 0.5 * {r["model"]: r for r in random_result["rows"]}["initial_student"]["kl_to_teacher"]


def test_default_layers_are_evenly_spaced_from_the_first(tiny, corpus, tmp_path):
    run_job(tiny, corpus, tmp_path / "run", "student.init=teacher_layers", "student.architecture={num_hidden_layers: 1}",
            "train.max_steps=1", "train.lr=1e-9", "eval.at_end=false")
    teacher = load_file(f"{tiny['teacher']}/model.safetensors")
    student = load_file(tmp_path / "run" / "student" / "model.safetensors")
    torch.testing.assert_close(student["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"], atol=1e-6, rtol=0)


def test_layers_from_another_checkpoint(tiny, corpus, tmp_path):
    """student.init_from: the layers come from another model of the family (a pretrained checkpoint)."""
    run_job(tiny, corpus, tmp_path / "run", "student.init=teacher_layers", f"student.init_from={tiny['student']}", "student.init_layers=[1]",
            "student.architecture={}", "train.max_steps=1", "train.lr=1e-9", "eval.at_end=false")
    source = load_file(f"{tiny['student']}/model.safetensors")
    student = load_file(tmp_path / "run" / "student" / "model.safetensors")
    assert sorted(student) == sorted(source)
    torch.testing.assert_close(student["model.layers.0.self_attn.v_proj.weight"], source["model.layers.0.self_attn.v_proj.weight"], atol=1e-6, rtol=0)


BASE = ["teacher.path=t", "data.train_files=[a.txt]", "student.init=teacher_layers"]


@pytest.mark.parametrize("extra, message", [
    (["student.architecture={num_hidden_layers: 1, hidden_size: 32}"], "student.architecture may set only num_hidden_layers (got hidden_size, num_hidden_layers)"),
    (["student.init_layers=[0]"], "student.init_layers must list teacher layers as integers >= 1"),
    ([], "student.init=teacher_layers needs student.init_layers or student.architecture.num_hidden_layers"),
    (["student.init=random", "student.init_from=x", "student.architecture={num_hidden_layers: 1}"], "student.init_from needs student.init=teacher_layers"),
])
def test_bad_init_fails_at_load(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*BASE, *extra])


def test_a_layer_the_teacher_lacks_is_named(tiny, corpus, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("student.init_layers: the teacher has layers 1..2 (got [1, 3])")):
        run_job(tiny, corpus, tmp_path / "run", "student.init=teacher_layers", "student.init_layers=[1, 3]", "student.architecture={}")
