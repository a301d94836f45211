# Metric script for `evaluate.load(TENSORBLEU_PATH)` / `evaluate.load("tensorbleu")`: evaluate copies this
# file into its module cache and instantiates the first `evaluate.Metric` subclass it finds here. The
# implementation lives in the installed package, so this shim never goes stale.
from transformers_rxt.metrics.evaluate_metric import TensorBLEUMetric

__all__ = ["TensorBLEUMetric"]
