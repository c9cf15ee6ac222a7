"""Macro-F1: the unweighted mean over classes of F1 (an ``evaluate`` metric module).

Averaged over the classes that occur as a reference or a prediction, with F1 = 0 for a class
never predicted correctly (scikit-learn's ``f1_score(average="macro", zero_division=0)`` over
the labels present).
"""

from collections import Counter

import datasets
import evaluate


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Unweighted mean of per-class F1.", citation="", inputs_description="predictions, references: class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        hits = Counter(r for p, r in zip(predictions, references) if p == r)
        gold, predicted = Counter(references), Counter(predictions)
        classes = set(gold) | set(predicted)
        f1 = [2 * hits[c] / (gold[c] + predicted[c]) for c in classes]
        return {"macro_f1": sum(f1) / len(f1) if f1 else 0.0}
