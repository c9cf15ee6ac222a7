"""Post-training quantization: each method round-trips through save/load and stays close to the float model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import distill_cli, run_job
from distill.config import ConfigError
from distill.quantize import METHODS, quantization_config, quantize_model, quantized_linear_bytes


@pytest.fixture(scope="module")
def float_model(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_and_closeness(tiny, float_model, tmp_path, method):
    out = tmp_path / method
    quantized = quantize_model(tiny["teacher"], out, method)
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, len(tiny["tokenizer"]), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = float_model(ids).logits
        first, second = quantized(ids).logits, again(ids).logits
    torch.testing.assert_close(second, first, rtol=1e-3, atol=1e-3)  # the saved model is the quantized one
    p, q = reference.log_softmax(-1), first.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl < 0.05, kl


def test_4bit_weights_take_at_most_35_percent_of_fp16(tiny, tmp_path):
    from conftest import save_llama

    # Layers of a realistic aspect: each 4-bit layer also stores a constant 1 KB code table,
    # which is noise at LLM sizes but 12% of a 64x64 layer.
    save_llama(tmp_path / "m", tiny["tokenizer"], layers=1, hidden=256, heads=4)
    quantized = quantize_model(tmp_path / "m", tmp_path / "q4", "bnb_4bit")
    stored, fp16 = quantized_linear_bytes(quantized)
    assert fp16 > 0 and stored / fp16 <= 0.35, stored / fp16


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="use one of bnb_8bit"):
        quantization_config("gptq")


def test_quantize_command_adds_rows_to_the_report(tiny, corpus, tmp_path):
    # bitsandbytes' CPU 4-bit kernel needs at least one 64-wide block per row: hidden_size 64.
    run_dir, _ = run_job(tiny, corpus, tmp_path / "run", "train.max_steps=2",
                         "student.architecture={num_hidden_layers: 1, hidden_size: 64, intermediate_size: 128, num_attention_heads: 2}")
    result = distill_cli("quantize", str(run_dir), "--method", "int8_dynamic", "bnb_4bit")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((run_dir / "eval.json").read_text())["rows"]}
    assert {"teacher", "initial_student", "student", "student+int8_dynamic", "student+bnb_4bit"} <= rows.keys()
    assert rows["student+bnb_4bit"]["disk_bytes"] < rows["student"]["disk_bytes"]
    assert "student+int8_dynamic" in (run_dir / "report.md").read_text()
    bad = distill_cli("quantize", str(run_dir), "--method", "gptq")
    assert bad.returncode == 2 and "--method 'gptq'" in bad.stderr
    # distill eval measures everything again, keeping the quantized rows and the parameter counts.
    before = json.loads((run_dir / "eval.json").read_text())
    again = distill_cli("eval", str(run_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads((run_dir / "eval.json").read_text())
    assert [r["model"] for r in after["rows"]] == [r["model"] for r in before["rows"]]
    assert after["student_trainable_params"] == before["student_trainable_params"] > 0
    assert "student+bnb_4bit" in (run_dir / "report.md").read_text()


def test_bnb_4bit_on_cpu_checks_layer_widths_first(tiny, corpus, tmp_path):
    run_dir, _ = run_job(tiny, corpus, tmp_path / "run", "train.max_steps=2", "eval.speed=false")  # hidden_size 32
    result = distill_cli("quantize", str(run_dir), "--method", "bnb_4bit")
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("distill: error: --method bnb_4bit: bitsandbytes' 4-bit CPU kernels need") and "multiple of 64" in line
    assert "has 32" in line and "bnb_8bit" in line
    assert not (run_dir / "quantized").exists()


def test_prune_distill_quantize_chain(tiny, corpus, tmp_path):
    run_dir, result = run_job(tiny, corpus, tmp_path / "chain", "student.architecture={}",
                              "student.prune={num_hidden_layers: 1, intermediate_size: 64}", "eval.quantize=[int8_dynamic]")
    names = [r["model"] for r in result["rows"]]
    assert names == ["teacher", "initial_student", "student", "student+int8_dynamic"]
    rows = dict(zip(names, result["rows"]))
    assert rows["student+int8_dynamic"]["disk_bytes"] < rows["student"]["disk_bytes"] < rows["teacher"]["disk_bytes"]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "quantized" / "int8_dynamic").config.num_hidden_layers == 1
