"""``hf``: transformers' ``generate`` on the student itself, with a KV cache, every prompt of a step in
one left-padded batch. CPU and GPU, DDP, ZeRO-3 (``synced_gpus``) and LoRA students alike."""

from __future__ import annotations

import torch

from distill.generation.base import Engine


class _SharedVocabulary:
    """A logits processor: ids past the vocabulary the teacher shares (a student's padded embedding rows) are never sampled."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.vocab:
            scores[:, self.vocab :] = float("-inf")
        return scores


class HFEngine(Engine):
    kind = "hf"

    def generate(self, model, prompts, *, seed, synced=False):
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
        sample = self.cfg.temperature > 0
        # Every setting given: a model's own generation_config (top_k=50, repetition penalties) must not change what is sampled.
        config = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=sample, temperature=self.cfg.temperature if sample else None,
                                  top_p=self.cfg.top_p if sample else None, top_k=0 if sample else None, num_beams=1, use_cache=True,
                                  pad_token_id=self.pad, eos_token_id=self.eos)
        training = model.training
        model.eval()
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the training's random state is left as it was
                torch.manual_seed(seed)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced,
                                     logits_processor=LogitsProcessorList([_SharedVocabulary(self.vocab)]))
        finally:
            model.train(training)
        return [self.cut(row) for row in out[:, width:].tolist()]
