"""Structured pruning: shapes and config agree, layer removal is exact, planted dead units go first."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import save_llama
from distill.config import ConfigError
from distill.prune import PruneTarget, calibration_batches, importance, magnitude_prune, prune


@pytest.fixture(scope="module")
def model_and_batches(tiny, corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("prune") / "m"
    save_llama(path, tiny["tokenizer"], layers=4, hidden=64, heads=4, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    batches = calibration_batches([corpus["train"]], tiny["tokenizer"], seq_len=32, batches=2, batch_size=2)
    return path, model, batches


def test_pruned_shapes_and_config_agree_and_round_trip(model_and_batches, tmp_path):
    _, model, batches = model_and_batches
    target = PruneTarget(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, hidden_size=48)
    pruned = prune(model, importance(model, batches), target)
    pruned.save_pretrained(tmp_path / "p")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    c = again.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.hidden_size) == (2, 2, 64, 48)
    assert again.num_parameters() < 0.5 * model.num_parameters()
    layer = again.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2 * c.head_dim, 48) and layer.mlp.down_proj.weight.shape == (48, 64)
    with torch.inference_mode():
        assert torch.isfinite(again(batches[0]["input_ids"]).logits).all()
    assert model.config.num_hidden_layers == 4  # the original is untouched


def test_layer_pruned_model_equals_teacher_with_layers_skipped(model_and_batches):
    _, model, batches = model_and_batches
    scores = importance(model, batches)
    pruned = prune(model, scores, PruneTarget(num_hidden_layers=2))
    kept = scores["layers"].topk(2).indices.sort().values.tolist()
    skipped = copy.deepcopy(model)
    skipped.model.layers = nn.ModuleList(skipped.model.layers[i] for i in kept)
    for i, layer in enumerate(skipped.model.layers):
        layer.self_attn.layer_idx = i
    skipped.config.num_hidden_layers = 2
    ids = batches[0]["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(pruned(ids).logits, skipped.eval()(ids).logits)


def test_planted_dead_heads_and_neurons_are_removed_exactly(model_and_batches):
    _, model, batches = model_and_batches
    planted = copy.deepcopy(model)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    dead_heads, dead_neurons = {0: [1, 3]}, {1: [5, 17, 40]}
    with torch.no_grad():
        for layer, heads in dead_heads.items():
            for h in heads:  # no value, no output: the head is dead
                planted.model.layers[layer].self_attn.v_proj.weight[h * head_dim:(h + 1) * head_dim] = 0
        for layer, neurons in dead_neurons.items():
            planted.model.layers[layer].mlp.up_proj.weight[neurons] = 0
    scores = importance(planted, batches)
    assert set(scores["heads"][0].topk(2, largest=False).indices.tolist()) == {1, 3}
    assert set(scores["neurons"][1].topk(3, largest=False).indices.tolist()) == {5, 17, 40}
    pruned = prune(planted, scores, PruneTarget(num_attention_heads=2, intermediate_size=128 - 3))
    # Layer 0 kept heads 0 and 2: its q_proj rows are exactly those heads'.
    q = planted.model.layers[0].self_attn.q_proj.weight
    expected = torch.cat([q[0:head_dim], q[2 * head_dim:3 * head_dim]])
    torch.testing.assert_close(pruned.model.layers[0].self_attn.q_proj.weight, expected)
    kept_neurons = [i for i in range(128) if i not in dead_neurons[1]]
    torch.testing.assert_close(pruned.model.layers[1].mlp.up_proj.weight, planted.model.layers[1].mlp.up_proj.weight[kept_neurons])


@pytest.mark.parametrize("target, message", [
    (PruneTarget(num_hidden_layers=0), "at least 1"),
    (PruneTarget(num_attention_heads=8), "has only 4"),
    (PruneTarget(intermediate_size=10_000), "has only"),
])
def test_impossible_targets_fail_before_work(model_and_batches, target, message):
    _, model, _ = model_and_batches
    with pytest.raises(ConfigError, match=message):
        prune(model, {}, target)


def test_magnitude_pruning_reaches_the_sparsity(model_and_batches):
    _, model, _ = model_and_batches
    sparse = copy.deepcopy(model)
    result = magnitude_prune(sparse, 0.5)
    assert result["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sparse.num_parameters() == model.num_parameters()  # zeros, not a smaller model
    per_layer = magnitude_prune(sparse, 0.7, scope="per_layer")
    assert per_layer["sparsity"] == pytest.approx(0.7, abs=0.01)


def test_prune_command(model_and_batches, corpus, tmp_path):
    from conftest import distill_cli

    path, _, _ = model_and_batches
    result = distill_cli("prune", str(path), str(tmp_path / "out"), "--calibration", corpus["train"], "--layers", "2", "--heads", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters" in result.stdout
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert pruned.config.num_hidden_layers == 2 and pruned.config.num_attention_heads == 2
    bad = distill_cli("prune", str(path), str(tmp_path / "bad"), "--calibration", corpus["train"], "--layers", "0")
    assert bad.returncode == 2 and "at least 1" in bad.stderr and not (tmp_path / "bad").exists()


def test_job_prunes_the_teacher_then_distills(tiny, corpus, tmp_path):
    from conftest import run_job

    _, result = run_job(tiny, corpus, tmp_path / "run", "student.architecture={}", "student.prune={num_hidden_layers: 1, intermediate_size: 64}",
                        "eval.speed=false", "train.max_steps=4")
    rows = {r["model"]: r for r in result["rows"]}
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 64
    assert rows["student"]["params"] < rows["teacher"]["params"]
    # Pruned from the teacher, the student starts close to it: far closer than a random init does.
    assert rows["initial_student"]["top1_agreement"] > 0.05


def test_magnitude_pruning_command_reports_honestly(model_and_batches, tmp_path):
    from conftest import distill_cli

    path, model, _ = model_and_batches
    result = distill_cli("prune", str(path), str(tmp_path / "sparse"), "--sparsity", "0.6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not dense size or latency" in result.stdout
    sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    weights = torch.cat([m.weight.flatten() for layer in sparse.model.layers for m in layer.modules() if isinstance(m, nn.Linear)])
    assert (weights == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    assert sparse.num_parameters() == model.num_parameters()
