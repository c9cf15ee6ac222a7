"""An augmented source's training rows: its own (unless ``originals: false``), then ``copies`` rewritten ones per row without a label."""

from __future__ import annotations

import sys

from distill.augment.base import AugmentSpec
from distill.augment.registry import AUGMENTS


def build(spec: AugmentSpec, source: str, model_of):
    """The kind of ``spec``, ready to rewrite; ``model_of(name)`` gives (a model, its tokenizer) to a kind that needs one."""
    return AUGMENTS[spec.kind].build(spec, source, model_of)


def augmented(train, data_cfg, augment, *, split_name: str, quiet: bool = False):
    """``train`` (a ``datasets.Dataset`` of raw rows) followed by ``augment``'s copies of each row: the text
    (and a pair's second text) rewritten, the label emptied (the teacher's terms train on them)."""
    from datasets import Dataset

    rows = train.to_list()
    fields = [f for f in (data_cfg.text_field, data_cfg.text_pair_field) if f and rows and f in rows[0]]
    rewritten = {f: augment.rewrite([str(r[f] or "") for r in rows]) for f in fields}
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
        print(f"data: the {split_name} data {what} ({augment.describe()}); the copies have no label", file=sys.stderr)
    return Dataset.from_list(kept + added, features=train.features)
