"""Metrics: TensorBLEU, exact token-id BLEU in torch (sentence and corpus level), as plain functions, an
``evaluate`` metric and a TRL reward function.

    from transformers_rxt.metrics import tensor_sentence_bleu, tensor_corpus_bleu

    scores = tensor_sentence_bleu(candidate_ids, reference_ids, pad_token_id=tokenizer.pad_token_id)

``evaluate`` is optional: ``TensorBLEUMetric`` and ``register_evaluate_metric`` import it only when used.
"""

from .evaluate_metric import TENSORBLEU_PATH, compute_tensorbleu, register_evaluate_metric
from .reward import TensorBLEUReward, tensorbleu_reward
from .tensorbleu import (
    SMOOTHING_ALIASES,
    SMOOTHING_METHODS,
    ngram_statistics,
    pad_id_lists,
    tensor_corpus_bleu,
    tensor_sentence_bleu,
)

__all__ = [
    "SMOOTHING_ALIASES",
    "SMOOTHING_METHODS",
    "TENSORBLEU_PATH",
    "TensorBLEUMetric",
    "TensorBLEUReward",
    "compute_tensorbleu",
    "ngram_statistics",
    "pad_id_lists",
    "register_evaluate_metric",
    "tensor_corpus_bleu",
    "tensor_sentence_bleu",
    "tensorbleu_reward",
]


def __getattr__(name: str):
    # `evaluate` (and `datasets` behind it) are slow to import: only pay for them when the class is used.
    if name == "TensorBLEUMetric":
        from . import evaluate_metric

        return evaluate_metric.TensorBLEUMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
