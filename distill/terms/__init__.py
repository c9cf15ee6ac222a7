"""The objective's term kinds, one file each (its typed spec, checks, what it asks of the teacher, how it builds),
looked up by ``loss.terms[i].kind``; a term of the user's own loads by path (:mod:`distill.terms.user`).

Torch-free: the config parses every spec into its kind's dataclass when it loads (:func:`parse_terms`);
the modules are built by :func:`distill.objective.build_objective`.
"""

from distill.terms.attention import Attention  # noqa: F401
from distill.terms.base import TermKind, TermSpec  # noqa: F401
from distill.terms.ce import CrossEntropy  # noqa: F401
from distill.terms.hidden import Hidden  # noqa: F401
from distill.terms.logits import Logits  # noqa: F401
from distill.terms.registry import TERMS, kind_of, parse_terms, teacher_needed  # noqa: F401
from distill.terms.user import UserTerm  # noqa: F401
