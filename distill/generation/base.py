"""What every generation engine declares and does: completions of token-id prompts, sampled as
``rollout.*`` says, from the student's current weights."""

from __future__ import annotations


class Engine:
    """One way of writing completions (``rollout.engine``)."""

    kind = ""
    needs_cuda = False  # refused, in one line before step 0, where no GPU is visible

    def __init__(self, cfg, *, tokenizer, vocab: int):
        self.cfg, self.tokenizer, self.vocab = cfg, tokenizer, vocab
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def generate(self, model, prompts: list[list[int]], *, seed: int, synced: bool = False) -> list[list[int]]:
        """Each prompt's completion: up to ``rollout.max_new_tokens`` ids, ending at the first EOS (kept) when one comes.

        ``seed`` fixes the sampling (a resumed step writes what it wrote before); ``synced``: every process
        runs as many forwards as the slowest (ZeRO-3 gathers each layer's weights collectively)."""
        raise NotImplementedError

    def cut(self, ids: list[int]) -> list[int]:
        """A generated row up to and with its first EOS; the padding after it dropped."""
        if self.eos is not None and self.eos in ids:
            return ids[: ids.index(self.eos) + 1]
        return ids

    def close(self) -> None:
        """Releases what the engine holds (a vLLM engine's memory)."""
