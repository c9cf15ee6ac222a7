"""``word_replace``: TinyBERT's augmentation. Each copy replaces about ``rate`` of a text's words, each
by one of the ``candidates`` words a masked LM predicts most likely in its place (the word masked,
``context`` words each side of it as context). Words the masked LM's tokenizer splits into several pieces are kept
(TinyBERT draws those from GloVe neighbours, which this project does not ship).

``model``: ``teacher`` or ``student`` (task.kind=masked_lm: the job's own models, the student as it
starts) or a masked LM's directory or hub id (any tokenizer: texts go in and out as text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from distill.augment.base import AugmentKind, AugmentSpec
from distill.errors import ConfigError, check

ALPHA = re.compile(r"[A-Za-z]+")  # the words that may be replaced; everything between them is kept as it is
OWN_MODELS = ("teacher", "student")


@dataclass
class WordReplaceSpec(AugmentSpec):
    model: str = "teacher"  # teacher, student (masked_lm) or a masked LM's directory or hub id
    candidates: int = 15  # the most likely predictions one is drawn from (TinyBERT's K)
    context: int = 16  # words each side of the masked word the masked LM sees (a long text costs a window per word, not the whole text)
    batch_size: int = 64  # masked texts per forward


class WordReplace(AugmentKind):
    kind = "word_replace"
    Spec = WordReplaceSpec

    @classmethod
    def check(cls, spec, key):
        check(isinstance(spec.model, str) and spec.model.strip() != "", f"{key}.model: teacher, student or a masked LM's directory (got {spec.model!r})")
        check(isinstance(spec.candidates, int) and spec.candidates >= 1, f"{key}.candidates must be an integer >= 1 (got {spec.candidates!r})")
        check(isinstance(spec.batch_size, int) and spec.batch_size >= 1, f"{key}.batch_size must be an integer >= 1 (got {spec.batch_size!r})")
        check(isinstance(spec.context, int) and spec.context >= 1, f"{key}.context must be an integer >= 1 (got {spec.context!r})")

    @classmethod
    def check_task(cls, spec, key, task_kind):
        super().check_task(spec, key, task_kind)
        check(spec.model not in OWN_MODELS or task_kind == "masked_lm",
              f"{key}.model={spec.model}: word_replace needs a masked LM's predictions, and task.kind={task_kind}'s {spec.model} is not a masked LM; "
              f"set {key}.model to a masked LM's directory or hub id")

    @classmethod
    def build(cls, spec, source, model_of):
        model, tokenizer = model_of(spec.model)
        return cls(spec, source, model=model, tokenizer=tokenizer)

    def __init__(self, spec, source, *, model, tokenizer):
        super().__init__(spec, source)
        self.model, self.tokenizer = model, tokenizer
        if tokenizer.mask_token is None:
            raise ConfigError(f"data.augment.model={spec.model}: its tokenizer has no mask token; word_replace needs a masked LM")
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        # The pieces a word may become: whole alphabetic words (not '##' continuations nor special tokens).
        self.whole = [i not in special and bool(token) and token.isalpha() for i, token in enumerate(vocab)]
        self.vocab = vocab

    def describe(self):
        return f"word_replace, {self.spec.rate:.0%} of the words from the {self.spec.candidates} best of {self.spec.model}'s masked-LM predictions"

    def identity(self):
        """The masked LM's weights as they are in memory (a student as it starts, a teacher as loaded) and its tokenizer;
        None for weights ZeRO-3 has partitioned (this process holds a shard of them)."""
        import hashlib

        import torch

        if any(hasattr(p, "ds_id") for p in self.model.parameters()):
            return None
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        vocabulary = hashlib.sha256("\n".join([self.tokenizer.mask_token, *self.vocab]).encode()).hexdigest()
        return {"masked_lm": digest.hexdigest(), "tokenizer": vocabulary}

    def rewrite(self, texts):
        words = [list(ALPHA.finditer(text)) for text in texts]
        eligible = [[j for j, m in enumerate(ws) if self._one_piece(m.group())] for ws in words]
        rngs = [[self.rng(row, copy) for copy in range(self.spec.copies)] for row in range(len(texts))]
        chosen = [[[j for j in eligible[row] if rng.random() < self.spec.rate] for rng in rngs[row]] for row in range(len(texts))]
        needed = sorted({(row, j) for row in range(len(texts)) for picks in chosen[row] for j in picks})
        candidates = self._candidates(texts, words, needed)
        out = []
        for row, text in enumerate(texts):
            copies = []
            for rng, picks in zip(rngs[row], chosen[row]):
                replaced, last = [], 0
                for j in picks:
                    options = candidates.get((row, j))
                    if not options:
                        continue
                    m = words[row][j]
                    word = options[rng.randrange(len(options))]
                    replaced += [text[last:m.start()], word.capitalize() if m.group()[0].isupper() else word]
                    last = m.end()
                copies.append("".join(replaced) + text[last:])
            out.append(copies)
        return out

    def _one_piece(self, word: str) -> bool:
        pieces = self.tokenizer.tokenize(word)
        return len(pieces) == 1 and pieces[0] != self.tokenizer.unk_token

    def _candidates(self, texts, words, needed: list[tuple[int, int]]) -> dict[tuple[int, int], list[str]]:
        """The ``candidates`` most likely whole words at each needed (row, word), the word masked in its text."""
        import torch  # the config reads the kinds without it

        from distill.fused import head_bypassed

        found: dict = {}
        limit = min(512, getattr(self.model.config, "max_position_embeddings", 512), self.tokenizer.model_max_length)
        device = next(self.model.parameters()).device
        not_whole = None  # the ids no candidate may be, over the output layer's width (known after the first forward)
        training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(needed), self.spec.batch_size):
                part = needed[start : start + self.spec.batch_size]
                masked = []
                for row, j in part:
                    ws, text, c = words[row], texts[row], self.spec.context
                    first, last = ws[max(0, j - c)].start() if j > c else 0, ws[j + c].end() if j + c < len(ws) else len(text)
                    masked.append(text[first : ws[j].start()] + self.tokenizer.mask_token + text[ws[j].end() : last])
                batch = self.tokenizer(masked, padding=True, truncation=True, max_length=limit, return_tensors="pt").to(device)
                with torch.no_grad():
                    with head_bypassed(self.model) as head:  # the output layer runs at the masked positions only, after the bypass
                        features = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    at = batch["input_ids"] == self.tokenizer.mask_token_id
                    has = at.any(-1)  # a mask cut off by truncation has no prediction
                    first = at.float().argmax(-1)
                    logits = head(features[torch.arange(len(part), device=device), first]).float()
                if not_whole is None:
                    not_whole = torch.tensor([i for i, ok in enumerate(self.whole[: logits.shape[-1]]) if not ok], dtype=torch.long, device=device)
                logits[:, not_whole] = float("-inf")
                top = logits.topk(min(self.spec.candidates + 1, logits.shape[-1]), dim=-1).indices.tolist()
                for (row, j), ids, ok in zip(part, top, has.tolist()):
                    if not ok:
                        continue
                    original = words[row][j].group().lower()
                    found[(row, j)] = [w for w in (self.vocab[i].lower() for i in ids) if w != original][: self.spec.candidates]
        finally:
            self.model.train(training)
        return found
