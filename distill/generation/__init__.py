"""Generation engines (``rollout.engine``), one file each: what writes the student's completions of a
step's prompts. :data:`ENGINES` maps the kind to its class."""

from distill.generation.base import Engine  # noqa: F401
from distill.generation.hf import HFEngine
from distill.generation.vllm import VLLMEngine

ENGINES: dict[str, type[Engine]] = {engine.kind: engine for engine in (HFEngine, VLLMEngine)}
