"""TensorBLEU as a Hugging Face ``evaluate`` metric.

``evaluate`` is an optional extra (``pip install "transformers-rxt[evaluate]"``): this module imports without
it (and without paying for its import); only ``TensorBLEUMetric`` and ``register_evaluate_metric`` load it.

Two ways to load the metric, both offline:

    import evaluate
    from transformers_rxt.metrics import TENSORBLEU_PATH, register_evaluate_metric

    bleu = evaluate.load(TENSORBLEU_PATH)   # by path: always works

    register_evaluate_metric()              # once per machine / HF cache
    bleu = evaluate.load("tensorbleu")      # by name (set HF_EVALUATE_OFFLINE=1 to skip the Hub lookup)

    bleu.compute(predictions=[[5, 6, 7, 8]], references=[[[5, 6, 7, 9, 8]]])
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .tensorbleu import ngram_statistics, pad_id_lists, tensor_corpus_bleu, tensor_sentence_bleu

__all__ = ["TENSORBLEU_PATH", "TensorBLEUMetric", "register_evaluate_metric"]

# The metric script `evaluate.load` reads. It is a shim that imports `TensorBLEUMetric` from this module.
TENSORBLEU_PATH = str(Path(__file__).resolve().with_name("tensorbleu") / "tensorbleu.py")

_METRIC_NAME = "tensorbleu"
_INSTALL_HINT = (
    'TensorBLEU\'s evaluate metric needs the `evaluate` package: pip install "transformers-rxt[evaluate]"'
)

_CITATION = """\
@article{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  journal={Proceedings of ACL}, year={2002}
}
@inproceedings{chen2014smoothing,
  title={A Systematic Comparison of Smoothing Techniques for Sentence-Level BLEU},
  author={Chen, Boxing and Cherry, Colin}, booktitle={Proceedings of WMT}, year={2014}
}
@article{filipek2025tensorbleu,
  title={TensorBLEU: Vectorized GPU-based BLEU Score Implementation for Per-Sentence In-Training Evaluation},
  author={Filipek, Adam}, journal={arXiv preprint arXiv:2510.05485}, year={2025}
}
"""

_DESCRIPTION = """\
TensorBLEU: BLEU on token ids, computed in batch with torch (CPU or GPU) and identical to NLTK's sentence_bleu
/ corpus_bleu on the same id lists, for NLTK's smoothing methods 0-5 and 7. Token-id BLEU depends on the
tokenizer: use it to compare models that share a tokenizer (e.g. as an in-training reward or validation
signal), and SacreBLEU on detokenized text for reportable scores.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of candidates, each a list of token ids (or a string when `tokenizer` is given).
    references: per candidate, one reference (a list of token ids) or several (a list of such lists); strings
        when `tokenizer` is given. An empty reference counts as absent.
    max_n: highest n-gram order (default 4).
    weights: one weight per order 1..max_n (default uniform).
    smoothing: NLTK SmoothingFunction method name, "method0".."method5" or "method7", or an alias "none",
        "floor", "add-k", "exp" (default "method1").
    epsilon: method1's epsilon (default 0.1).
    k: method4/method7's k (default 5).
    tokenizer: optional, turns strings into ids: an object with `encode` (Hugging Face tokenizers; called with
        add_special_tokens=False) or a callable returning a list of ids.
    device: torch device to compute on (default "cpu").
Returns:
    bleu: corpus BLEU (tensor_corpus_bleu), float in [0, 1].
    sentence_bleu: per-candidate BLEU (tensor_sentence_bleu), list of floats.
    precisions: unsmoothed corpus n-gram precisions, one per order.
    brevity_penalty, translation_length, reference_length: corpus brevity penalty and the lengths it uses.
Examples:
    >>> bleu = evaluate.load(TENSORBLEU_PATH)
    >>> bleu.compute(predictions=[[1, 2, 3, 4]], references=[[[1, 2, 3, 4]]])["bleu"]
    1.0
"""

_PAD = -1  # lists carry no padding; -1 can never be a token id, so every real id (0 included) is kept


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # encoders without that keyword
            return list(tokenizer.encode(text))
    return list(tokenizer(text))


def _to_id_lists(
    predictions: Sequence[Any], references: Sequence[Any], tokenizer: Callable | None
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Normalises inputs to ids: predictions ``[B][L]`` and references ``[B][R][L]``."""

    def as_ids(x: Any) -> list[int]:
        if isinstance(x, str):
            if tokenizer is None:
                raise ValueError("got text inputs: pass tokenizer=... to compute(), or pass token ids")
            return _encode(tokenizer, x)
        return [int(t) for t in x]

    preds = [as_ids(p) for p in predictions]
    refs = []
    for ref in references:
        # One reference is a flat list of ids (or one string); several are a list of those.
        single = isinstance(ref, str) or len(ref) == 0 or not isinstance(ref[0], (list, tuple, str))
        refs.append([as_ids(ref)] if single else [as_ids(r) for r in ref])
    return preds, refs


def compute_tensorbleu(
    predictions: Sequence[Any],
    references: Sequence[Any],
    *,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str = "method1",
    epsilon: float = 0.1,
    k: float = 5,
    tokenizer: Callable | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """What ``TensorBLEUMetric.compute`` returns, without ``evaluate`` (see the module's argument docs)."""
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references: give one reference entry "
            f"(a list of ids, or a list of such lists) per prediction"
        )
    preds, refs = _to_id_lists(predictions, references, tokenizer)
    cand, ref = pad_id_lists(preds, refs, pad_token_id=_PAD, device=device)
    options = dict(max_n=max_n, weights=weights, smoothing=smoothing, epsilon=epsilon, k=k, pad_token_id=_PAD)
    corpus = tensor_corpus_bleu(cand, ref, dtype=torch.float64, **options)
    sentences = tensor_sentence_bleu(cand, ref, dtype=torch.float64, **options)
    stats = ngram_statistics(cand, ref, max_n=max_n, pad_token_id=_PAD)
    matches = stats["matches"].sum(0).double()
    totals = stats["totals"].clamp(min=1).sum(0).double()  # NLTK's per-sentence max(1, count)
    hyp_len, ref_len = int(stats["hyp_len"].sum()), int(stats["ref_len"].sum())
    if hyp_len > ref_len:
        brevity_penalty = 1.0
    else:
        brevity_penalty = 0.0 if hyp_len == 0 else math.exp(1 - ref_len / hyp_len)
    return {
        "bleu": float(corpus),
        "sentence_bleu": sentences.tolist(),
        "precisions": (matches / totals).tolist() if len(preds) else [0.0] * max_n,
        "brevity_penalty": brevity_penalty,
        "translation_length": hyp_len,
        "reference_length": ref_len,
    }


def _build_metric_class() -> type:
    try:
        import datasets
        import evaluate
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err

    @evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
    class TensorBLEUMetric(evaluate.Metric):
        """TensorBLEU as an ``evaluate.Metric``: token-id BLEU identical to NLTK, computed with torch."""

        def _info(self) -> evaluate.MetricInfo:
            ids = datasets.Sequence(datasets.Value("int64"))
            text = datasets.Value("string")
            return evaluate.MetricInfo(
                description=_DESCRIPTION,
                citation=_CITATION,
                inputs_description=_KWARGS_DESCRIPTION,
                # Several references per prediction, or one; ids or (with a tokenizer) text.
                features=[
                    datasets.Features({"predictions": ids, "references": datasets.Sequence(ids)}),
                    datasets.Features({"predictions": ids, "references": ids}),
                    datasets.Features({"predictions": text, "references": datasets.Sequence(text)}),
                    datasets.Features({"predictions": text, "references": text}),
                ],
                reference_urls=[
                    "https://arxiv.org/abs/2510.05485",
                    "https://www.nltk.org/api/nltk.translate.bleu_score.html",
                ],
            )

        def _compute(
            self,
            predictions: list,
            references: list,
            max_n: int = 4,
            weights: Sequence[float] | None = None,
            smoothing: str = "method1",
            epsilon: float = 0.1,
            k: float = 5,
            tokenizer: Callable | None = None,
            device: torch.device | str = "cpu",
        ) -> dict[str, Any]:
            # evaluate hands over Python lists (its Arrow round trip drops tensors): make tensors again.
            return compute_tensorbleu(
                predictions,
                references,
                max_n=max_n,
                weights=weights,
                smoothing=smoothing,
                epsilon=epsilon,
                k=k,
                tokenizer=tokenizer,
                device=device,
            )

    TensorBLEUMetric.__qualname__ = (
        "TensorBLEUMetric"  # picklable by reference through the module __getattr__
    )
    return TensorBLEUMetric


_metric_class: type | None = None


def __getattr__(name: str) -> Any:
    # The class subclasses evaluate.Metric, so it is built on first access: importing this module stays cheap
    # and works without the optional `evaluate` extra.
    global _metric_class
    if name == "TensorBLEUMetric":
        if _metric_class is None:
            _metric_class = _build_metric_class()
        return _metric_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_evaluate_metric() -> Path:
    """Makes ``evaluate.load("tensorbleu")`` work offline; returns the installed script's path.

    ``evaluate`` resolves a bare name on the Hub first and then falls back to its module cache
    (``$HF_MODULES_CACHE/evaluate_modules/metrics/evaluate-metric--tensorbleu/<hash>/tensorbleu.py``, where
    ``HF_MODULES_CACHE`` defaults to ``$HF_HOME/modules``). This copies the shipped script there and marks it
    the newest version. It writes into the Hugging Face cache, so it is an explicit call, not an import side
    effect. Set ``HF_EVALUATE_OFFLINE=1`` to skip the Hub lookup (else a Hub metric of that name would win).
    """
    try:
        from evaluate.loading import init_dynamic_modules
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err

    # Same location evaluate.load uses (HF_MODULES_CACHE / HF_HOME as read when evaluate was imported).
    modules_root = Path(init_dynamic_modules())
    script = Path(TENSORBLEU_PATH).read_bytes()
    metric_dir = modules_root / "metrics" / f"evaluate-metric--{_METRIC_NAME}"
    version_dir = metric_dir / hashlib.sha256(script).hexdigest()
    version_dir.mkdir(parents=True, exist_ok=True)
    for package in (modules_root / "metrics", metric_dir, version_dir):
        (package / "__init__.py").touch(exist_ok=True)
    target = version_dir / f"{_METRIC_NAME}.py"
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(script)
    os.replace(tmp, target)  # atomic, and refreshes the mtime evaluate uses to pick the newest version
    return target
