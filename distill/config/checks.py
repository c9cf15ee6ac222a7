"""The checks a config's values get once its keys and types are known: one short function per
section, then the rules that tie sections together, each named. Every message names the option to change.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from distill.augment.registry import AUGMENTS, parse_augment
from distill.config.schema import TRACKER_NAMES, DataConfig, DistillConfig, LossConfig, data_sources
from distill.errors import ConfigError
from distill.errors import check as _check  # every value check below: one line, naming the option
from distill.terms.registry import kind_of, parse_terms
from distill.terms.user import UserTerm


def validate(cfg: DistillConfig) -> None:
    """Checks values that types alone do not; messages name the option to change."""
    for check in (check_teacher, check_student, check_data, check_loss, check_train, check_rollout, check_eval, check_tracking):
        check(cfg)
    for rule in CROSS_SECTION_RULES:
        rule(cfg)


def check_teacher(cfg: DistillConfig) -> None:
    t = cfg.teacher
    _check(bool(t.path), "teacher.path is required (a local model directory or a hub id)")
    if t.source == "remote":
        _check(bool(t.url.strip()), "teacher.source=remote needs teacher.url (the URL distill serve-teacher prints)")
        for url in t.url.split(","):
            _check(url.strip().startswith(("http://", "https://")), f"teacher.url: {url.strip()!r} is not an http:// or https:// URL")
        _check(t.remote_timeout > 0, f"teacher.remote_timeout must be > 0 (got {t.remote_timeout})")
        _check(t.prefetch >= 0, f"teacher.prefetch must be >= 0 (got {t.prefetch})")


def check_student(cfg: DistillConfig) -> None:
    s = cfg.student
    if s.init == "teacher_layers":
        _check(bool(s.architecture) or bool(s.init_layers), "student.init=teacher_layers needs student.init_layers or student.architecture.num_hidden_layers")
        _check(set(s.architecture) <= {"num_hidden_layers"}, "student.init=teacher_layers keeps the teacher's widths; student.architecture may set "
               f"only num_hidden_layers (got {', '.join(sorted(s.architecture))})")
        _check(all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in s.init_layers),
               f"student.init_layers must list teacher layers as integers >= 1 (got {s.init_layers!r})")
        if s.init_layers and "num_hidden_layers" in s.architecture:
            _check(len(s.init_layers) == s.architecture["num_hidden_layers"], "student.init_layers and student.architecture.num_hidden_layers disagree; set one")
    else:
        _check(not s.init_layers, "student.init_layers needs student.init=teacher_layers")
        _check(not s.init_from, "student.init_from needs student.init=teacher_layers")
    _check(sum(map(bool, (s.path, s.architecture or s.init_layers, s.prune))) == 1, "set exactly one of student.path, student.architecture and student.prune")
    prunable = {"num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_size"}
    for key, value in s.prune.items():
        _check(key in prunable, f"student.prune.{key}: not prunable; use {', '.join(sorted(prunable))}")
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"student.prune.{key} must be an integer >= 1 (got {value!r})")
    _check(s.prune_calibration_batches > 0, "student.prune_calibration_batches must be > 0")
    if s.lora is not None:
        _check(bool(s.path), "student.lora needs a pretrained base: set student.path")
        _check(s.lora.r > 0 and s.lora.alpha > 0, "student.lora.r and student.lora.alpha must be > 0")
        _check(0.0 <= s.lora.dropout < 1.0, f"student.lora.dropout must be in [0, 1) (got {s.lora.dropout})")
        _check(bool(s.lora.target_modules), "student.lora.target_modules must name at least one module")
    _check(s.quantization == "none" or s.lora is not None, "student.quantization needs student.lora: a quantized base can only train adapters")
    for key, value in s.architecture.items():
        _check(isinstance(key, str), f"student.architecture: keys must be config field names, got {key!r}")
        if isinstance(value, int) and not isinstance(value, bool) and key.startswith("num_"):
            _check(value > 0, f"student.architecture.{key} must be > 0 (got {value})")


def check_data(cfg: DistillConfig) -> None:
    d = cfg.data
    if d.mixture:
        _check(not d.train_files and not d.dataset, "set data.mixture or data.train_files/data.dataset, not both (each source names its own files)")
        check_mixture(d)
    else:
        _check(bool(d.train_files) != bool(d.dataset), "set exactly one of data.train_files and data.dataset")
    _check(all(isinstance(f, str) for f in d.train_files + d.validation_files), "data.train_files and data.validation_files must list file paths")
    _check(d.seq_len >= 2, f"data.seq_len must be >= 2 (got {d.seq_len})")
    _check(0.0 <= d.validation_split < 1.0, f"data.validation_split must be in [0, 1) (got {d.validation_split})")
    _check(d.max_validation_sequences > 0, "data.max_validation_sequences must be > 0")
    _check(not (d.messages_field and d.prompt_field), "set data.messages_field or data.prompt_field, not both: a conversation's prompt is its non-assistant turns")
    for i, source in enumerate(data_sources(d)):
        if source.data.augment is not None:
            key = "data.augment" if source.data.augment is d.augment else f"data.mixture[{i}].augment"
            spec = parse_augment(source.data.augment, key)
            AUGMENTS[spec.kind].check_task(spec, key, cfg.task.kind)
            _check(not source.data.messages_field, f"{key}: augmentation rewrites text; a conversation ({key.rsplit('.', 1)[0]}.messages_field) is not augmented")


def check_loss(cfg: DistillConfig) -> None:
    lo = cfg.loss
    _check(lo.temperature > 0 and math.isfinite(lo.temperature), f"loss.temperature must be > 0 (got {lo.temperature})")
    _check(0.0 <= lo.alpha <= 1.0, f"loss.alpha must be in [0, 1] (got {lo.alpha})")
    _check(0.0 <= lo.jsd_beta <= 1.0, f"loss.jsd_beta must be in [0, 1] (got {lo.jsd_beta})")
    _check(0.0 <= lo.skew_alpha < 1.0, f"loss.skew_alpha must be in [0, 1) (got {lo.skew_alpha})")
    _check(lo.chunk_size >= 0, f"loss.chunk_size must be >= 0 (got {lo.chunk_size}; 0 sizes chunks by the vocabulary)")
    check_terms(lo)


def check_train(cfg: DistillConfig) -> None:
    tr = cfg.train
    _check(tr.lr > 0 and math.isfinite(tr.lr), f"train.lr must be > 0 (got {tr.lr})")
    _check(tr.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {tr.weight_decay})")
    _check(len(tr.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in tr.betas), f"train.betas must be two numbers in [0, 1) (got {tr.betas})")
    _check(tr.micro_batch_size > 0, f"train.micro_batch_size must be > 0 (got {tr.micro_batch_size})")
    _check(tr.grad_accum > 0, f"train.grad_accum must be > 0 (got {tr.grad_accum})")
    _check(tr.max_steps > 0, f"train.max_steps must be > 0 (got {tr.max_steps})")
    _check(tr.warmup_steps >= 0, f"train.warmup_steps must be >= 0 (got {tr.warmup_steps})")
    _check(tr.epochs is None or (tr.epochs > 0 and math.isfinite(tr.epochs)), f"train.epochs must be > 0 (got {tr.epochs})")
    _check(tr.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (got {tr.max_grad_norm})")
    for name in ("log_every", "eval_every", "save_every"):
        _check(getattr(tr, name) >= 0, f"train.{name} must be >= 0")
    _check(tr.log_every > 0, "train.log_every must be > 0")
    _check(tr.stop_grace_seconds >= 0, f"train.stop_grace_seconds must be >= 0 (got {tr.stop_grace_seconds})")
    _check(tr.keep_checkpoints > 0, f"train.keep_checkpoints must be > 0 (got {tr.keep_checkpoints})")


def check_rollout(cfg: DistillConfig) -> None:
    r = cfg.rollout
    _check(0.0 <= r.on_policy <= 1.0, f"rollout.on_policy must be in [0, 1] (got {r.on_policy})")
    _check(isinstance(r.max_new_tokens, int) and r.max_new_tokens >= 1, f"rollout.max_new_tokens must be an integer >= 1 (got {r.max_new_tokens!r})")
    _check(r.temperature >= 0 and math.isfinite(r.temperature), f"rollout.temperature must be >= 0 (got {r.temperature}; 0 is greedy)")
    _check(0.0 < r.top_p <= 1.0, f"rollout.top_p must be in (0, 1] (got {r.top_p})")
    _check(r.prompt_tokens >= 1, f"rollout.prompt_tokens must be >= 1 (got {r.prompt_tokens})")
    _check(r.samples >= 0, f"rollout.samples must be >= 0 (got {r.samples})")
    _check(0.0 < r.vllm_gpu_memory_utilization < 1.0, f"rollout.vllm_gpu_memory_utilization must be in (0, 1) (got {r.vllm_gpu_memory_utilization})")


QUANTIZE_METHODS = ("bnb_8bit", "bnb_4bit", "int8_weight_only", "int8_dynamic")


def check_eval(cfg: DistillConfig) -> None:
    ev = cfg.eval
    _check(ev.latency_new_tokens > 0 and ev.throughput_batch_size > 0 and ev.speed_repeats > 0, "eval.latency_new_tokens, eval.throughput_batch_size and eval.speed_repeats must be > 0")
    _check(ev.speculative_prompts > 0 and ev.speculative_new_tokens > 0, "eval.speculative_prompts and eval.speculative_new_tokens must be > 0")
    if ev.lm_eval is not None:
        _check(bool(ev.lm_eval.tasks), "eval.lm_eval.tasks must name at least one task")
        _check(all(isinstance(t, str) for t in ev.lm_eval.tasks), "eval.lm_eval.tasks must be task names")
        _check(ev.lm_eval.batch_size > 0, "eval.lm_eval.batch_size must be > 0")
        _check(ev.lm_eval.limit is None or ev.lm_eval.limit > 0, "eval.lm_eval.limit must be > 0")
        _check(ev.lm_eval.num_fewshot is None or ev.lm_eval.num_fewshot >= 0, "eval.lm_eval.num_fewshot must be >= 0")
    _check(bool(cfg.output_dir), "output_dir must not be empty")
    for method in ev.quantize:
        _check(method in QUANTIZE_METHODS, f"eval.quantize: unknown method {method!r}; use {', '.join(QUANTIZE_METHODS)}")


# ----- rules between sections


def rule_teacher_source_fits_task_and_terms(cfg: DistillConfig) -> None:
    """A store holds targets of any task (and hidden states when built with them), a pool token targets of language models."""
    t = cfg.teacher
    if t.source not in ("cache", "remote"):
        return
    _check(t.source == "cache" or cfg.task.kind in ("causal_lm", "masked_lm"),
           f"teacher.source={t.source} serves token targets of language models; task.kind={cfg.task.kind} needs teacher.source=model or cache")
    for i, spec in enumerate(parse_terms(cfg.loss)):
        kind, weighted = kind_of(spec.kind), spec.weight > 0
        _check(kind is not UserTerm or not weighted,
               f"loss.terms[{i}]: a term of your own ({spec.kind}) is given the teacher model's logits; use teacher.source=model")
        holder = "a store does not hold (only hidden states: distill cache-teacher" if t.source == "cache" else \
            "the teacher pool does not give (only hidden states: distill serve-teacher"
        _check(not kind.features or kind.stored or not weighted,
               f"loss.terms[{i}]: {spec.kind} terms need the teacher's attention, which {holder} --hidden-layers); use teacher.source=model")


def rule_task_fits_student_data_and_eval(cfg: DistillConfig) -> None:
    """What only some task kinds support: pruning, generative benchmarks, masking, chat data, prompts."""
    task, d = cfg.task, cfg.data
    _check(0.0 < task.mask_rate < 1.0, f"task.mask_rate must be in (0, 1) (got {task.mask_rate})")
    if task.kind != "causal_lm":
        _check(not cfg.student.prune, f"student.prune supports task.kind=causal_lm only; build the {task.kind} student with student.architecture or student.path")
        _check(cfg.eval.lm_eval is None and not cfg.eval.speculative, f"eval.lm_eval and eval.speculative measure generative language models; unset them for task.kind={task.kind}")
    _check(not d.messages_field or task.kind == "causal_lm", "data.messages_field is for task.kind=causal_lm")
    if task.kind == "sequence_classification":
        _check(d.prompt_field is None, "data.prompt_field is for causal_lm; a classifier's second text goes in data.text_pair_field")


def rule_rollouts_fit_task_and_data(cfg: DistillConfig) -> None:
    """The student writes completions of a language model's prompts, one document a sequence."""
    if cfg.rollout.on_policy == 0:
        return
    _check(cfg.task.kind == "causal_lm", f"rollout.on_policy: the student writes completions as a causal LM; task.kind={cfg.task.kind} has none (set rollout.on_policy=0)")
    _check(not cfg.data.packing, "rollout.on_policy needs data.packing=false: a prompt is the start of one document, not of a block of several")


CROSS_SECTION_RULES = (rule_teacher_source_fits_task_and_terms, rule_task_fits_student_data_and_eval, rule_rollouts_fit_task_and_data)


TINY_DIR = "~/.cache/distill/tiny"


def tiny_hint(path: str) -> str:
    """A hint for a missing file of the bundled tiny default, which `distill prepare-tiny` builds."""
    tiny = Path(os.path.expanduser(TINY_DIR))
    local = Path(os.path.expanduser(path))
    return "; build the bundled tiny default first with: distill prepare-tiny" if local == tiny or tiny in local.parents else ""


def check_mixture(cfg: DataConfig) -> None:
    """Fails at load time, naming ``data.mixture[i].key``, on a source that cannot be read."""
    data_sources(cfg)


def check_terms(cfg: LossConfig) -> None:
    """Fails at load time, naming ``loss.terms[i].key``, on anything a term cannot be built from (each kind parses and checks its own spec)."""
    if cfg.terms and (cfg.kind != "forward_kl" or cfg.alpha != 0.0):
        raise ConfigError("set either loss.terms or the shorthand loss.kind / loss.alpha, not both "
                          "(the shorthand is [{kind: logits, divergence: KIND, weight: 1-alpha}, {kind: ce, weight: alpha}])")
    parse_terms(cfg)


def check_tracking(cfg: DistillConfig) -> None:
    names = [name.strip() for item in cfg.tracking.backend for name in str(item).split(",") if name.strip()]
    for name in names:
        _check(name in (*TRACKER_NAMES, "none"), f"tracking.backend: unknown tracker {name!r}; use {', '.join(TRACKER_NAMES)} or none")
    _check("none" not in names or len(set(names)) == 1, f"tracking.backend: none cannot be combined with a tracker (got {', '.join(names)})")
