"""The job's configuration schema: one typed dataclass tree (``DistillConfig``) whose every field
carries its one-line help, with the objective's shorthand (:func:`loss_terms`) and the option walk
for ``--help`` (:func:`iter_options`). Torch-free, like the rest of :mod:`distill.config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from distill.errors import check
# The objective's names, shared with distill.terms (which must not import distill.config while it loads).
from distill.term_names import LOGITS, LossKind, loss_terms, user_term  # noqa: F401

def option(default: Any, help: str) -> Any:
    """A config field with a default and its one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class TeacherConfig:
    path: str = option("", "Local directory or hub id of the teacher causal LM (and its tokenizer).")
    dtype: Dtype = option("bfloat16", "Dtype the teacher's weights are loaded in (the compute dtype when quantized).")
    quantization: Literal["none", "8bit", "4bit"] = option("none", "Load the teacher quantized through bitsandbytes: none, 8bit or 4bit.")
    quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type (teacher.quantization=4bit).")
    double_quant: bool = option(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    truncate_vocab: bool = option(True, "Allow a teacher whose embedding matrix is padded beyond the student's vocabulary to be cut to the shared length (only when the token maps agree).")
    revision: Optional[str] = option(None, "Hub revision (branch, tag or commit) of the teacher; ignored for local paths.")
    source: Literal["model", "cache", "remote"] = option("model", "Where the teacher's signal comes from: model (the teacher runs in every training process), cache (its top-k targets from a store built by distill cache-teacher) or remote (a teacher pool started with distill serve-teacher, at teacher.url); with cache and remote the teacher is not loaded for training.")
    cache_tail: Literal["bucket", "uniform"] = option("bucket", "teacher.source=cache: how the loss treats the teacher's mass outside the stored top k: bucket (one bucket against the student's remaining mass; exact on the k + 1 buckets) or uniform (spread evenly over the other ids, a dense target).")
    url: str = option("", "teacher.source=remote: the teacher pool's URL (distill serve-teacher prints it), e.g. http://node1:8765; several, comma-separated, are used in turn.")
    token_file: str = option("", "teacher.source=remote: a file holding the pool's token (else $DISTILL_TEACHER_TOKEN); the token itself never goes in a config.")
    remote_timeout: float = option(300.0, "teacher.source=remote: seconds the students keep retrying a pool that does not answer (restarting, overloaded) before they save a checkpoint and stop.")
    prefetch: int = option(1, "teacher.source=remote: optimizer steps whose targets are requested ahead, while the current one computes (0: none).")
    cache: str = option("", "The teacher store of teacher.source=cache (a directory written by distill cache-teacher); empty: the store built for this job's teacher and data under $DISTILL_CACHE_DIR/teacher (default ~/.cache/distill/teacher).")


@dataclass
class LoraConfig:
    r: int = option(16, "LoRA rank.")
    alpha: float = option(32.0, "LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = option(0.05, "Dropout on the LoRA input.")
    target_modules: list = option(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "Names of the Linear modules that get adapters.")
    modules_to_save: list = option([], "Modules trained in full and saved with the adapter (e.g. lm_head).")
    merge: bool = option(False, "Save the merged full model as student/ (the adapter then goes to adapter/); otherwise student/ is the adapter.")


@dataclass
class StudentConfig:
    path: Optional[str] = option(None, "Local directory or hub id of a pretrained student; leave empty to build a new one from student.architecture.")
    architecture: dict = option({}, "Config fields (e.g. num_hidden_layers, hidden_size) overriding the teacher's config for a new, randomly initialized student that uses the teacher's tokenizer (or student.tokenizer).")
    revision: Optional[str] = option(None, "Hub revision of the pretrained student; ignored for local paths.")
    tokenizer: Optional[str] = option(None, "The student's tokenizer (a directory or hub id) when it is not the teacher's (nor student.path's): a new student takes its vocabulary size and special tokens. A teacher of another tokenizer is matched to the student's tokens by the characters they cover (cross-tokenizer distillation: logits, uld and ce terms).")
    init: Literal["random", "teacher_layers"] = option("random", "How a new student (student.architecture) starts: random, or teacher_layers (a copy of the teacher keeping only student.init_layers, with its embeddings and head; DistilBERT).")
    init_layers: list = option([], "Teacher layers (1-based) a teacher_layers student keeps, in order; default: student.architecture.num_hidden_layers evenly spaced from the first (every other layer for half the depth).")
    init_from: Optional[str] = option(None, "The model whose layers a teacher_layers student keeps, when not the teacher itself: e.g. the teacher's pretrained checkpoint before fine-tuning (DistilBERT starts from the pretrained BERT). It must share the teacher's tokenizer and labels.")
    prune: dict = option({}, "Or: build the student by structurally pruning the (full-precision) teacher to these sizes, ranked on training batches: num_hidden_layers, num_attention_heads, intermediate_size, hidden_size.")
    prune_calibration_batches: int = option(8, "Training micro-batches used to rank what student.prune removes.")
    lora: Optional[LoraConfig] = option(None, "Train LoRA adapters (peft) on a pretrained student (student.path) instead of all its weights; the base stays frozen.")
    quantization: Literal["none", "8bit", "4bit"] = option("none", "Load the pretrained student's frozen base quantized (QLoRA with student.lora).")
    license: Optional[str] = option(None, "License of the saved student, in its model card's metadata (a hub license id such as apache-2.0, llama3.1 or other); the teacher's license terms usually bind what is distilled from it.")


@dataclass
class DataConfig:
    train_files: list = option([], "Local training files (.txt, .json, .jsonl, .parquet, .csv); or use data.dataset.")
    validation_files: list = option([], "Local validation files; when empty, data.validation_split of the training data is held out.")
    dataset: Optional[str] = option(None, "A `save_to_disk` directory or a hub dataset name, used instead of data.train_files.")
    dataset_config: Optional[str] = option(None, "Hub dataset configuration name (data.dataset).")
    train_split: str = option("train", "Split of data.dataset used for training.")
    validation_split_name: Optional[str] = option(None, "Split of data.dataset used for validation; when empty, data.validation_split is held out.")
    validation_split: float = option(0.05, "Fraction of the training data held out for validation when no validation data is given.")
    text_unit: Literal["line", "paragraph", "document"] = option("paragraph", "How .txt files are split into documents: per line, per blank-line-separated paragraph, or one per file.")
    text_field: str = option("text", "Column holding the text (the completion, when data.prompt_field is set).")
    messages_field: Optional[str] = option(None, "Column holding conversations (lists of {role, content}, as TRL's messages) instead of text: rendered with the chat template, targets on the assistant turns only.")
    chat_template: Optional[str] = option(None, "Jinja chat template (or a file holding one) for data.messages_field, for tokenizers without their own.")
    text_pair_field: Optional[str] = option(None, "Column holding the second text of a pair (task.kind=sequence_classification).")
    label_field: str = option("label", "Column holding the class (task.kind=sequence_classification): an id, or a name in the teacher's label2id. A row whose label is empty (null, \"\") is unlabelled: the teacher's terms train on it, ce skips it; \"\" here: a source without labels at all (a data.mixture source of unlabelled text).")
    prompt_field: Optional[str] = option(None, "Column holding a prompt that is fed to the models but masked out of the loss (validation data without the column is scored whole).")
    seq_len: int = option(512, "Tokens per training sequence.")
    packing: bool = option(True, "Concatenate documents (separated by EOS) into full seq_len blocks instead of padding each one.")
    seed: int = option(0, "Seed of the deterministic shuffle of training data.")
    augment: Optional[dict] = option(None, "Add rewritten copies of each training row, without a label (the teacher's terms train on them, as TinyBERT's augmented data): {kind: word_replace, copies: 4, rate: 0.3, model: teacher, candidates: 15, context: 16} replaces about rate of the words each by one of the candidates a masked LM predicts best in its place (model: teacher or student for task.kind=masked_lm, else a masked LM's directory or hub id); {kind: span_delete, copies: 4, rate: 0.3, max_span: 3} drops random spans of words. Each copy is seeded by (seed, source, row, copy). originals: false keeps the copies alone: a data.mixture source of them, weighed apart.")
    max_validation_sequences: int = option(256, "Evaluate on at most this many validation sequences (per source of a mixture).")
    mixture: list = option([], "Several named sources sampled by weight, instead of data.train_files/data.dataset: [{name: code, weight: 0.7, train_files: [...], validation_files: [...]}, ...]; each source may also set its own dataset, splits, text_unit and fields. Validation is reported per source.")


@dataclass
class LossConfig:
    kind: LossKind = option("forward_kl", "Distillation divergence: forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd.")
    temperature: float = option(1.0, "Softmax temperature applied to both teacher and student logits in the KD term.")
    alpha: float = option(0.0, "Weight of the hard-label cross-entropy: loss = alpha*CE + (1-alpha)*T^2*KD. alpha=1 trains without a teacher (the baseline).")
    terms: list = option([], "The objective as named, weighted terms, e.g. [{kind: logits, divergence: jsd, weight: 0.7, temperature: 2}, {kind: ce, weight: 0.3}]; loss.kind/loss.alpha are its shorthand. Kinds: logits (a divergence, with temperature), ce (hard labels), hidden (hidden states of mapped layers: layers uniform or [[s, t], ...], distance mse or cosine, a learned projection when widths differ), attention (attention maps, or MiniLMv2 relations when head counts differ).")
    jsd_beta: float = option(0.5, "Teacher weight beta of the mixture in the generalized JSD (loss.kind=jsd); 0 = forward KL, 1 = reverse KL.")
    skew_alpha: float = option(0.1, "Skew alpha of the skewed KLs (loss.kind=skew_*), as in DistiLLM.")
    chunk_size: int = option(0, "Tokens per chunk when computing logit terms, bounding the float32 memory of their logits; 0: about 4M logits per chunk (2^22 // vocabulary tokens).")
    fused: Literal["auto", "always", "never"] = option("auto", "Compute logit terms chunk by chunk from the output layers' inputs and weights, never holding [tokens, vocab] logits: auto (for language-model tasks whose student output layer is a plain Linear), always (an error otherwise) or never (full logits).")


@dataclass
class TrainConfig:
    optimizer: Literal["adamw", "adamw_8bit"] = option("adamw", "Optimizer: adamw (torch) or adamw_8bit (bitsandbytes).")
    lr: float = option(3e-4, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: list = option([0.9, 0.95], "AdamW betas.")
    scheduler: Literal["constant", "linear", "cosine"] = option("cosine", "Learning-rate schedule after warm-up: constant, linear or cosine decay to zero.")
    warmup_steps: int = option(0, "Linear warm-up steps; a warm-up longer than the run is clipped to it (with a note).")
    micro_batch_size: int = option(8, "Sequences per forward pass per process.")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step.")
    max_steps: int = option(1000, "Optimizer steps to train.")
    epochs: Optional[float] = option(None, "Train this many passes over the training sequences instead of train.max_steps (which must then be left out): the steps are ceil(epochs x training sequences / (micro_batch_size x grad_accum x processes)), counted once the data is tokenized (with data.mixture, the sequences of every source together); the saved config.yaml holds the steps.")
    seed: int = option(0, "Seed of model initialization and every random number generator.")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", "Mixed precision of the student's forward/backward: fp32, bf16 or fp16 (fp16 needs a GPU).")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value; 0 disables clipping.")
    log_every: int = option(10, "Log metrics every N optimizer steps.")
    eval_every: int = option(0, "Evaluate on the validation set every N steps (0: only at the end).")
    save_every: int = option(0, "Save a checkpoint every N steps (0: never).")
    keep_checkpoints: int = option(2, "Keep only the newest N complete checkpoints.")
    stop_grace_seconds: float = option(30.0, "Seconds between SIGTERM and SIGKILL (SLURM's KillWait): on SIGTERM a checkpoint is saved only if the last save took less than this.")
    on_nonfinite: Literal["stop", "skip"] = option("stop", "What to do with a NaN/inf loss: stop with an error, or skip that step.")
    cpu_allocator: Literal["cached", "system"] = option("cached", "On CPU under glibc (Linux): cached keeps freed tensor memory in the process (blocks up to 32 MiB come from the heap, and up to 1 GiB of freed heap is kept), sparing the page faults of allocating each step's tensors afresh (a sixth of a KD step on the tiny default); system leaves glibc's defaults. No effect on GPU runs or elsewhere.")


@dataclass
class LmEvalConfig:
    tasks: list = option([], "lm-evaluation-harness task names, run on every model of the report (teacher, student, quantized students).")
    include_path: list = option([], "Folders of lm-eval task YAML files (tasks with local data files: what works offline); searched before the registry.")
    num_fewshot: Optional[int] = option(None, "Few-shot examples per prompt (default: each task's own).")
    limit: Optional[float] = option(None, "At most this many examples per task (a fraction of each task when below 1).")
    batch_size: int = option(8, "Batch size of the harness's forward passes.")
    bootstrap_iters: int = option(1000, "Bootstrap resamples for the standard errors of metrics that need them.")


@dataclass
class EvalConfig:
    at_end: bool = option(True, "Evaluate and write eval.json/report.md after training.")
    baseline: str = option("", "A finished run directory whose student is shown as the report's baseline row: typically the same student trained on the same data for the same steps without the teacher (loss.alpha=1). Shown only when its student, data and steps match this job's.")
    initial: bool = option(True, "Also evaluate the student before training (the 'untrained' row of the report).")
    teacher_fidelity: bool = option(True, "For a quantized teacher, also load it in full precision and report KL(full || quantized).")
    speed: bool = option(True, "Measure latency and throughput of teacher and student.")
    latency_new_tokens: int = option(32, "Tokens generated (greedy, batch 1) when measuring latency.")
    throughput_batch_size: int = option(8, "Batch size of the forward passes that measure throughput.")
    speed_repeats: int = option(3, "Timed repetitions of each speed measurement (after one warm-up).")
    metrics: list = option([], "Further metrics for the report, computed on the same predictions and references as accuracy: paths of evaluate metric modules (offline) or hub names (online), e.g. [./my_f1.py].")
    quantize: list = option([], "Post-training quantization of the final student, one report row each: bnb_8bit, bnb_4bit, int8_weight_only, int8_dynamic.")
    lm_eval: Optional[LmEvalConfig] = option(None, "Downstream benchmarks through lm-evaluation-harness (needs pip install lm-eval), e.g. {tasks: [hellaswag], limit: 200}.")
    speculative: bool = option(False, "Measure each student as the teacher's draft model (assisted generation, greedy, batch 1): accepted tokens per step, acceptance rate, speedup.")
    speculative_prompts: int = option(8, "Validation prompts for the speculative-decoding measurement.")
    speculative_new_tokens: int = option(48, "Tokens generated per prompt in the speculative-decoding measurement.")


@dataclass
class TrackingConfig:
    backend: list = option(["wandb"], "Experiment trackers, one or several at once (as report_to): wandb (offline when no API key is configured), tensorboard, mlflow, or none; e.g. [wandb, tensorboard] or --set tracking.backend=wandb,tensorboard. metrics.jsonl is always written.")
    project: str = option("distill", "Tracker project (W&B project, MLflow experiment).")
    run_name: Optional[str] = option(None, "Run name; defaults to the run directory's name.")
    mlflow_tracking_uri: Optional[str] = option(None, "MLflow tracking URI; defaults to a local store in the run directory.")
    group: Optional[str] = option(None, "Run group (W&B group, MLflow tag distill.group); distill sweep sets it to the sweep's name. WANDB_RUN_GROUP wins.")
    tags: list = option([], "Tags of the run (W&B tags, MLflow tags). WANDB_TAGS (comma-separated) wins.")
    job_type: Optional[str] = option(None, "W&B job type (e.g. distill, baseline). WANDB_JOB_TYPE wins.")
    notes: Optional[str] = option(None, "A sentence about the run (W&B notes, MLflow description). WANDB_NOTES wins.")
    system_metrics: bool = option(True, "Record system metrics (CPU, GPU, memory) in W&B.")
    log_model: Literal["false", "end", "checkpoints"] = option("false", "Upload the model to the tracker (W&B artifact, MLflow artifacts): false, end (the final student or adapter) or checkpoints (each checkpoint as it is saved).")


@dataclass
class RolloutConfig:
    on_policy: float = option(0.0, "On-policy distillation (GKD's lambda): the share of steps (rollout.draw=step) or of rows (row) whose continuation the student writes, with its current weights, for the teacher to score (the targets of such a row: its completion only; the other rows are the data as it is). 0: the data's text as it is, nothing generated; 1: every prompt. causal_lm with teacher.source=model or remote.")
    draw: Literal["step", "row"] = option("step", "What rollout.on_policy draws: step (GKD's and TRL's rule: a drawn optimizer step has every row written by the student, the others none; one generation call every 1/on_policy steps, so generation costs what the share says) or row (each row drawn alone: every step mixes both and generates). Both drawn from the seed and the step (and the row), so the world size changes nothing.")
    max_new_tokens: int = option(64, "Tokens the student writes per prompt (at most; a completion ends at EOS).")
    temperature: float = option(1.0, "Sampling temperature of the student's completions (0: greedy).")
    top_p: float = option(1.0, "Nucleus sampling of the student's completions (1: off).")
    prompt_tokens: int = option(32, "The prompt of a text that has none: its first N tokens. A row of data.prompt_field is prompted by its prompt, a conversation (data.messages_field) by its turns before the last assistant turn.")
    engine: Literal["hf", "vllm"] = option("hf", "What writes the completions: hf (transformers generate with a KV cache; CPU and GPU) or vllm (CUDA: a vLLM engine beside the student in each process, given the student's weights every step; pip install vllm).")
    vllm_gpu_memory_utilization: float = option(0.3, "rollout.engine=vllm: the share of the GPU's memory vLLM may take (the student and its optimizer need the rest).")
    samples: int = option(4, "Completions of validation prompts the student writes at each evaluation, shown in the trackers (a W&B table, a TensorBoard text) and the report; 0: none.")


@dataclass
class TaskConfig:
    kind: Literal["causal_lm", "masked_lm", "sequence_classification"] = option("causal_lm", "What is distilled: causal_lm (next-token prediction), masked_lm (the distribution at masked tokens, DistilBERT) or sequence_classification (a classifier's class distribution). masked_lm and sequence_classification never pack: one text per sequence.")
    mask_rate: float = option(0.15, "task.kind=masked_lm: fraction of tokens masked (80% [MASK], 10% a random token, 10% kept), fixed per sequence.")
    mask_seed: int = option(0, "task.kind=masked_lm: seed of the masking; each sequence's mask depends only on it, the split and the row.")


@dataclass
class DistillConfig:
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "The task: model class, targets and metrics."})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "The frozen teacher."})
    student: StudentConfig = field(default_factory=StudentConfig, metadata={"help": "The student that is trained."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training and validation data."})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "The distillation objective."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimization and checkpointing."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "Completions the student writes (on-policy distillation)."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation and the report."})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"help": "Experiment tracking."})
    output_dir: str = option("runs/distill", "Run directory: config, metrics, checkpoints, the student and the report.")


MIXTURE_SOURCE_KEYS = {"name", "weight", "train_files", "validation_files", "dataset", "dataset_config", "train_split", "validation_split_name",
                       "validation_split", "text_unit", "text_field", "prompt_field", "messages_field", "chat_template", "label_field",
                       "text_pair_field", "augment"}


@dataclass
class DataSource:
    """One source of the training data, typed: an entry of ``data.mixture`` (its ``data.*`` keys applied over the
    job's ``data.*``), or the one source ``data.*`` describes without a mixture (named ``data``, weight 1)."""

    name: str
    weight: float
    data: DataConfig  # what this source reads, as a DataConfig without a mixture


def data_sources(cfg: DataConfig) -> list[DataSource]:
    """``data.mixture`` parsed into its sources (each checked, naming ``data.mixture[i].key``), or data.*'s one source."""
    if not cfg.mixture:
        return [DataSource("data", 1.0, cfg)]
    sources = []
    for i, source in enumerate(cfg.mixture):
        key = f"data.mixture[{i}]"
        check(isinstance(source, dict), f"{key}: expected a mapping such as {{name: code, weight: 1, train_files: [a.txt]}}, got {source!r}")
        for name in source:
            check(name in MIXTURE_SOURCE_KEYS, f"unknown config key: {key}.{name} (a source takes {', '.join(sorted(MIXTURE_SOURCE_KEYS))})")
        check(isinstance(source.get("name"), str) and source["name"], f"{key}.name: each source needs a name")
        check(source["name"] not in {s.name for s in sources}, f"{key}.name: {source['name']!r} is used twice")
        weight = source.get("weight", 1.0)
        check(not isinstance(weight, bool) and isinstance(weight, (int, float)) and weight > 0, f"{key}.weight must be a number > 0 (got {weight!r})")
        check(bool(source.get("train_files")) != bool(source.get("dataset")), f"{key}: set exactly one of train_files and dataset")
        own = {k: v for k, v in source.items() if k not in ("name", "weight")}
        sources.append(DataSource(source["name"], float(weight), dataclasses.replace(cfg, mixture=[], **own)))
    return sources


TRACKER_NAMES = ("wandb", "tensorboard", "mlflow")


def trackers(tracking: TrackingConfig) -> list[str]:
    """``tracking.backend`` as tracker names (a list, or comma-separated names; none: no tracker), in the order given."""
    names = [name.strip() for item in tracking.backend for name in str(item).split(",") if name.strip()]
    return [name for name in dict.fromkeys(names) if name != "none"]


def to_dict(cfg: DistillConfig) -> dict:
    return dataclasses.asdict(cfg)


def iter_options(cls: type = DistillConfig, prefix: str = ""):
    """Yields (dotted key, default, help) for every leaf option, for --help."""
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            yield from iter_options(hint, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield prefix + f.name, default, f.metadata.get("help", "")
