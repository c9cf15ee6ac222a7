"""KL to the teacher: the mean over targets of KL(p_teacher || p_student) (an ``evaluate`` metric module).

A target's KL needs both full distributions (a whole vocabulary for a language model), so the
job computes it per target in float32 and this module averages those values.
"""

import datasets
import evaluate


class KLToTeacher(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean forward KL from the teacher's distribution to the student's, per target.", citation="",
            inputs_description="predictions: KL(p_teacher || p_student) of each target (nats)",
            features=datasets.Features({"predictions": datasets.Value("float64")}))

    def _compute(self, predictions):
        return {"kl_to_teacher": sum(predictions) / max(len(predictions), 1)}
