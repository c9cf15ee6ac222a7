"""Loading and preparing what a job needs before it trains: the accelerator (and DeepSpeed), the
models, tokenizer and data (:class:`Setup`), the validation sets and the training stream.

:mod:`distill.job` orchestrates a run from these steps; ``distill cache-teacher``, ``distill eval``
and ``distill quantize`` use the same ones, so a finished run is loaded exactly as it trained.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from distill import data, models
from distill.augment import parse_augment
from distill.augment import source as augment_source
from distill.config import ConfigError, DataConfig, DistillConfig, data_sources, read_ds_config, teacher_needed
from distill.launched import PRECISION  # noqa: F401  (train.precision as accelerate names it; re-exported)
from distill.losses import UNLABELED
from distill.pairing import Pairing
from distill.progress import phase
from distill.prune import PruneTarget, check_target, importance, prune
from distill.tasks import build_task



def deepspeed_config(path: str | dict, cfg: DistillConfig, world_size: int) -> dict:
    """The DeepSpeed config with every "auto" value that the job owns filled in.

    The shipped configs leave batch sizes, clipping and precision as "auto" so that one file
    serves every model; this job knows them, and accelerate can only infer them from a
    prepared dataloader, which the job does not use.
    """
    ds = read_ds_config(path) if not isinstance(path, dict) else dict(path)
    tr = cfg.train
    owned = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum * world_size,
        "gradient_clipping": tr.max_grad_norm,
    }
    for key, value in owned.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"--ds-config sets {key}={ds[key]} but the job has {value}; set it to \"auto\" in the DeepSpeed config")
    for name, enabled in (("bf16", tr.precision == "bf16"), ("fp16", tr.precision == "fp16")):
        section = ds.setdefault(name, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
        elif section["enabled"] != enabled:
            raise ConfigError(f"--ds-config has {name}.enabled={section['enabled']} but train.precision={tr.precision}; make them agree")
    if tr.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite=skip is not supported under DeepSpeed (its engine owns the step); use stop")
    if tr.optimizer == "adamw_8bit" and ds.get("zero_optimization", {}).get("offload_optimizer"):
        raise ConfigError("train.optimizer=adamw_8bit cannot be combined with DeepSpeed optimizer offload; use adamw")
    return ds


def _register_cpu_deepspeed_ranks() -> None:
    """Tells accelerate the ranks of CPU processes running DeepSpeed.

    accelerate (1.x) recognises DeepSpeed ranks only on accelerator devices: on CPU processes it
    reports world size 1 and rank 0 to every process, while DeepSpeed itself runs on all of them
    (so every rank would read the same data and write the same files). Start the gloo process
    group here and record the real ranks before the Accelerator copies them.
    """
    import deepspeed  # optional dependency (distill[deepspeed])
    from accelerate.state import PartialState  # start-up time: accelerate loads only when this runs

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    atexit.register(_unlink_shm_buffer, dist.get_rank())
    PartialState(cpu=False)
    PartialState._shared_state.update(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                                      local_process_index=int(os.environ.get("LOCAL_RANK", "0")), backend="gloo")


def _unlink_shm_buffer(rank: int) -> None:
    """Removes the name of this rank's shared-memory all-reduce buffer (DeepSpeed's CPU comm).

    DeepSpeed creates ``/dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK`` (66 MB) on every CPU
    rank and never unlinks it, so each CPU job leaked that much RAM until reboot. The mapping
    stays valid for the processes that hold it; only the name goes.
    """
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"
    with contextlib.suppress(OSError):
        os.unlink(Path("/dev/shm") / name)


# glibc's mallopt parameters, and the values train.cpu_allocator=cached sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_BLOCK_MAX = 32 * 2**20  # the largest block glibc will take from the heap instead of mmap (its maximum on 64-bit)
KEPT_FREE = 2**30  # freed heap kept in the process rather than returned to the OS


def tune_cpu_allocator(mode: str, device) -> bool:
    """``train.cpu_allocator=cached`` on a CPU device under glibc: keeps freed tensor memory in the process.

    PyTorch has no caching allocator for CPU tensors; each comes from malloc. glibc serves blocks
    above its mmap threshold (dynamic, from 128 KiB) with fresh pages from the kernel and returns
    them when freed, so every step pays page faults for every activation and chunk of logits it
    allocates (measured: the fused KD loss of a 2,048 x 1,024 chunk takes 20 ms instead of 5 ms).
    Taking blocks up to 32 MiB from the heap and keeping 1 GiB of freed heap reuses them instead.
    The peak resident memory stays the same. Returns whether it was applied.
    """
    if mode != "cached" or torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return False

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEPT_FREE))
    except (OSError, AttributeError):  # another C library (musl): its defaults stay
        return False


def make_accelerator(cfg: DistillConfig, ds_config: str | dict | None = None):
    from accelerate import Accelerator  # start-up time: accelerate loads only when this runs
    from accelerate.utils import DeepSpeedPlugin, GradientAccumulationPlugin  # start-up time: accelerate loads only when this runs

    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    plugin = None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not ds_config and not torch.cuda.is_available():
        # Without it accelerate gives each CPU process a world of its own (under torchrun or deepspeed).
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if ds_config:
        # accelerate's CPU state has no DeepSpeed (it would train plain DDP): DeepSpeed picks its CPU accelerator itself.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        # accelerate config's DeepSpeed answers, already read into the config (distill.launched): accelerate refuses
        # them beside the whole config the job gives its plugin.
        for key in [k for k in os.environ if k.startswith(("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_")) or k == "ACCELERATE_CONFIG_DS_FIELDS"]:
            del os.environ[key]
        # accelerate reads this while it sets up the process group (accelerate launch
        # --use_deepspeed sets it; the deepspeed launcher and torchrun do not).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        # zero3_init_flag off: the student is built whole and partitioned when prepared, and
        # from_pretrained never partitions the teacher (bitsandbytes weights cannot be sharded).
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(ds_config, cfg, world_size), zero3_init_flag=False)
        if world_size > 1 and not torch.cuda.is_available():
            _register_cpu_deepspeed_ranks()
    return Accelerator(
        mixed_precision=PRECISION[cfg.train.precision],
        deepspeed_plugin=plugin,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.train.grad_accum, sync_with_dataloader=False),
        # The scheduler is stepped once per optimizer step by the loop, not once per process.
        step_scheduler_with_optimizer=False,
    )


class Setup:
    """Everything the job loads before training, checked in the order that fails cheapest."""

    def __init__(self, cfg: DistillConfig, device, *, load_teacher: bool = True, load_student: bool = True):
        self.task = task = build_task(cfg.task)
        self.tokenizer, teacher_tokenizer, difference = models.job_tokenizers(cfg)
        self.pairing = None  # a teacher of another tokenizer (distill.pairing)
        self.student_differs = ""  # how the student's tokenizer differs where this command works on the teacher's tokens alone
        if difference and not load_student:  # cache-teacher, serve-teacher: the teacher's targets on its own tokens, for any student
            self.tokenizer, self.student_differs = teacher_tokenizer, difference
            if int(os.environ.get("RANK", "0") or 0) == 0:
                print(f"pairing: the student tokenizes differently {difference}; the teacher's targets are written on its own tokens, "
                      "which students of any tokenizer read", file=sys.stderr)
        elif difference:
            check_pairable(cfg, task, difference)
            self.pairing = Pairing(self.tokenizer, teacher_tokenizer)
        models.check_task_fits(models.teacher_config(cfg.teacher), task.auto_class, task.kind)
        raw = [(source.name, source.weight, source.data, data.load_raw(source.data)) for source in data_sources(cfg.data)]
        self.student = self.vocab = None
        if not load_student:  # distill cache-teacher: the teacher and the data only
            pass
        elif cfg.student.prune:
            config = models.teacher_config(cfg.teacher)
            check_target(config, PruneTarget(**cfg.student.prune))  # before any model is loaded
            models.check_seq_len(config, cfg.data.seq_len, "teacher")
        else:
            self.student = models.build_student(cfg.student, cfg.teacher, seed=cfg.train.seed, device=device, model_class=task.auto_class,
                                                peft_task_type=task.peft_task_type, tokenizer=self.tokenizer)
            models.check_seq_len(self.student.config, cfg.data.seq_len, "student")
        self.teacher = models.load_teacher(cfg.teacher, device, model_class=task.auto_class) if load_teacher else None
        if self.teacher is not None:
            models.check_seq_len(self.teacher.config, cfg.data.seq_len, "teacher")
        teacher_config = self.teacher.config if self.teacher is not None else models.teacher_config(cfg.teacher)
        if self.pairing is not None:  # each model's own tokens: the widths of its tokenizer's ids
            self.vocab = self.pairing.student_width = task.width(self.student, self.tokenizer)
            self.pairing.teacher_width = min(teacher_config.vocab_size, len(self.pairing.teacher))
        elif load_student and not cfg.student.prune:  # a vocabulary or label-set mismatch fails before tokenizing
            self.vocab = task.shared_outputs(self.teacher, self.student, self.tokenizer, truncate_vocab=cfg.teacher.truncate_vocab)
        raw = [(name, weight, source, (self._augmented(train, source, name, cfg, device), validation))
               for name, weight, source, (train, validation) in raw]
        # One entry per source (one in all, without data.mixture): name, weight, training and validation sequences.
        tokenize = task.tokenize
        if self.pairing is not None:  # both tokenizers, matched (a causal LM's text: check_pairable)
            # From a store or a pool the rows are the teacher's, as it holds them; the student's tokens of the same text follow.
            by_teacher = cfg.teacher.source != "model"
            limit = getattr(self.student.config if by_teacher else teacher_config, "max_position_embeddings", None)
            tokenize = lambda raw_rows, tokenizer, source, split, _: data.tokenize(raw_rows, tokenizer, source, split, pairing=self.pairing,
                                                                                  limit=limit, by_teacher=by_teacher)
        self.sources = [(name, weight, tokenize(train, self.tokenizer, source, _split("training", name, cfg), teacher_config),
                         tokenize(validation, self.tokenizer, source, _split("validation", name, cfg), teacher_config))
                        for name, weight, source, (train, validation) in raw]
        if self.pairing is not None:
            line = self.pairing.summary(self.sources[0][2])
            if int(os.environ.get("RANK", "0") or 0) == 0:
                print(f"pairing: {line}", file=sys.stderr)
        self.train_sequences = self.sources[0][2]  # the stream draws from every source (train_stream)
        if task.row_labels and load_student:
            check_unlabelled(self.sources, cfg)
        if load_student and cfg.student.prune:
            self.student = self._pruned_student(cfg, device)
            self.vocab = task.shared_outputs(self.teacher, self.student, self.tokenizer, truncate_vocab=cfg.teacher.truncate_vocab)

    def _augmented(self, train, source: DataConfig, name: str, cfg: DistillConfig, device):
        """A source's training rows with its data.augment copies (the masked LM of word_replace loaded for it, then let go)."""
        if source.augment is None:
            return train
        spec, split_name = parse_augment(source.augment, "data.augment"), _split("training", name, cfg)

        def model_of(which: str):
            if which == "student" and self.student is not None:
                return self.student, self.tokenizer
            if which == "teacher" and self.teacher is not None:
                return self.teacher, self.tokenizer
            if which == "student":  # not built by this command (a store's build): the same student, from the same seed
                return models.build_student(cfg.student, cfg.teacher, seed=cfg.train.seed, device=device, model_class=self.task.auto_class,
                                            peft_task_type=self.task.peft_task_type), self.tokenizer
            if which == "teacher":  # not loaded by this command (a store's reader)
                return models.load_teacher(cfg.teacher, device, model_class=self.task.auto_class), self.tokenizer
            return models.load_masked_lm(which, "data.augment.model", device), models.load_tokenizer(which, "data.augment.model")

        with phase(f"augmenting the {split_name} data ({spec.kind}, {spec.copies} copies a row)"):
            return augment_source.augmented(train, source, augment_source.build(spec, name, model_of), split_name=split_name,
                                            quiet=int(os.environ.get("RANK", "0") or 0) != 0)

    def _pruned_student(self, cfg: DistillConfig, device):
        """The full-precision teacher pruned to student.prune, ranked on the first training batches."""

        reuse = self.teacher is not None and cfg.teacher.quantization == "none"
        full = self.teacher if reuse else models.load_teacher(cfg.teacher, device, quantized=False)
        calibration = data.validation_batches(self.train_sequences, batch_size=cfg.train.micro_batch_size,
                                              limit=cfg.student.prune_calibration_batches * cfg.train.micro_batch_size,
                                              pad_id=self.tokenizer.pad_token_id)
        with phase(f"building the student by pruning the teacher to {cfg.student.prune} ({len(calibration)} calibration batches)"):
            student = prune(full, importance(full, calibration), PruneTarget(**cfg.student.prune))
        del full
        return student.float().requires_grad_(True).train()


def check_pairable(cfg: DistillConfig, task, difference: str) -> None:
    """What a teacher of another tokenizer cannot do yet, refused in one line before any model loads."""
    why = f"teacher and student tokenizers differ {difference}"
    refusals = [
        (task.kind != "causal_lm", f"task.kind={task.kind}: its targets are the teacher's own positions or classes; use a student with the teacher's tokenizer"),
        (cfg.rollout.on_policy > 0 and any(source.data.messages_field for source in data_sources(cfg.data)),
         f"rollout.on_policy={cfg.rollout.on_policy:g} with conversations: the student's completions are not yet rendered in the teacher's "
         "template; use rollout.on_policy=0 or text rows"),
        (not cfg.student.path and cfg.student.init == "teacher_layers", "student.init=teacher_layers keeps the teacher's embeddings and head, which are its tokenizer's; "
                                               "use student.init=random"),
        (bool(cfg.eval.speculative), "eval.speculative: a draft model must share the teacher's tokenizer; set eval.speculative=false"),
        (cfg.eval.lm_eval is not None, "eval.lm_eval scores every model with the student's tokenizer; leave eval.lm_eval out (or score each "
                                       "model apart: distill evaluate)"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(f"{why}; {message}")


def _split(split: str, source: str, cfg: DistillConfig) -> str:
    return f"{split} ({source})" if cfg.data.mixture else split


def validation_sets(setup: Setup, cfg: DistillConfig, accelerator) -> dict[str, list[dict]]:
    """This process's share of each source's validation batches (every rank gets as many); a source of unlabelled text has none."""
    return {name: data.validation_batches(validation, batch_size=cfg.train.micro_batch_size, limit=cfg.data.max_validation_sequences,
                                          pad_id=setup.tokenizer.pad_token_id, rank=accelerator.process_index,
                                          world_size=accelerator.num_processes)
            for name, _, _, validation in setup.sources if len(validation)}


def check_unlabelled(sources: list, cfg: DistillConfig) -> None:
    """Rows without a label train the teacher's terms only: counted and said, and refused in one line when no weighted term
    uses the teacher (an objective of hard labels alone would learn nothing from them)."""
    counts = {name: (sum(1 for label in train["label"] if label == UNLABELED), len(train)) for name, _, train, _ in sources}
    unlabelled, total = sum(u for u, _ in counts.values()), sum(n for _, n in counts.values())
    if not unlabelled:
        return
    if not teacher_needed(cfg.loss):
        where = ", ".join(f"{name}: {u:,} of {n:,}" for name, (u, n) in counts.items() if u)
        raise ConfigError(f"{unlabelled:,} of {total:,} training rows have no label ({where}), and the objective uses hard labels only "
                          "(loss.alpha=1 or ce terms alone); give those rows a label, leave them out, or add a teacher term (loss.alpha < 1)")
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"data: {total - unlabelled:,} labelled and {unlabelled:,} unlabelled training rows; the unlabelled ones train the teacher's "
              "terms only (ce skips them)", file=sys.stderr)


def resolve_steps(cfg: DistillConfig, setup: Setup, world_size: int, *, quiet: bool) -> None:
    """train.epochs as optimizer steps, and a warm-up longer than the run clipped to it, each with a
    note; in ``cfg`` itself, so the saved config.yaml holds the steps that ran."""
    tr = cfg.train
    if tr.epochs is not None:
        sequences = sum(len(train) for _, _, train, _ in setup.sources)
        per_step = tr.micro_batch_size * tr.grad_accum * world_size
        tr.max_steps = max(1, math.ceil(tr.epochs * sequences / per_step))
        if not quiet:
            print(f"distill: train.epochs={tr.epochs:g}: {tr.max_steps:,} steps ({sequences:,} training sequences, {per_step} a step)",
                  file=sys.stderr)
        tr.epochs = None  # the steps are now the run's length (resumed at another world size, the epochs are counted again)
    if tr.warmup_steps > tr.max_steps:
        if not quiet:
            print(f"distill: train.warmup_steps={tr.warmup_steps} is longer than the run (train.max_steps={tr.max_steps}): clipped to "
                  f"{tr.max_steps}", file=sys.stderr)
        tr.warmup_steps = tr.max_steps


def train_stream(setup: Setup, cfg: DistillConfig, accelerator, samples_consumed: int):
    """The rank's micro-batch stream, positioned at ``samples_consumed`` (a mixture draws from its sources by weight)."""
    common = dict(micro_batch_size=cfg.train.micro_batch_size, seed=cfg.data.seed, pad_id=setup.tokenizer.pad_token_id,
                  rank=accelerator.process_index, world_size=accelerator.num_processes, samples_consumed=samples_consumed)
    if cfg.data.mixture:
        return data.MixtureStream([train for _, _, train, _ in setup.sources], [weight for _, weight, _, _ in setup.sources], **common)
    return data.TrainStream(setup.train_sequences, **common)
