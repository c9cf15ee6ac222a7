"""``vllm``: a vLLM engine in each training process, beside the student on its GPU (TRL's colocated
mode): built once from the student's config and tokenizer, given the student's current weights before
every step's generation (a LoRA student's adapters merged into them, ZeRO-3 shards gathered one
parameter at a time), and asked for every prompt of the step at once. CUDA only; ``pip install vllm``."""

from __future__ import annotations

import contextlib
import tempfile

from distill.generation.base import Engine


def _weights(model):
    """(name, tensor) of the student's whole weights as a plain transformers model names them."""
    import torch

    peft = hasattr(model, "merge_adapter")
    if peft:
        model.merge_adapter()
    try:
        for name, param in model.named_parameters():
            if peft:
                if "lora_" in name or "modules_to_save" in name and "original_module" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")
            gathered = contextlib.nullcontext()
            if hasattr(param, "ds_id"):  # a ZeRO-3 shard: the whole tensor, collectively, one parameter at a time
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters([param])
            with gathered, torch.no_grad():
                yield name, param.data
    finally:
        if peft:
            model.unmerge_adapter()


class VLLMEngine(Engine):
    kind = "vllm"
    needs_cuda = True

    def __init__(self, cfg, *, tokenizer, vocab):
        super().__init__(cfg, tokenizer=tokenizer, vocab=vocab)
        self.llm = self.folder = None

    def _start(self, model):
        import os

        from vllm import LLM

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.folder = tempfile.TemporaryDirectory(prefix="distill-vllm-")
        base.config.save_pretrained(self.folder.name)  # the architecture; the weights come by load_weights below
        self.tokenizer.save_pretrained(self.folder.name)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, where its weights can be set
        self.llm = LLM(model=self.folder.name, load_format="dummy", distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=self.cfg.vllm_gpu_memory_utilization, enable_prefix_caching=False,
                       dtype=str(next(base.parameters()).dtype).removeprefix("torch."),  # the student's own: greedy writes what it would
                       max_model_len=getattr(base.config, "max_position_embeddings", None), seed=0)

    def _load(self, model) -> None:
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)  # vLLM's V1 wraps the worker, V0 did not
        worker.model_runner.model.load_weights(_weights(model))
        self.llm.reset_prefix_cache()

    def generate(self, model, prompts, *, seed, synced=False):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            self._start(model)
        self._load(model)  # collective under ZeRO-3: every process gathers each parameter
        if not prompts:
            return []
        allowed = list(range(self.vocab)) if self.vocab < len(self.tokenizer) else None
        params = [SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, top_p=self.cfg.top_p, seed=seed + i,
                                 allowed_token_ids=allowed, stop_token_ids=[self.eos] if self.eos is not None else None) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [self.cut(list(out.outputs[0].token_ids)) for out in outputs]

    def close(self):
        self.llm = None
        if self.folder is not None:
            self.folder.cleanup()
