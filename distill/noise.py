"""Third-party log lines a user cannot act on, kept off the console.

Each rule names a logger and a message pattern. ``drop`` rules are noise on every machine this
project runs on (an optional compiled kernel that falls back by itself); ``once`` rules are real
warnings that repeat per call (bitsandbytes warns on every 8-bit matmul): the first is shown,
the repeats are counted and summed up in one line at exit. Everything else passes untouched,
so a real warning is never hidden. ``DISTILL_VERBOSE=1`` turns the filter off.

Installed by every entry point (:func:`distill.errors.main_guard` and the job's ``__main__``)
before torch is imported, so the loggers carry the filter when their modules log at import.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys

# (logger name, message pattern, action)
RULES = (
    # torchao ships .so kernels built for other torch/CUDA versions and falls back without them.
    ("torchao", r"^Failed to load .*\.so", "drop"),
    # torchao registers enums that torch now handles itself; a deprecation aimed at torchao.
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported", "drop"),
    # bitsandbytes' optional CPU kernel from the `kernels` package; the built-in one is used.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community", "drop"),
    # DeepSpeed on a machine without accelerators, printed on stdout above the report.
    ("DeepSpeed", r"^Setting accelerator to CPU", "drop"),
    # Once per 8-bit matmul (thousands per evaluation): shown once.
    ("bitsandbytes.autograd._functions", r"^MatMul8bitLt: inputs will be cast", "once"),
)


class _Rule(logging.Filter):
    def __init__(self, pattern: str, action: str):
        super().__init__()
        self.pattern, self.action, self.seen = re.compile(pattern), action, 0

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        if not self.pattern.search(message):
            return True
        self.seen += 1
        return self.action == "once" and self.seen == 1


_installed: list = []


def install() -> None:
    """Attaches the rules to their loggers (idempotent)."""
    if _installed or os.environ.get("DISTILL_VERBOSE") == "1":
        return
    for name, pattern, action in RULES:
        rule = _Rule(pattern, action)
        logging.getLogger(name).addFilter(rule)
        _installed.append((name, rule))
    atexit.register(_summary)


def _summary() -> None:
    repeated = [(name, rule.seen - 1) for name, rule in _installed if rule.action == "once" and rule.seen > 1]
    for name, count in repeated:
        print(f"distill: {count} more identical warnings from {name} not shown (DISTILL_VERBOSE=1 shows them)", file=sys.stderr)
