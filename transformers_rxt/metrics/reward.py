"""BLEU rewards for reinforcement learning, computed with TensorBLEU on the device.

Two forms:

* ``tensorbleu_reward(completion_ids, reference_ids, ...)``: tensors in, a ``[B]`` float tensor out, on the
  inputs' device. For trainers that hold padded id tensors already (e.g. the RxT memory RL loop).
* ``TensorBLEUReward(...)``: a callable with TRL's reward-function signature
  ``fn(prompts, completions, completion_ids, **dataset_columns) -> list[float | None]``, for ``GRPOTrainer`` /
  ``RLOOTrainer(reward_funcs=[...])``. The reference answer(s) come from a dataset column (ids or text).

The original RxT MRL reward used BLEU-2 with NLTK's method4 (``max_n=2, smoothing="method4"``); the defaults
here are BLEU-4 with method1, like ``tensor_sentence_bleu``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .tensorbleu import pad_id_lists, tensor_sentence_bleu

__all__ = ["TensorBLEUReward", "tensorbleu_reward"]

# Keyword arguments TRL adds next to the dataset columns.
_TRL_EXTRA_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")
_PAD = -1  # pad id used internally for masked or list inputs: never a real token id


def tensorbleu_reward(
    completion_ids: torch.Tensor,
    reference_ids: torch.Tensor,
    *,
    completion_mask: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
    pad_token_id: int = 0,
    ignore_token_ids: Iterable[int] = (),
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str = "method1",
    epsilon: float = 0.1,
    k: float = 5,
    scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample BLEU reward, tensor in / tensor out, on the inputs' device.

    Args:
        completion_ids: ``[B, Lc]`` generated ids.
        reference_ids: ``[B, Lr]`` or ``[B, R, Lr]`` reference answer ids.
        completion_mask / reference_mask: optional 0/1 masks of the same shapes (e.g. attention masks); masked
            positions are ignored, so the pad id may also be a real token elsewhere.
        pad_token_id: ignored id when no mask is given.
        ignore_token_ids: ids dropped from both sides before scoring (e.g. EOS or other special tokens).
        max_n, weights, smoothing, epsilon, k: as in :func:`tensor_sentence_bleu`.
        scale: multiplies the score (e.g. 10 for a 0-10 reward).

    Returns:
        ``[B]`` float32 rewards on the inputs' device.
    """
    ignore = list(ignore_token_ids)
    if completion_mask is not None or reference_mask is not None or ignore:
        # Everything to skip becomes -1, which no real id can equal.
        completion_ids = _mask_out(completion_ids, completion_mask, pad_token_id, ignore)
        reference_ids = _mask_out(reference_ids, reference_mask, pad_token_id, ignore)
        pad_token_id = _PAD
    scores = tensor_sentence_bleu(
        completion_ids,
        reference_ids,
        max_n=max_n,
        weights=weights,
        smoothing=smoothing,
        epsilon=epsilon,
        k=k,
        pad_token_id=pad_token_id,
    )
    return scores * scale if scale != 1.0 else scores


def _mask_out(
    ids: torch.Tensor, mask: torch.Tensor | None, pad_token_id: int, ignore: list[int]
) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        return ids  # let tensor_sentence_bleu raise its descriptive error
    drop = ids == pad_token_id if mask is None else mask.to(ids.device) == 0
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match ids shape {tuple(ids.shape)}")
    if ignore:
        drop = drop | torch.isin(ids, torch.tensor(ignore, dtype=ids.dtype, device=ids.device))
    return ids.long().masked_fill(drop, _PAD)


class TensorBLEUReward:
    """TRL reward function: BLEU of each completion against the reference answer(s) in a dataset column.

    Usage with TRL::

        reward = TensorBLEUReward(reference_column="answer", tokenizer=tokenizer)
        trainer = GRPOTrainer(model=..., reward_funcs=[reward], train_dataset=dataset, ...)

    The column holds, per example, token ids (a list of ints), several references (a list of such lists), or
    text (a string or list of strings, encoded with ``tokenizer``). ``completion_ids`` (passed by TRL) are
    scored directly, so the completion is never re-tokenized. Examples whose reference is ``None`` get
    ``None`` (TRL treats it as "no reward from this function").

    Args:
        reference_column: dataset column with the reference answer(s).
        tokenizer: needed only for text references; anything with ``encode`` (called with
            ``add_special_tokens=False``) or a callable returning ids.
        ignore_token_ids: ids dropped from both sides (e.g. ``[tokenizer.eos_token_id]``).
        device: where to compute; default CUDA when available, else CPU.
        name: the name TRL logs the reward under (``rewards/<name>/mean``).
        max_n, weights, smoothing, epsilon, k, scale: as in :func:`tensorbleu_reward`.
    """

    def __init__(
        self,
        reference_column: str = "reference_ids",
        *,
        tokenizer: Any = None,
        ignore_token_ids: Iterable[int] = (),
        max_n: int = 4,
        weights: Sequence[float] | None = None,
        smoothing: str = "method1",
        epsilon: float = 0.1,
        k: float = 5,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        name: str = "tensorbleu",
    ) -> None:
        self.reference_column = reference_column
        self.tokenizer = tokenizer
        self.ignore_token_ids = [int(t) for t in ignore_token_ids if t is not None]
        self.options = dict(
            max_n=max_n, weights=weights, smoothing=smoothing, epsilon=epsilon, k=k, scale=scale
        )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.__name__ = name  # TRL names reward columns after `__name__`

    def _ids(self, x: Any) -> list[int]:
        if isinstance(x, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"column {self.reference_column!r} holds text: pass tokenizer=... to TensorBLEUReward"
                )
            if hasattr(self.tokenizer, "encode"):
                return list(self.tokenizer.encode(x, add_special_tokens=False))
            return list(self.tokenizer(x))
        if isinstance(x, torch.Tensor):
            return x.tolist()
        return [int(t) for t in x]

    def _references(self, entry: Any) -> list[list[int]] | None:
        if entry is None:
            return None
        if isinstance(entry, torch.Tensor):
            entry = entry.tolist()
        single = (
            isinstance(entry, str)
            or len(entry) == 0
            or not isinstance(entry[0], (list, tuple, str, torch.Tensor))
        )
        return [self._ids(entry)] if single else [self._ids(r) for r in entry]

    def __call__(
        self,
        prompts: list | None = None,
        completions: list | None = None,
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if completion_ids is None:
            raise ValueError(
                "TensorBLEUReward scores token ids: call it with completion_ids (TRL passes them)"
            )
        if self.reference_column not in kwargs:
            raise KeyError(
                f"reference column {self.reference_column!r} not found; the dataset has "
                f"{sorted(k for k in kwargs if k not in _TRL_EXTRA_KWARGS)}"
                f". Pass TensorBLEUReward(reference_column=...)."
            )
        references = [self._references(r) for r in kwargs[self.reference_column]]
        if len(references) != len(completion_ids):
            raise ValueError(f"{len(completion_ids)} completions but {len(references)} reference entries")
        completions_ = [self._ids(c) for c in completion_ids]
        present = [r is not None for r in references]
        refs = [r if r is not None else [] for r in references]
        cand, ref = pad_id_lists(completions_, refs, pad_token_id=_PAD, device=self.device)
        scores = tensorbleu_reward(
            cand, ref, pad_token_id=_PAD, ignore_token_ids=self.ignore_token_ids, **self.options
        ).tolist()
        return [s if ok else None for s, ok in zip(scores, present)]
