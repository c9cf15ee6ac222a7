"""``uld``: Universal Logit Distillation (Boizard et al. 2024): the L1 distance between the teacher's and the student's
probabilities each sorted in decreasing order, group by group, for a teacher of another tokenizer; no vocabulary is mapped.
The baseline of cross-tokenizer distillation (``logits`` then compares the shared vocabulary directly)."""

from __future__ import annotations

from dataclasses import dataclass

from distill.terms.base import TermKind, TermSpec, check, check_number


@dataclass
class UldSpec(TermSpec):
    temperature: float = 1.0


class Uld(TermKind):
    kind = "uld"
    Spec = UldSpec
    across = True

    @classmethod
    def check(cls, spec, key):
        check_number(spec.temperature, f"{key}.temperature", positive=True)

    @classmethod
    def build(cls, spec, key, *, student, teacher, causal, stored=None):
        check(False, f"{key}: a uld term compares a teacher and a student that tokenize differently, and these share a tokenizer; "
                     "use kind: logits")

    @classmethod
    def build_across(cls, spec, key, *, pairing):
        from distill.aligned_terms import UldTerm  # torch: the config reads the kinds without it

        return UldTerm(spec.name, spec.weight, temperature=float(spec.temperature), student_width=pairing.student_width,
                       teacher_width=pairing.teacher_width)
