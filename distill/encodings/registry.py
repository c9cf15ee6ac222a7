"""The registry of store encodings (``ENCODINGS``): ``cache-teacher --encoding`` and a store's identity name one."""

from __future__ import annotations

from distill.encodings.base import Encoding
from distill.encodings.fp16 import Fp16
from distill.encodings.quantized import Q4, Q8

ENCODINGS: dict[str, type[Encoding]] = {kind.kind: kind for kind in (Fp16, Q8, Q4)}
DEFAULT = "fp16"
