"""``ce``: the student against the task's hard labels; the teacher is not asked for anything."""

from __future__ import annotations

from distill.terms.base import TermKind


class CrossEntropy(TermKind):
    kind = "ce"
    uses_teacher = False

    @classmethod
    def build(cls, spec, key, *, loss, student, teacher, causal):
        from distill.logit_terms import CrossEntropyTerm

        return CrossEntropyTerm(spec["name"], float(spec.get("weight", 1.0)))
