"""4-bit and 8-bit teachers through bitsandbytes: really quantized, frozen, and measured."""

import math

import pytest

from conftest import job_overrides, run_job, reset_accelerate
from distill.config import load_config
from distill.job import Setup, make_accelerator


@pytest.mark.parametrize("bits, module", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_teacher_runs_and_reports_fidelity(tiny, corpus, tmp_path, bits, module):
    overrides = job_overrides(tiny, corpus, tmp_path / "run", f"teacher.quantization={bits}", "eval.speed=false")
    cfg = load_config(None, overrides)
    setup = Setup(cfg, make_accelerator(cfg).device)
    linear_types = {type(m).__name__ for m in setup.teacher.modules() if "Linear" in type(m).__name__}
    assert module in linear_types
    assert not any(p.requires_grad for p in setup.teacher.parameters())
    del setup
    reset_accelerate()

    _, result = run_job(tiny, corpus, tmp_path / "run", f"teacher.quantization={bits}", "eval.speed=false")
    teacher = next(r for r in result["rows"] if r["model"] == "teacher")
    assert teacher["quantization"] == bits
    assert math.isfinite(result["teacher_fidelity_kl"]) and result["teacher_fidelity_kl"] > 0
    assert teacher["memory_bytes"] < result["teacher_full_memory_bytes"]
    assert "teacher fidelity" in (tmp_path / "run" / "report.md").read_text()


def test_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    import builtins

    from distill.config import ConfigError, TeacherConfig
    from distill.models import quantization_config

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        quantization_config(TeacherConfig(path="x", quantization="4bit"))
