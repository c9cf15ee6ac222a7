"""A term of the user's own: ``kind: path/to/file.py:Class``, a :class:`distill.logit_terms.Term` subclass (also ``distill.objective.Term``) loaded from that file.

Loading it runs the file's code, so it happens only when the objective is built (never when a config
is read), and a config read back from a run directory that names one is refused unless the user allows it.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path

from distill.term_names import user_term
from distill.errors import ConfigError
from distill.terms.base import TermKind, TermSpec, check


@dataclass
class UserTermSpec(TermSpec):
    options: dict = field(default_factory=dict)  # the spec's other keys: the class's keyword arguments, checked when it is built


class UserTerm(TermKind):
    kind = "path/to/file.py:Class"
    Spec = UserTermSpec

    @classmethod
    def parse(cls, mapping, key, loss):
        common = {k: mapping[k] for k in ("kind", "name", "weight") if k in mapping}
        return super().parse({**common, "options": {k: v for k, v in mapping.items() if k not in common}}, key, loss)

    @classmethod
    def check(cls, spec, key):
        path, _ = user_term(spec.kind)
        check(Path(path).expanduser().is_file(), f"{key}.kind: the term's file {path} does not exist")

    @classmethod
    def build(cls, spec, key, *, student, teacher, causal, stored=None):
        term_class = load_class(spec.kind, key)
        try:
            inspect.signature(term_class).bind(spec.name, spec.weight, **spec.options)
        except TypeError as err:
            raise ConfigError(f"{key}: {term_class.__name__} does not take these options ({err})") from None
        return term_class(spec.name, spec.weight, **spec.options)


def load_class(kind: str, key: str) -> type:
    """The class of ``kind: path/to/file.py:Class``, imported from that file (which runs its code)."""
    from distill.logit_terms import Term  # torch: the config reads the kinds without it

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
