"""A term of the user's own: ``kind: path/to/file.py:Class``, a :class:`distill.logit_terms.Term` subclass (also ``distill.objective.Term``) loaded from that file.

Loading it runs the file's code, so it happens only when the objective is built (never when a config
is read), and a config read back from a run directory that names one is refused unless the user allows it.
"""

from __future__ import annotations

from pathlib import Path

from distill.config.schema import user_term
from distill.errors import ConfigError
from distill.terms.base import TermKind, check


class UserTerm(TermKind):
    kind = "path/to/file.py:Class"

    @classmethod
    def check(cls, spec, key, loss):
        path, _ = user_term(spec["kind"])
        check(Path(path).expanduser().is_file(), f"{key}.kind: the term's file {path} does not exist")

    @classmethod
    def build(cls, spec, key, *, loss, student, teacher, causal):
        import inspect

        term_class = load_class(spec["kind"], key)
        options = {k: v for k, v in spec.items() if k not in ("kind", "name", "weight")}
        try:
            inspect.signature(term_class).bind(spec["name"], float(spec.get("weight", 1.0)), **options)
        except TypeError as err:
            raise ConfigError(f"{key}: {term_class.__name__} does not take these options ({err})") from None
        return term_class(spec["name"], float(spec.get("weight", 1.0)), **options)


def load_class(kind: str, key: str) -> type:
    """The class of ``kind: path/to/file.py:Class``, imported from that file (which runs its code)."""
    import importlib.util
    import os

    from distill.logit_terms import Term

    path, name = user_term(kind)
    path = os.path.abspath(os.path.expanduser(path))
    module_spec = importlib.util.spec_from_file_location(f"distill_user_term_{abs(hash(path))}", path)
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: any error it raises while loading
        raise ConfigError(f"{key}.kind: cannot load {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    term_class = getattr(module, name, None)
    if not (isinstance(term_class, type) and issubclass(term_class, Term)):
        raise ConfigError(f"{key}.kind: {path} has no class {name} derived from distill.objective.Term")
    return term_class
