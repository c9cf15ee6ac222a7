"""The fused logit terms (distill.fused): equal to full logits for every divergence, with and
without temperature, masked targets and padded vocabularies; never a [tokens, vocab] tensor; the
same training through real models (causal and masked LMs, LoRA students, a 4-bit teacher)."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import read_metrics, reset_accelerate, run_job
from distill.config import LossConfig
from distill.errors import ConfigError
from distill.losses import DIVERGENCES, IGNORE_INDEX
from distill.objective import Outputs, build_objective, fused_path
from distill.tasks import build_task
from test_lora import LORA
from test_masked_lm import mlm_job


def _problem(seed=0, tokens=(3, 11), student_width=8, teacher_width=12, vocab=50, student_rows=53, teacher_rows=56, bias=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*tokens, student_width, generator=g, requires_grad=True)
    ht = torch.randn(*tokens, teacher_width, generator=g)
    s_head = nn.Linear(student_width, student_rows, bias=bias)  # rows beyond `vocab`: a padded embedding
    t_head = nn.Linear(teacher_width, teacher_rows, bias=False)
    with torch.no_grad():
        for p in (*s_head.parameters(), *t_head.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    labels = torch.randint(0, vocab, tokens, generator=g)
    labels[0, 5:] = IGNORE_INDEX
    labels[2, :2] = IGNORE_INDEX
    return hs, ht, s_head, t_head, labels, vocab


def _both(cfg, hs, ht, s_head, t_head, labels, vocab):
    """(sums, grads of hidden/weight/bias) through full logits and through the fused path."""
    results = []
    for fused in (False, True):
        objective = build_objective(cfg)
        for p in s_head.parameters():
            p.grad = None
        hs.grad = None
        if fused:
            sums = objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=t_head), labels, vocab=vocab)
        else:
            sums = objective.sums(Outputs(logits=s_head(hs)[..., :vocab]), Outputs(logits=t_head(ht)[..., :vocab]), labels)
        (objective.total(sums) * 0.37).backward()
        results.append((sums.detach(), hs.grad.clone(), *(p.grad.clone() for p in s_head.parameters())))
    return results


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_every_divergence_equals_full_logits(divergence, temperature):
    hs, ht, s_head, t_head, labels, vocab = _problem()
    cfg = LossConfig(terms=[{"kind": "logits", "divergence": divergence, "weight": 0.7, "temperature": temperature},
                            {"kind": "ce", "weight": 0.3}], chunk_size=4)
    plain, fused = _both(cfg, hs, ht, s_head, t_head, labels, vocab)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert fused[2][vocab:].abs().sum() == 0  # padded rows get no gradient, as with a sliced weight


def test_a_zero_weight_term_is_reported_and_not_trained_on():
    hs, ht, s_head, t_head, labels, vocab = _problem(seed=1, bias=False)
    cfg = LossConfig(terms=[{"kind": "logits", "weight": 1.0}, {"kind": "ce", "weight": 0.0}], chunk_size=7)
    plain, fused = _both(cfg, hs, ht, s_head, t_head, labels, vocab)
    assert fused[0][1] > 0
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_all_targets_masked_gives_zero_sums_in_the_graph():
    hs, ht, s_head, t_head, labels, vocab = _problem(seed=2)
    labels[:] = IGNORE_INDEX
    objective = build_objective(LossConfig())
    sums = objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=t_head), labels, vocab=vocab)
    objective.total(sums).backward()
    assert sums.abs().sum() == 0 and s_head.weight.grad is not None and s_head.weight.grad.abs().sum() == 0


def test_backpropagating_anything_but_the_total_is_refused():
    hs, ht, s_head, t_head, labels, vocab = _problem(seed=3)
    objective = build_objective(LossConfig(alpha=0.5))
    sums = objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=t_head), labels, vocab=vocab)
    with pytest.raises(RuntimeError, match="backpropagate Objective.total"):
        sums[0].backward()


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_tokens_by_vocabulary_exists_forward_or_backward():
    hs, ht, s_head, t_head, labels, vocab = _problem(seed=4, tokens=(4, 64), vocab=500, student_rows=500, teacher_rows=512)
    objective = build_objective(LossConfig(alpha=0.2, temperature=2.0, chunk_size=16))
    targets = int((labels != IGNORE_INDEX).sum())
    with _LargestOutput() as fused:
        sums = objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=t_head), labels, vocab=vocab)
        objective.total(sums).backward()
    with _LargestOutput() as plain:
        sums = objective.sums(Outputs(logits=s_head(hs)), Outputs(logits=t_head(ht)[..., :vocab]), labels)
        objective.total(sums).backward()
    assert plain.largest >= targets * vocab  # the measure sees full logits where they exist
    assert fused.largest <= max(16 * 512, s_head.weight.numel(), t_head.weight.numel())


def test_fused_is_chosen_for_language_models_with_a_plain_output_layer(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    assert fused_path("auto", build_task("causal_lm"), model)[0]
    assert not fused_path("never", build_task("causal_lm"), model)[0]
    fused, line = fused_path("auto", build_task("sequence_classification"), model)
    assert not fused and "no vocabulary-sized output layer" in line
    with pytest.raises(ConfigError, match="loss.fused=always: the task sequence_classification"):
        fused_path("always", build_task("sequence_classification"), model)


def test_a_quantized_teacher_output_layer_is_called_as_a_module():
    import bitsandbytes as bnb

    hs, ht, s_head, t_head, labels, vocab = _problem(seed=5, bias=False)
    quantized = bnb.nn.Linear4bit(t_head.in_features, t_head.out_features, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    quantized.load_state_dict(t_head.state_dict())
    quantized = quantized.to("cpu")  # quantizes the weight
    assert quantized.weight.dtype == torch.uint8
    objective = build_objective(LossConfig(alpha=0.1, chunk_size=5))
    fused = objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=quantized), labels, vocab=vocab)
    with torch.no_grad():
        plain = objective.sums(Outputs(logits=s_head(hs)[..., :vocab]), Outputs(logits=quantized(ht)[..., :vocab]), labels)
    torch.testing.assert_close(fused.detach(), plain, rtol=1e-5, atol=1e-5)


def _losses(run_dir):
    return [(m["train/loss"], m["train/grad_norm"]) for m in read_metrics(run_dir) if "train/loss" in m]


@pytest.mark.parametrize("case", ["causal", "lora", "4bit_teacher", "masked"])
def test_training_fused_follows_full_logits(case, tiny, bert, corpus, tmp_path, capfd):
    from distill.job import run

    extra = {"causal": ["loss.alpha=0.3", "loss.temperature=2.0"],
             "lora": [f"student.path={tiny['student']}", *LORA, "loss.alpha=0.2"],
             "4bit_teacher": ["teacher.quantization=4bit", "loss.kind=jsd"],
             "masked": []}[case]
    curves = {}
    for fused in ("always", "never"):
        reset_accelerate()
        out = tmp_path / fused
        overrides = [*extra, f"loss.fused={fused}", "eval.at_end=false", "train.max_steps=4", "train.log_every=1"]
        if case == "masked":
            run(mlm_job(bert, corpus, out, *overrides))
        else:
            run_job(tiny, corpus, out, *overrides)
        curves[fused] = _losses(out)
    assert "loss: fused output layer (plain PyTorch" in capfd.readouterr().err
    assert len(curves["always"]) == 4
    for (loss_on, norm_on), (loss_off, norm_off) in zip(curves["always"], curves["never"]):
        assert loss_on == pytest.approx(loss_off, rel=1e-4)
        assert norm_on == pytest.approx(norm_off, rel=1e-3)


def test_zero_weight_terms_are_computed_only_when_reported():
    hs, ht, s_head, t_head, labels, vocab = _problem(seed=6)
    objective = build_objective(LossConfig(alpha=0.0, chunk_size=8))  # kd at weight 1, ce at weight 0
    full = objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=t_head), labels, vocab=vocab)
    quiet = objective.sums(Outputs(features=hs, head=s_head), Outputs(features=ht, head=t_head), labels, vocab=vocab, report=False)
    assert full[1] > 0 and quiet[1] == 0
    torch.testing.assert_close(quiet[0], full[0])
