"""Top-1 agreement: how often the student's most likely target is the teacher's (an ``evaluate`` metric module)."""

import datasets
import evaluate


class Top1Agreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of targets where the student's argmax equals the teacher's.", citation="",
            inputs_description="predictions: the student's argmax ids; references: the teacher's",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"top1_agreement": sum(int(p == r) for p, r in zip(predictions, references)) / max(len(references), 1)}
