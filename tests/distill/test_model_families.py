"""causal_lm beyond Llama: GPT-2 (GPT-2-xl -> GPT-2-small is the classic pair) and Qwen2, from tiny
configs saved and loaded back, with logit and feature terms."""

import pytest
import torch

from conftest import read_metrics, run_job


def _save(path, model, tokenizer):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tokenizer, root = tiny["tokenizer"], tmp_path_factory.mktemp("families")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4, **ids))
    # Loaded back as a Qwen2 tokenizer it gains Qwen's <|endoftext|>; the vocabulary is padded, as Qwen's is.
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer) + 16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids))
    return {"gpt2": _save(root / "gpt2", gpt2, tokenizer), "qwen2": _save(root / "qwen2", qwen2, tokenizer)}


@pytest.mark.parametrize("family, student, attention", [
    ("gpt2", "{n_layer: 1, n_embd: 32, n_head: 4}", "{kind: attention, name: att, mode: maps}"),
    ("qwen2", "{num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, num_key_value_heads: 1}",
     "{kind: attention, name: att, mode: relations, relation_heads: 2}"),
])
def test_family_distills_with_logit_and_feature_terms(tiny, corpus, tmp_path, families, family, student, attention):
    terms = f"loss.terms=[{{kind: logits}}, {{kind: ce, weight: 0.1}}, {{kind: hidden, weight: 0.5}}, {attention}]"
    run_dir, result = run_job(tiny, corpus, tmp_path / family, f"teacher.path={families[family]}", f"student.architecture={student}", terms,
                              "train.max_steps=12", "eval.speed_repeats=1")
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["student"]["kl_to_teacher"] < rows["initial_student"]["kl_to_teacher"]
    assert rows["student"]["latency_ms_per_token"] > 0
    metrics = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert metrics[-1]["train/kd_loss"] < metrics[0]["train/kd_loss"] and metrics[-1]["train/hidden_loss"] < metrics[0]["train/hidden_loss"]
    assert (run_dir / "objective" / "model.safetensors").is_file()


def test_relations_need_separate_projections(tiny, corpus, tmp_path, families):
    """GPT-2 fuses q, k and v in one c_attn: relations cannot be taken from it, and the error says so."""
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="loss.terms\\[1\\].mode: mode relations needs separate query/key/value projections"):
        run_job(tiny, corpus, tmp_path / "run", f"teacher.path={families['gpt2']}", "student.architecture={n_layer: 1, n_embd: 32, n_head: 2}",
                "loss.terms=[{kind: logits}, {kind: attention}]")
