"""Evaluation metrics as ``evaluate`` modules, shipped in this package and loaded by path (offline).

``evaluate.load("accuracy")`` fetches the metric's code from the Hugging Face hub; the modules
here need nothing but the installed package. :func:`load` also takes a user's metric from
``eval.metrics``: a path to a module file or folder, or a hub name (online).
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import ConfigError

SHIPPED = {path.stem: path for path in Path(__file__).parent.glob("*.py") if path.stem != "__init__"}
_LOADED: dict = {}


def code_named(names) -> list[str]:
    """The entries of ``eval.metrics`` that run code not shipped with this package (a module file, or a hub metric's script)."""
    return [name for name in names if name not in SHIPPED]


def load(name: str):
    """The ``evaluate`` metric ``name``: a shipped one, a module path, or a hub name (cached per process)."""
    if name not in _LOADED:
        import evaluate  # start-up time: evaluate loads only when this runs

        target = str(SHIPPED.get(name, name))
        try:
            _LOADED[name] = evaluate.load(target)
        except Exception as err:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ...
            hint = " (a hub metric needs the network; pass the path of a metric module to run offline)" if name not in SHIPPED and not Path(name).exists() else ""
            raise ConfigError(f"eval.metrics: cannot load metric {name!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}{hint}") from None
    return _LOADED[name]


def compute(name: str, **inputs) -> dict:
    return load(name).compute(**inputs)
