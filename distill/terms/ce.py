"""``ce``: the student against the task's hard labels; the teacher is not asked for anything."""

from __future__ import annotations

from distill.terms.base import TermKind


class CrossEntropy(TermKind):
    kind = "ce"
    uses_teacher = False

    across = True  # the student's own tokens: the same with a teacher of another tokenizer

    @classmethod
    def build_across(cls, spec, key, *, pairing):
        return cls.build(spec, key, student=None, teacher=None, causal=True)

    @classmethod
    def build(cls, spec, key, *, student, teacher, causal, stored=None):
        from distill.logit_terms import CrossEntropyTerm  # torch: the config reads the kinds without it

        return CrossEntropyTerm(spec.name, spec.weight)
