"""Feature terms (hidden states, attention): against float64 references written out here, the layer
maps, and end to end: projections trained with the student, kept out of student/, restored on resume."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, reset_accelerate, run_job
from distill.config import ConfigError
from distill.feature_terms import AttentionTerm, HiddenTerm, layer_pairs, uniform_pairs
from distill.objective import Outputs

HIDDEN_TERMS = "loss.terms=[{kind: logits, weight: 1.0}, {kind: ce, weight: 0.1}, {kind: hidden, weight: 1.0, embeddings: true}]"


def _states(g, layers, b, s, width):
    return tuple(torch.randn(b, s, width, generator=g, dtype=torch.float64) for _ in range(layers + 1))


def _probs(g, b, heads, s, causal=True):
    scores = torch.randn(b, heads, s, s, generator=g, dtype=torch.float64)
    if causal:
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def test_uniform_layer_map_keeps_relative_depth():
    assert uniform_pairs(2, 4, embeddings=False) == [(1, 2), (2, 4)]
    assert uniform_pairs(3, 12, embeddings=True) == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert uniform_pairs(1, 2, embeddings=False) == [(1, 2)]
    assert layer_pairs([[1, 3]], 2, 4, embeddings=False, key="k", first=1) == [(1, 3)]
    with pytest.raises(ConfigError, match=re.escape("loss.terms[2].layers: teacher layer 5 is out of range; the teacher has layers 0..4")):
        layer_pairs([[1, 5]], 2, 4, embeddings=False, key="loss.terms[2].layers", first=0)


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_hidden_term_with_projection_matches_a_float64_reference(distance):
    g = torch.Generator().manual_seed(0)
    student, teacher = _states(g, 2, 2, 5, 8), _states(g, 4, 2, 5, 12)
    weights = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float64)
    term = HiddenTerm("h", 1.0, pairs=[(0, 0), (1, 2), (2, 4)], distance=distance, student_width=8, teacher_width=12).double()
    got = term(Outputs(hidden_states=student), Outputs(hidden_states=teacher), weights)
    expected = 0.0
    for i, (s, t) in enumerate(term.pairs):
        w = term.projections[i].weight.detach()  # [12, 8]
        projected = student[s] @ w.T
        if distance == "mse":
            d = ((projected - teacher[t]) ** 2).sum(-1) / 12
        else:
            d = 1 - (projected * teacher[t]).sum(-1) / (projected.norm(dim=-1) * teacher[t].norm(dim=-1))
        expected += (d * weights).sum()
    torch.testing.assert_close(got.double(), expected / 3, rtol=1e-5, atol=1e-6)


def test_attention_maps_term_matches_a_float64_reference():
    g = torch.Generator().manual_seed(1)
    student = tuple(_probs(g, 2, 4, 6) for _ in range(2))
    teacher = tuple(_probs(g, 2, 4, 6) for _ in range(4))
    weights = torch.ones(2, 6, dtype=torch.float64)
    weights[1, 4:] = 0
    term = AttentionTerm("a", 1.0, pairs=[(1, 2), (2, 4)], mode="maps", relation_heads=1, causal=True)
    got = term(Outputs(attentions=student), Outputs(attentions=teacher), weights, torch.ones(2, 6))
    expected = 0.0
    for s, t in term.pairs:
        p, q = teacher[t - 1], student[s - 1]
        safe = torch.where(p > 0, p, torch.ones_like(p))
        kl = torch.where(p > 0, p * (safe.log() - q.clamp_min(1e-300).log()), torch.zeros_like(p)).sum(-1)  # [B, H, S]
        expected += (kl.mean(1) * weights).sum()
    torch.testing.assert_close(got.double(), expected / 2, rtol=1e-5, atol=1e-6)


def _relation64(x, heads, key_mask):
    b, s, width = x.shape
    a = x.view(b, s, heads, width // heads).transpose(1, 2)
    scores = a @ a.transpose(-1, -2) / (width // heads) ** 0.5
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None, None] & key_mask[:, None, None, :].bool()
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def test_attention_relations_term_matches_a_float64_reference():
    """MiniLMv2: q-q, k-k, v-v relations with 4 relation heads, between models of different widths."""
    g = torch.Generator().manual_seed(2)
    student = {1: [torch.randn(2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3)]}
    teacher = {3: [torch.randn(2, 6, 16, generator=g, dtype=torch.float64) for _ in range(3)]}
    key_mask = torch.ones(2, 6)
    key_mask[1, 5] = 0
    weights = key_mask.double()
    term = AttentionTerm("a", 1.0, pairs=[(1, 3)], mode="relations", relation_heads=4, causal=True)
    got = term(Outputs(qkv=student), Outputs(qkv=teacher), weights, key_mask)
    expected = 0.0
    for j in range(3):
        p, q = _relation64(teacher[3][j], 4, key_mask), _relation64(student[1][j], 4, key_mask)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), torch.zeros_like(p)).sum(-1)
        expected += (kl.mean(1) * weights).sum()
    torch.testing.assert_close(got.double(), expected / 3, rtol=1e-5, atol=1e-6)


def test_hidden_term_trains_its_projection_beside_the_student_and_resumes_exactly(tiny, corpus, tmp_path):
    """The projection (student width 32 -> teacher 64) is in the optimizer, changes, is saved in
    objective/ and never in student/, and 3 + 3 resumed steps equal 6 straight ones."""
    from transformers import AutoModelForCausalLM

    common = (HIDDEN_TERMS, "train.max_steps=6", "train.save_every=3", "eval.at_end=false")
    straight, _ = run_job(tiny, corpus, tmp_path / "straight", *common)
    metrics = read_metrics(straight)
    assert all("train/hidden_loss" in m for m in metrics if "train/loss" in m)
    assert metrics[-1]["train/hidden_loss"] < metrics[0]["train/hidden_loss"]

    objective = load_file(straight / "objective" / "model.safetensors")
    assert sorted(objective) == [f"terms.2.projections.{i}.weight" for i in range(2)]  # embeddings and layer 1 -> 2
    assert objective["terms.2.projections.0.weight"].shape == (64, 32)
    terms = json.loads((straight / "objective" / "terms.json").read_text())
    assert terms[2]["pairs"] == [[0, 0], [1, 2]]
    student_keys = load_file(straight / "student" / "model.safetensors")
    assert not any("projection" in k or k.startswith(("objective", "student.")) for k in student_keys)
    assert AutoModelForCausalLM.from_pretrained(straight / "student").config.hidden_size == 32
    checkpoint = load_file(straight / "checkpoints" / "step_00000006" / "model.safetensors")
    initial = load_file(straight / "checkpoints" / "step_00000003" / "model.safetensors")
    key = "objective.terms.2.projections.1.weight"
    assert not torch.equal(checkpoint[key], initial[key])  # trained
    torch.testing.assert_close(checkpoint[key], objective["terms.2.projections.1.weight"])

    # The run as it was after step 3 (a kill there), resumed.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("checkpoints/step_00000006", "student", "objective"):
        shutil.rmtree(resumed / name)
    reset_accelerate()
    run_job(tiny, corpus, resumed, *common, resume=True)
    for name in ("student/model.safetensors", "objective/model.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}: {k}")
    for a, b in zip(metrics, read_metrics(resumed)):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)


@pytest.mark.parametrize("heads, mode", [(4, "maps"), (2, "relations")])
def test_attention_term_trains(tiny, corpus, tmp_path, capsys, heads, mode):
    """Equal head counts (4 and 4): attention maps, through eager attention; 2 student heads
    against 4: MiniLMv2 relations, whatever the attention implementation."""
    arch = f"student.architecture={{num_hidden_layers: 1, hidden_size: 32, intermediate_size: 64, num_attention_heads: {heads}}}"
    run_dir, _ = run_job(tiny, corpus, tmp_path / mode, arch, "loss.terms=[{kind: logits, weight: 0.1}, {kind: attention, name: att, weight: 1.0}]",
                         "train.max_steps=10", "eval.at_end=false")
    err = capsys.readouterr().err
    assert ("attention implementation sdpa -> eager" in err) == (mode == "maps")
    losses = [m["train/att_loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert losses[-1] < 0.9 * losses[0], losses
    assert not (run_dir / "objective").exists()  # no parameters, nothing to save


def test_maps_need_equal_head_counts(tiny, corpus, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("loss.terms[0].mode: maps needs equal head counts (student 2, teacher 4); use mode: relations")):
        run_job(tiny, corpus, tmp_path / "run", "loss.terms=[{kind: attention, mode: maps}]")


def test_a_bad_layer_index_fails_before_training_naming_the_key(tiny, corpus, tmp_path):
    with pytest.raises(ConfigError, match=re.escape("loss.terms[1].layers: teacher layer 9 is out of range; the teacher has layers 0..2")):
        run_job(tiny, corpus, tmp_path / "run", "loss.terms=[{kind: logits}, {kind: hidden, layers: [[1, 9]]}]")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_feature_terms_with_a_4bit_teacher(tiny, corpus, tmp_path):
    """bitsandbytes' Linear4bit teacher gives hidden states and q/k/v like a full-precision one."""
    terms = "loss.terms=[{kind: logits}, {kind: hidden, weight: 1.0}, {kind: attention, name: att, mode: relations, relation_heads: 2}]"
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", terms, "teacher.quantization=4bit", "eval.speed=false", "eval.initial=false")
    metrics = [m for m in read_metrics(run_dir) if "train/loss" in m]
    assert all(m["train/hidden_loss"] > 0 and m["train/att_loss"] > 0 for m in metrics)
    assert result["rows"][0]["quantization"] == "4bit"
    assert (run_dir / "objective" / "model.safetensors").is_file()


def test_feature_terms_are_invariant_to_accumulation(tiny, corpus, tmp_path):
    """Micro-batch 8 x 1 and 1 x 8 accumulation (and loss chunks of 7 tokens): the same term values and the same projections."""
    terms = "loss.terms=[{kind: logits}, {kind: hidden, name: hid}, {kind: attention, name: att, mode: relations, relation_heads: 2}]"
    common = (terms, "data.packing=false", "data.seq_len=48", "train.max_steps=2", "train.max_grad_norm=0", "eval.at_end=false")
    big, _ = run_job(tiny, corpus, tmp_path / "big", *common, "train.micro_batch_size=8", "train.grad_accum=1")
    reset_accelerate()
    small, _ = run_job(tiny, corpus, tmp_path / "small", *common, "train.micro_batch_size=1", "train.grad_accum=8", "loss.chunk_size=7")
    for a, b in zip(read_metrics(big), read_metrics(small)):
        for key in ("train/loss", "train/hid_loss", "train/att_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    a, b = load_file(big / "objective" / "model.safetensors"), load_file(small / "objective" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_projections_join_the_optimizer_and_the_teacher_does_not(tiny, corpus, tmp_path):
    from conftest import job_overrides
    from distill.config import load_config
    from distill.job import Setup, make_accelerator
    from distill.objective import Distillee, build_objective
    from distill.train import build_optimizer

    cfg = load_config(None, job_overrides(tiny, corpus, tmp_path / "run", HIDDEN_TERMS))
    setup = Setup(cfg, make_accelerator(cfg).device)
    objective = build_objective(cfg.loss, student=setup.student, teacher=setup.teacher)
    optimized = {id(p) for group in build_optimizer(Distillee(setup.student, objective, setup.task, setup.vocab), cfg.train).param_groups
                 for p in group["params"]}
    assert len(list(objective.parameters())) == 2 and all(id(p) in optimized for p in objective.parameters())
    assert all(id(p) in optimized for p in setup.student.parameters())
    assert not any(id(p) in optimized for p in setup.teacher.parameters())
