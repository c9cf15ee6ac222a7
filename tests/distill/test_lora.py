"""LoRA students (peft): only adapters train, the adapter loads back, merged equals adapter-applied."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import run_job
from distill.config import ConfigError

LORA = ("student.architecture={}", "student.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj, down_proj]}",
        "eval.speed=false", "train.lr=1e-2")


def test_only_adapters_train_and_the_adapter_loads(tiny, corpus, tmp_path):
    from peft import PeftModel

    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"student.path={tiny['student']}", *LORA)
    assert (run_dir / "student" / "adapter_config.json").is_file()
    assert 0 < result["student_trainable_params"] < 0.2 * result["student_total_params"]
    base = AutoModelForCausalLM.from_pretrained(tiny["student"])
    adapted = PeftModel.from_pretrained(base, run_dir / "student")
    # The base weights did not move; the adapters did.
    original = AutoModelForCausalLM.from_pretrained(tiny["student"]).state_dict()
    merged_names = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in adapted.named_parameters() if "lora_" not in n}
    for name, value in merged_names.items():
        torch.testing.assert_close(value, original[name], msg=name)
    adapter = load_file(run_dir / "student" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    assert "LoRA adapters" in (run_dir / "report.md").read_text()


def test_merged_equals_adapter_applied(tiny, corpus, tmp_path):
    from peft import PeftModel

    run_dir, _ = run_job(tiny, corpus, tmp_path / "run", f"student.path={tiny['student']}", *LORA[:-2], "eval.speed=false",
                         "train.lr=1e-2", "student.lora.merge=true")
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "student").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["student"]), run_dir / "adapter").eval()
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-5)


def test_qlora_on_a_4bit_base(tiny, corpus, tmp_path):
    from conftest import save_llama

    base = tmp_path / "base"  # 64-wide layers: bitsandbytes' CPU 4-bit kernel works in 64-blocks
    save_llama(base, tiny["tokenizer"], layers=1, hidden=64, heads=2)
    run_dir, result = run_job(tiny, corpus, tmp_path / "run", f"student.path={base}", *LORA, "student.quantization=4bit")
    student = next(r for r in result["rows"] if r["model"] == "student")
    assert student["kl_to_teacher"] < next(r for r in result["rows"] if r["model"] == "initial_student")["kl_to_teacher"]
    config = json.loads((run_dir / "student" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)


def test_missing_target_modules_fail_before_work(tiny, corpus, tmp_path):
    with pytest.raises(ConfigError, match="student.lora.target_modules: no Linear module named wq"):
        run_job(tiny, corpus, tmp_path / "run", f"student.path={tiny['student']}", "student.architecture={}",
                "student.lora={target_modules: [wq]}")
    with pytest.raises(ConfigError, match="student.lora needs a pretrained base"):
        run_job(tiny, corpus, tmp_path / "run", "student.lora={r: 4}")


def test_distill_eval_of_a_lora_run(tiny, corpus, tmp_path):
    from conftest import distill_cli

    run_dir, _ = run_job(tiny, corpus, tmp_path / "run", f"student.path={tiny['student']}", *LORA)
    before = {r["model"]: r for r in json.loads((run_dir / "eval.json").read_text())["rows"]}
    result = distill_cli("eval", str(run_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    after = {r["model"]: r for r in json.loads((run_dir / "eval.json").read_text())["rows"]}
    assert after["student"]["perplexity"] == pytest.approx(before["student"]["perplexity"], rel=1e-4)
