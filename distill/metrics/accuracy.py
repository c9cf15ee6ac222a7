"""Accuracy: the fraction of predictions equal to their references (an ``evaluate`` metric module).

Used for a classifier's accuracy and a masked LM's masked-token accuracy; loaded by path, so it
works offline.
"""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their references.", citation="", inputs_description="predictions, references: class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / max(len(references), 1)}
