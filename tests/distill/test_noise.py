"""Third-party noise is kept off the console; real warnings, and the first of a repeated one, are not."""

import logging


def test_known_noise_is_dropped_and_real_warnings_pass(caplog):
    from distill import noise

    noise.install()
    for _, rule in noise._installed:  # an earlier test in this process may have met the warning shown once
        rule.seen = 0
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /site-packages/torchao/_C_mxfp8.so: cannot open")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install kernels`", "x")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logging.getLogger("torchao").warning("a real torchao warning")
        for _ in range(3):
            logging.getLogger("bitsandbytes.autograd._functions").warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
    shown = [r.getMessage() for r in caplog.records]
    assert shown == ["a real torchao warning", "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization"]


def test_a_real_job_prints_no_import_noise_and_a_plain_line_per_log_and_evaluation(tiny, corpus, tmp_path):
    """Its console output goes to a pipe (as into SLURM's log file): no progress bar, one plain line every
    train.log_every steps and one per evaluation."""
    from conftest import distill_cli, job_overrides

    config = tmp_path / "job.yaml"
    config.write_text("{}\n")
    args = [a for o in job_overrides(tiny, corpus, tmp_path / "run", "teacher.quantization=8bit", "eval.speed=false", "train.log_every=2",
                                     "train.eval_every=3") for a in ("--set", o)]
    proc = distill_cli("run", str(config), *args)
    assert proc.returncode == 0, proc.stderr
    for line in ("Setting accelerator to CPU", "pip install kernels", "_C_mxfp8", "is an Enum subclass"):
        assert line not in proc.stdout + proc.stderr, line
    assert proc.stderr.count("MatMul8bitLt: inputs will be cast") <= 1
    assert proc.stdout.lstrip().startswith("| model")  # the report table first on stdout
    steps = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all(" kd " in line and " ce " in line and " lr " in line and " tok/s " in line for line in steps), steps
    evaluations = [line for line in proc.stderr.splitlines() if line.startswith("eval at step")]
    assert len(evaluations) == 1 and evaluations[0].startswith("eval at step 3/6: ") and " perplexity " in evaluations[0]
    assert " top1_agreement " in evaluations[0]
    assert "\r" not in proc.stderr and "it/s]" not in proc.stderr
