"""Pairing teacher and student: padded teacher vocabularies, students built from the teacher's config."""

import pytest
import torch

from conftest import run_job, save_llama, reset_accelerate
from distill.config import ConfigError, StudentConfig, TeacherConfig
from distill.models import build_student, check_tokenizers, load_tokenizer, shared_vocab_size


def test_padded_teacher_vocabulary_is_truncated(tiny, corpus, tmp_path):
    tokenizer = tiny["tokenizer"]
    padded = tmp_path / "padded-teacher"
    save_llama(padded, tokenizer, vocab_size=len(tokenizer) + 64, layers=1, hidden=32, heads=2)
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"teacher.path={padded}", f"student.path={tiny['student']}",
                              "student.architecture={}", "eval.speed=false")
    assert result["rows"][0]["params"] > 0 and (run_dir / "student").is_dir()
    reset_accelerate()
    with pytest.raises(ConfigError, match="teacher.truncate_vocab"):
        run_job(tiny, corpus, tmp_path / "run2", f"teacher.path={padded}", f"student.path={tiny['student']}",
                "student.architecture={}", "teacher.truncate_vocab=false")


def test_shared_vocab_rules(tiny, tmp_path):
    tokenizer = tiny["tokenizer"]
    small = save_llama(tmp_path / "a", tokenizer, layers=1, hidden=16, heads=2)
    big = save_llama(tmp_path / "b", tokenizer, vocab_size=len(tokenizer) + 8, layers=1, hidden=16, heads=2)
    assert shared_vocab_size(big, small, tokenizer, truncate_vocab=True) == len(tokenizer)
    assert shared_vocab_size(small, small, tokenizer, truncate_vocab=False) == len(tokenizer)


def test_tokenizer_check_passes_the_same_map_and_names_the_first_differing_id(tiny):
    tok = load_tokenizer(tiny["teacher"], "teacher.path")
    check_tokenizers(tok, load_tokenizer(tiny["student"], "student.path"))  # the same map: no error
    other = load_tokenizer(tiny["student"], "student.path")
    other.add_tokens(["<zzz-new-token>"])  # extends the range only: still compatible
    check_tokenizers(tok, other)
    vocab = tok.get_vocab()
    swapped = {token: (vocab["b"] if token == "a" else vocab["a"] if token == "b" else i) for token, i in vocab.items()}
    first = min(vocab["a"], vocab["b"])

    class Swapped:
        def get_vocab(self):
            return swapped

        def __len__(self):
            return len(swapped)

    with pytest.raises(ConfigError, match=f"tokenizers differ at id {first} "):
        check_tokenizers(tok, Swapped())


def test_student_from_architecture_keeps_teacher_family(tiny):
    student = build_student(StudentConfig(architecture={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}),
                            TeacherConfig(path=tiny["teacher"]), seed=0)
    assert type(student).__name__ == "LlamaForCausalLM"
    assert student.config.head_dim == 16 and student.config.num_key_value_heads == 2
    assert student.config.vocab_size == len(tiny["tokenizer"])
    assert student(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(tiny["tokenizer"]))
    again = build_student(StudentConfig(architecture={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}),
                          TeacherConfig(path=tiny["teacher"]), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), again.parameters()))


def test_inconsistent_architecture(tiny):
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        build_student(StudentConfig(architecture={"hidden_size": 30, "num_attention_heads": 4}), TeacherConfig(path=tiny["teacher"]), seed=0)
