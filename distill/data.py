"""Data: local files, a saved dataset or a hub dataset, tokenized into causal-LM sequences.

Every sequence carries ``input_ids`` and ``labels`` (the same ids, with ``IGNORE_INDEX`` where a
token is not a target: prompt tokens and padding). The training stream is a deterministic
function of (seed, samples consumed), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path

import torch

from distill.config import ConfigError, DataConfig, tiny_hint
from distill.errors import first_line
from distill.losses import IGNORE_INDEX, UNLABELED

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def quiet_progress_off_terminal() -> None:
    """datasets' per-map progress bars and transformers' weight-loading bars help on a terminal and flood a log file."""

    import datasets  # start-up time: datasets loads only when this runs
    from transformers.utils import logging as transformers_logging  # start-up time: transformers loads only when this runs

    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
        transformers_logging.disable_progress_bar()


COMPLETIONS = "teacher-completions"  # the kind in the manifest of a distill generate-teacher dataset


def completion_shards(path: Path) -> list[Path] | None:
    """The shard files, in order, of a complete ``distill generate-teacher`` dataset at ``path``; None for anything else."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != COMPLETIONS:
        return None
    return [Path(path) / shard["file"] for shard in manifest["shards"]]


def expand_files(files: list[str]) -> list[str]:
    """``files`` with each generate-teacher dataset directory replaced by its shard files."""
    out = []
    for name in files:
        shards = completion_shards(Path(os.path.expanduser(name)))
        out += [str(s) for s in shards] if shards is not None else [name]
    return out


def _builder_for(files: list[str], key: str) -> str:
    builders = set()
    for name in files:
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            raise ConfigError(f"{key}: {name} is a directory, not a data file nor a complete distill generate-teacher dataset (no manifest.json)")
        if not path.is_file():
            raise ConfigError(f"{key}: file not found: {name}{tiny_hint(name)}")
        if path.suffix.lower() not in FILE_BUILDERS:
            raise ConfigError(f"{key}: unsupported file type {path.suffix!r} ({name}); use one of {', '.join(sorted(FILE_BUILDERS))}")
        builders.add(FILE_BUILDERS[path.suffix.lower()])
    if len(builders) > 1:
        raise ConfigError(f"{key}: all files must have the same type (got {', '.join(sorted(builders))})")
    return builders.pop()


def _load_files(files: list[str], key: str, text_unit: str):
    import datasets  # start-up time: datasets loads only when this runs

    files = expand_files(files)
    builder = _builder_for(files, key)
    paths = [os.path.expanduser(f) for f in files]
    if all(os.path.getsize(p) == 0 for p in paths):
        raise ConfigError(f"{key}: the data is empty ({', '.join(files)})")
    extra = {"sample_by": text_unit} if builder == "text" else {}
    # datasets logs a bad file's error before raising it; the one line below says it, with the key to change.
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=paths, split="train", **extra)
    except Exception as err:  # pyarrow, pandas and datasets each raise their own types for a bad file
        cause = err.__cause__ or err if isinstance(err, datasets.exceptions.DatasetGenerationError) else err
        raise ConfigError(f"{key}: cannot read {', '.join(files)} as {builder}: {first_line(cause)}") from None
    finally:
        datasets_logger.setLevel(level)


def _load_named(cfg: DataConfig, split: str):
    import datasets  # start-up time: datasets loads only when this runs

    local = Path(os.path.expanduser(cfg.dataset))
    if local.is_dir():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"data.dataset {cfg.dataset} has no split {split!r} (has {', '.join(loaded)}); set data.train_split / data.validation_split_name")
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except (ConnectionError, OSError, ValueError) as err:
        offline = " (the hub is unreachable: set data.dataset to a local datasets.save_to_disk directory, or use data.train_files)" \
            if isinstance(err, ConnectionError) or "offline" in str(err).lower() else ""
        raise ConfigError(f"data.dataset {cfg.dataset!r}: cannot load it: {first_line(err)}{offline}") from None


def load_raw(cfg: DataConfig):
    """Returns (train, validation) ``datasets.Dataset`` objects of raw text rows."""
    quiet_progress_off_terminal()
    if cfg.dataset:
        train = _load_named(cfg, cfg.train_split)
        validation = _load_named(cfg, cfg.validation_split_name) if cfg.validation_split_name else None
    else:
        train = _load_files(cfg.train_files, "data.train_files", cfg.text_unit)
        validation = _load_files(cfg.validation_files, "data.validation_files", cfg.text_unit) if cfg.validation_files else None
    columns = {"data.messages_field": cfg.messages_field} if cfg.messages_field else {"data.text_field": cfg.text_field, "data.prompt_field": cfg.prompt_field}
    for key, column in ((k, c) for k, c in columns.items() if c):
        for name, part in (("training", train), ("validation", validation)):
            if part is None:
                continue
            if column not in part.column_names and key == "data.prompt_field" and name == "validation":
                continue  # validation text without prompts (a generate-teacher dataset's real validation text) is scored whole
            if column not in part.column_names:
                raise ConfigError(f"{key}: column {column!r} not in the {name} data (columns: {', '.join(part.column_names)})")
            if key == "data.messages_field":
                continue
            dtype = getattr(part.features[column], "dtype", None)
            if dtype not in ("string", "large_string"):
                raise ConfigError(f"{key}: column {column!r} of the {name} data holds {dtype or type(part.features[column]).__name__}, "
                                  "not text; point it at a text column")
    if len(train) == 0:
        raise ConfigError("data.train_files / data.dataset: the training data is empty")
    if validation is None:
        if cfg.validation_split <= 0 or len(train) < 2:
            raise ConfigError("no validation data: set data.validation_files, data.validation_split_name or data.validation_split > 0")
        parts = train.train_test_split(test_size=cfg.validation_split, seed=cfg.seed, shuffle=True)
        train, validation = parts["train"], parts["test"]
    return train, validation


def _document_ids(tokenizer, text: str, prompt: str | None) -> tuple[list[int], list[int]]:
    """Token ids of one document (BOS? prompt completion EOS) and its labels."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = prefix + prompt_ids + text_ids + suffix
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + text_ids + suffix
    return ids, labels


def chat_template(tokenizer, cfg: DataConfig) -> str:
    """``data.chat_template`` (a Jinja string, or the path of a file holding one), else the tokenizer's own."""
    template = cfg.chat_template
    if template and os.path.isfile(os.path.expanduser(template)):
        template = Path(os.path.expanduser(template)).read_text()
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError("data.messages_field: the tokenizer has no chat template; set data.chat_template to a Jinja template (or a file holding one)")
    return template


def _conversation_ids(tokenizer, messages: list[dict], template: str, row: int) -> tuple[list[int], list[int]]:
    """Token ids of one rendered conversation, with labels only on the assistant turns.

    Each assistant turn's characters are found by rendering the conversation before it (with the
    generation prompt) and through it: the turn is what the second adds to the first, its closing
    tokens included, so the student learns to end its turn. Tokens are then mapped to those
    character spans through the tokenizer's offsets, which holds in multi-turn conversations.
    """
    from distill.pairing import assistant_labels, assistant_turns  # torch-free; distill.pairing renders conversations for both tokenizers too

    text, spans = assistant_turns(tokenizer, messages, template, row)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    return ids, assistant_labels(ids, [start for start, _ in offsets], [end for _, end in offsets], spans)


def tokenize(dataset, tokenizer, cfg: DataConfig, split_name: str, pairing=None, limit: int | None = None, by_teacher: bool = False):
    """Tokenizes raw rows into sequences of at most ``seq_len`` tokens (exactly, when packing).

    Rows are text (``data.text_field``, with an optional masked ``data.prompt_field``) or
    conversations (``data.messages_field``: lists of ``{role, content}`` rendered with the chat
    template, targets on the assistant turns only). With ``pairing`` (a teacher of another
    tokenizer, :mod:`distill.pairing`) each row also holds the teacher's tokens of the same text
    (at most ``limit``) and both sides' groups; ``by_teacher``: the rows are the teacher's (a store's
    or a pool's: ``seq_len`` of its tokens, as a job of its tokenizer cuts them) and the student's
    tokens of the same text follow (at most ``limit``).
    """
    seq_len, text_field, prompt_field = cfg.seq_len, cfg.text_field, cfg.prompt_field
    template = chat_template(tokenizer, cfg) if cfg.messages_field else None
    if pairing is not None:
        templates = (template, getattr(pairing.teacher, "chat_template", None) or chat_template(pairing.teacher, cfg)) if template else None
        return _tokenize_paired(dataset, cfg, split_name, pairing, limit or 1 << 30, templates, by_teacher)

    def documents(batch, indices):
        if cfg.messages_field:
            for messages, row in zip(batch[cfg.messages_field], indices):
                if messages:
                    yield _conversation_ids(tokenizer, messages, template, row)
            return
        prompts = batch[prompt_field] if prompt_field and prompt_field in batch else [None] * len(batch[text_field])
        for text, prompt in zip(batch[text_field], prompts):
            if text:
                yield _document_ids(tokenizer, text, prompt)

    def encode(batch, indices):
        input_ids, labels = [], []
        for ids, labs in documents(batch, indices):
            input_ids.append(ids[:seq_len])
            labels.append(labs[:seq_len])
            if cfg.packing:  # keep the whole document; blocks are cut below
                input_ids[-1], labels[-1] = ids, labs
        if cfg.packing:
            flat_ids = [t for doc in input_ids for t in doc]
            flat_labels = [t for doc in labels for t in doc]
            usable = len(flat_ids) - len(flat_ids) % seq_len
            input_ids = [flat_ids[i : i + seq_len] for i in range(0, usable, seq_len)]
            labels = [flat_labels[i : i + seq_len] for i in range(0, usable, seq_len)]
        return {"input_ids": input_ids, "labels": labels}

    # Packing concatenates within each map batch of 1000 rows and drops that batch's remainder
    # (as transformers' run_clm does), which keeps memory flat on large corpora.
    sequences = dataset.map(encode, batched=True, with_indices=True, batch_size=1000, remove_columns=dataset.column_names,
                            desc=f"tokenizing {split_name}")
    return _with_targets(sequences, cfg, split_name)


def _with_targets(sequences, cfg: DataConfig, split_name: str, labels: str = "labels"):
    """The tokenized ``sequences`` whose ``labels`` hold a target; none is a one-line error."""
    sequences = sequences.filter(lambda row: any(t != IGNORE_INDEX for t in row[labels][1:]))
    if len(sequences) == 0:
        hint = "lower data.seq_len or add data" if cfg.packing else "add data or check data.text_field"
        raise ConfigError(f"the {split_name} data gives no sequences of data.seq_len={cfg.seq_len} tokens; {hint}")
    return sequences.with_format("python")


def _tokenize_paired(dataset, cfg: DataConfig, split_name: str, pairing, limit: int, templates: tuple[str, str] | None, by_teacher: bool):
    """:func:`tokenize` for a teacher of another tokenizer: each document tokenized by both and matched (:mod:`distill.pairing`);
    a conversation rendered by each with its own template (``templates``: the student's, the teacher's). Rows cut ``by_teacher``
    are the ones a job of the teacher's tokenizer has (the same rows kept: those with a teacher's target)."""
    from distill.pairing import blocks, concatenate  # torch-free

    seq_len, text_field, prompt_field = cfg.seq_len, cfg.text_field, cfg.prompt_field

    def encode(batch, indices):
        if templates is not None:
            docs = [pairing.conversation(messages, templates, row) for messages, row in zip(batch[cfg.messages_field], indices) if messages]
        else:
            prompts = batch[prompt_field] if prompt_field and prompt_field in batch else [None] * len(batch[text_field])
            docs = [pairing.document([(prompt or "", False), (text, True)], text_field) for text, prompt in zip(batch[text_field], prompts) if text]
        length = (lambda doc: len(doc.teacher_ids)) if by_teacher else len
        if cfg.packing:
            joined = concatenate(docs)
            rows = blocks(joined, [(i, i + seq_len) for i in range(0, length(joined) - length(joined) % seq_len, seq_len)], limit, by_teacher=by_teacher)
        else:
            rows = [row for doc in docs for row in blocks(doc, [(0, min(seq_len, length(doc)))], limit, by_teacher=by_teacher)]
        rows = [{**row, **pairing.target_bytes(row)} for row in rows]
        return {key: [row[key] for row in rows] for key in PAIRED_COLUMNS}

    sequences = dataset.map(encode, batched=True, with_indices=True, batch_size=1000, remove_columns=dataset.column_names,
                            desc=f"tokenizing {split_name} for both tokenizers")
    return _with_targets(sequences, cfg, split_name, "teacher_labels" if by_teacher else "labels")


PAIRED_COLUMNS = ("input_ids", "labels", "teacher_input_ids", "teacher_labels", "groups", "teacher_groups", "inside", "target_bytes",
                  "teacher_target_bytes")


def unlabelled(value) -> bool:
    """A row without a hard label: null, an empty string, NaN (pandas' missing value)."""
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and value != value)


def tokenize_labelled(dataset, tokenizer, cfg: DataConfig, split_name: str, label2id: dict[str, int], *, keep_unlabelled: bool = True):
    """Tokenizes labelled rows (``data.text_field``, optional ``data.text_pair_field``, ``data.label_field``)
    into ``{input_ids, label}`` with the tokenizer's own special tokens, cut to ``data.seq_len``.

    Labels are class ids, or names mapped through the teacher's ``label2id``. A row without one
    (:func:`unlabelled`, or every row when ``data.label_field`` is "") gets :data:`UNLABELED`, or is
    left out without ``keep_unlabelled`` (validation: accuracy needs a label).
    """
    key = "data.label_field"
    if cfg.label_field and cfg.label_field not in dataset.column_names:
        raise ConfigError(f"{key}: column {cfg.label_field!r} not in the {split_name} data (columns: {', '.join(dataset.column_names)}); "
                          "a source of unlabelled text sets label_field: \"\"")
    if cfg.text_pair_field and cfg.text_pair_field not in dataset.column_names:
        raise ConfigError(f"data.text_pair_field: column {cfg.text_pair_field!r} not in the {split_name} data "
                          f"(columns: {', '.join(dataset.column_names)})")
    classes = len(label2id)

    def label_id(value):
        if unlabelled(value):
            return UNLABELED
        if isinstance(value, str) and value in label2id:
            return label2id[value]
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < classes:
            return value
        raise ConfigError(f"{key}: label {value!r} in the {split_name} data is neither a class id 0..{classes - 1} nor one of the "
                          f"teacher's labels ({', '.join(map(str, label2id))})")

    def encode(batch):
        pairs = batch[cfg.text_pair_field] if cfg.text_pair_field else None
        encoded = tokenizer(batch[cfg.text_field], pairs, truncation=True, max_length=cfg.seq_len)
        labels = batch[cfg.label_field] if cfg.label_field else [None] * len(encoded["input_ids"])
        return {"input_ids": encoded["input_ids"], "label": [label_id(v) for v in labels]}

    sequences = dataset.map(encode, batched=True, batch_size=1000, remove_columns=dataset.column_names, desc=f"tokenizing {split_name}")
    if not keep_unlabelled:
        before = len(sequences)
        sequences = sequences.filter(lambda row: row["label"] != UNLABELED, desc=f"labelled {split_name} rows")
        if len(sequences) < before:
            print(f"the {split_name} data: {before - len(sequences):,} of {before:,} rows have no label and are left out (accuracy needs one)",
                  file=sys.stderr)
    if len(sequences) == 0 and (keep_unlabelled or cfg.label_field):  # a source without labels (label_field "") is not validated
        raise ConfigError(f"the {split_name} data has no {'' if keep_unlabelled else 'labelled '}rows; check data.train_files and data.label_field")
    return sequences.with_format("python")


def tokenize_masked(dataset, tokenizer, cfg: DataConfig, split_name: str, *, rate: float, seed: int):
    """Tokenizes one text per sequence (with the tokenizer's special tokens, cut to ``data.seq_len``)
    and masks it: each non-special token is chosen with probability ``rate`` (at least one per
    sequence), then becomes the mask token (80%), a random non-special token (10%) or stays (10%).

    The choices for a row come from ``random.Random("seed:split:row")``: deterministic per
    sequence, independent of batching, world size and resume.
    """

    if tokenizer.mask_token_id is None:
        raise ConfigError("task.kind=masked_lm needs a tokenizer with a mask token; the teacher's tokenizer has none (is it a masked LM?)")
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]

    def encode(batch, indices):
        input_ids, labels = [], []
        encoded = tokenizer([t or "" for t in batch[cfg.text_field]], truncation=True, max_length=cfg.seq_len)["input_ids"]
        for ids, row in zip(encoded, indices):
            candidates = [i for i, t in enumerate(ids) if t not in special]
            if not candidates:
                continue
            rng = random.Random(f"{seed}:{split_name}:{row}")
            chosen = [i for i in candidates if rng.random() < rate] or [rng.choice(candidates)]
            masked, targets = list(ids), [IGNORE_INDEX] * len(ids)
            for i in chosen:
                targets[i] = ids[i]
                draw = rng.random()
                masked[i] = tokenizer.mask_token_id if draw < 0.8 else rng.choice(ordinary) if draw < 0.9 else ids[i]
            input_ids.append(masked)
            labels.append(targets)
        return {"input_ids": input_ids, "labels": labels}

    sequences = dataset.map(encode, batched=True, with_indices=True, batch_size=1000, remove_columns=dataset.column_names,
                            desc=f"tokenizing and masking {split_name}")
    if len(sequences) == 0:
        raise ConfigError(f"the {split_name} data gives no sequences to mask; add data or check data.text_field")
    return sequences.with_format("python")


def collate(rows: list[dict], pad_id: int, ids: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Right-pads rows to the longest; padding is masked in ``attention_mask`` and ``labels``.

    Rows of a classification task carry one ``label`` each: ``labels`` is then ``[B]``. ``ids``,
    each row's (source, index) in its tokenized sequences, becomes ``rows`` ``[B, 2]``: where a
    teacher store finds the row's targets.
    """
    width = max(len(r["input_ids"]) for r in rows)
    padded = lambda key, fill: torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
    input_ids = padded("input_ids", pad_id)  # one tensor from nested lists: far quicker than one per row
    attention_mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], dtype=torch.long)
    if "label" in rows[0]:
        labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
    else:
        labels = padded("labels", IGNORE_INDEX)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if "teacher_input_ids" in rows[0]:  # a teacher of another tokenizer (distill.pairing): its tokens of the same text, and the groups
        teacher_width = max(len(r["teacher_input_ids"]) for r in rows)
        padded_to = lambda key, fill, n: torch.tensor([list(r[key]) + [fill] * (n - len(r[key])) for r in rows], dtype=torch.long)
        batch["groups"] = padded("groups", -1)
        batch["teacher_input_ids"] = padded_to("teacher_input_ids", 0, teacher_width)
        batch["teacher_groups"] = padded_to("teacher_groups", -1, teacher_width)
        batch["teacher_labels"] = padded_to("teacher_labels", IGNORE_INDEX, teacher_width)
        batch["teacher_attention_mask"] = torch.tensor([[1] * len(r["teacher_input_ids"]) + [0] * (teacher_width - len(r["teacher_input_ids"]))
                                                        for r in rows], dtype=torch.long)
        batch["inside"] = torch.tensor([[list(t) for t in r["inside"]] + [[-1, 0, 0, 0, 0]] * (width - len(r["inside"])) for r in rows],
                                       dtype=torch.long).reshape(len(rows), width, 5)
        batch["target_bytes"] = torch.tensor([r["target_bytes"] for r in rows], dtype=torch.long)
        batch["teacher_target_bytes"] = torch.tensor([r["teacher_target_bytes"] for r in rows], dtype=torch.long)
    if ids is not None:
        batch["rows"] = torch.tensor(ids, dtype=torch.long).reshape(-1, 2)
    return batch


def rows_at(sequences, indices: list[int]) -> list[dict]:
    """The rows at ``indices`` of a list or a ``datasets.Dataset`` (read in one batched access, not row by row)."""
    if not hasattr(sequences, "column_names"):
        return [sequences[i] for i in indices]
    columns = sequences[indices]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


class TrainStream:
    """Deterministic, resumable micro-batches for one rank.

    The global order is a fresh seeded permutation per epoch. Each micro-step consumes
    ``micro_batch_size * world_size`` consecutive samples of that order and rank ``r`` takes the
    ``r``-th slice, so the position is one number (``samples_consumed``) that stays meaningful
    when a run is resumed at another world size.
    """

    def __init__(self, sequences, *, micro_batch_size: int, seed: int, pad_id: int, rank: int = 0, world_size: int = 1, samples_consumed: int = 0):
        self.sequences = sequences
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.samples_consumed = samples_consumed
        self._epoch, self._order = -1, None

    def _index(self, global_position: int) -> int:
        epoch, offset = divmod(global_position, len(self.sequences))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.sequences), generator=generator).tolist()
        return self._order[offset]

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.samples_consumed + self.rank * self.micro_batch_size
        indices = [self._index(start + i) for i in range(self.micro_batch_size)]
        self.samples_consumed += self.micro_batch_size * self.world_size
        return collate(rows_at(self.sequences, indices), self.pad_id, [(0, i) for i in indices])


def validation_batches(sequences, *, batch_size: int, limit: int, pad_id: int, rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The first ``limit`` validation sequences in order, this rank's share, in batches.

    Every rank gets the same number of sequences (the remainder is dropped), so every rank runs
    the same number of forward passes: a ZeRO-3 model gathers its weights in each one.
    """
    count = min(limit, len(sequences))
    count -= count % world_size
    if count == 0:
        raise ConfigError(f"fewer validation sequences ({len(sequences)}) than processes ({world_size}); add validation data")
    indices = list(range(count))[rank::world_size]
    return [collate(rows_at(sequences, indices[j : j + batch_size]), pad_id) for j in range(0, len(indices), batch_size)]


class MixtureStream:
    """Deterministic, resumable micro-batches drawn from several sources by weight.

    Global position p belongs to a source drawn from the weights by a generator seeded with
    (seed, p // BLOCK); within a source, its k-th draw is its k-th sample in that source's own
    seeded order (a fresh permutation per epoch, as :class:`TrainStream`). So the stream is a
    function of (seed, samples consumed), and ranks split each micro-step as in TrainStream.
    """

    BLOCK = 4096

    def __init__(self, sequences: list, weights: list[float], *, micro_batch_size: int, seed: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, samples_consumed: int = 0):
        self.orders = [TrainStream(seqs, micro_batch_size=1, seed=seed + 7919 * (i + 1), pad_id=pad_id) for i, seqs in enumerate(sequences)]
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.micro_batch_size, self.seed, self.pad_id = micro_batch_size, seed, pad_id
        self.rank, self.world_size, self.samples_consumed = rank, world_size, samples_consumed
        self._starts = [torch.zeros(len(sequences), dtype=torch.long)]  # draws of each source before each block
        self._block, self._draws = -1, None

    def _block_draws(self, block: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
        return torch.multinomial(self.weights, self.BLOCK, replacement=True, generator=generator)

    def locate(self, position: int) -> tuple[int, int]:
        """(source, its draw number) of global sample ``position``."""
        block, offset = divmod(position, self.BLOCK)
        while len(self._starts) <= block:
            done = len(self._starts) - 1
            self._starts.append(self._starts[-1] + torch.bincount(self._block_draws(done), minlength=len(self.orders)))
        if block != self._block:
            self._block, self._draws = block, self._block_draws(block)
        source = int(self._draws[offset])
        return source, int(self._starts[block][source]) + int((self._draws[:offset] == source).sum())

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.samples_consumed + self.rank * self.micro_batch_size
        rows, ids = [], []
        for position in range(start, start + self.micro_batch_size):
            source, draw = self.locate(position)
            order = self.orders[source]
            index = order._index(draw)
            rows.append(order.sequences[index])
            ids.append((source, index))
        self.samples_consumed += self.micro_batch_size * self.world_size
        return collate(rows, self.pad_id, ids)
