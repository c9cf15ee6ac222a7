"""An augmented source's training rows: its own (unless ``originals: false``), then ``copies`` rewritten ones per row without a label."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

from distill.augment.base import AugmentKind, AugmentSpec
from distill.augment.registry import AUGMENTS
from distill.rundir import write_atomic


def build(spec: AugmentSpec, source: str, model_of):
    """The kind of ``spec``, ready to rewrite; ``model_of(name)`` gives (a model, its tokenizer) to a kind that needs one."""
    return AUGMENTS[spec.kind].build(spec, source, model_of)


def augmented(train, data_cfg, augment, *, split_name: str, quiet: bool = False):
    """``train`` (a ``datasets.Dataset`` of raw rows) followed by ``augment``'s copies of each row: the text
    (and a pair's second text) rewritten, the label emptied (the teacher's terms train on them)."""
    from datasets import Dataset

    rows = train.to_list()
    fields = [f for f in (data_cfg.text_field, data_cfg.text_pair_field) if f and rows and f in rows[0]]
    rewritten, read, identity = {}, [], augment.identity()
    for f in fields:
        rewritten[f], path = rewrite_cached(augment, [str(r[f] or "") for r in rows], identity=identity)
        read += [path] if path else []
    label = data_cfg.label_field if rows and data_cfg.label_field in rows[0] else None
    added = []
    for i, row in enumerate(rows):
        for copy in range(augment.spec.copies):
            new = {**row, **{f: rewritten[f][i][copy] for f in fields}}
            if label:
                new[label] = None
            added.append(new)
    kept = rows if augment.spec.originals else []
    if not quiet:
        what = f"has {len(rows):,} rows and {len(added):,} augmented copies" if kept else f"is {len(added):,} augmented copies of its {len(rows):,} rows"
        cached = f"; read from {', '.join(map(str, read))}" if read else ""
        print(f"data: the {split_name} data {what} ({augment.describe()}); the copies have no label{cached}", file=sys.stderr)
    return Dataset.from_list(kept + added, features=train.features)


def cache_dir() -> Path:
    """Where rewritten rows are kept: ``$DISTILL_CACHE_DIR/augment``, else ``~/.cache/distill/augment``."""
    return Path(os.environ.get("DISTILL_CACHE_DIR") or Path.home() / ".cache" / "distill") / "augment"


def rewrite_cached(augment: AugmentKind, texts: list[str], *, identity: dict | None = ...) -> tuple[list[list[str]], Path | None]:
    """``augment.rewrite(texts)``, kept under :func:`cache_dir` by what decides it (the kind's spec and identity, the
    source's name, the texts): a kind that costs model forwards rewrites a source once, not once per run and process.
    Returns the copies and the file they were read from (None when they were rewritten here)."""
    identity = augment.identity() if identity is ... else identity  # given by a caller that rewrites several fields
    if identity is None:
        return augment.rewrite(texts), None
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(augment.spec), augment.source, identity], sort_keys=True).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    path = cache_dir() / f"{augment.kind}-{digest.hexdigest()[:32]}.json"
    try:
        copies = json.loads(path.read_text())
    except (OSError, ValueError):
        copies = None
    if isinstance(copies, list) and len(copies) == len(texts) and all(isinstance(c, list) and len(c) == augment.spec.copies for c in copies):
        return copies, path
    copies = augment.rewrite(texts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(copies))
    except OSError as error:  # a read-only cache costs the next run a rewrite, nothing else
        print(f"data: could not keep the rewritten rows in {path} ({error})", file=sys.stderr)
    return copies, None
