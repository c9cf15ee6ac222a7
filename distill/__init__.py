"""distill: knowledge distillation of causal language models.

Import submodules directly (``distill.losses``, ``distill.job``); this package imports nothing
heavy so that the ``distill`` command starts fast.
"""

__version__ = "0.1.0"
