"""The episode engine: what every multi-turn stage does with a batch of episodes, written once.

An episode batch holds ``input_ids`` / ``attention_mask`` (and ``labels``) of shape [B, N, T]: N turns of one
interaction per row, right-padded, with ``turn_mask`` [B, N] marking the turns a row really has (episodes of
one batch may have different lengths). The memory runs turn-synchronously over the batch:

- :func:`iter_turns` walks the turns, each cut to the columns its longest row uses, and stops at the first
  turn no row has;
- :func:`compute_memory_update` writes one interaction per row into the memory, only for the rows a row mask
  selects (the other rows keep their memory);
- :func:`sequence_log_probs` is the log-probability of the label tokens of a decoder pass, per token and summed
  per row (the one log-prob helper: IMPO's policy, reference and rollout log-probs, DMPO's answer scores and
  the evaluation's forced choices all come from it).

Stages 3 (:mod:`.memory_attention`) and 4 (:mod:`.memory_aware`) walk their episodes with :func:`iter_turns`
(stage 4 visits one boundary more: the review question asked after an episode's last turn) and stage 4 writes
turns and system prompts with :func:`compute_memory_update`; stage 5's IMPO rollout (:mod:`.impo`) walks the
saved interaction and the follow-ups with :func:`iter_turns`, and IMPO's training forward, the rollout and DMPO
(:mod:`.dmpo`) write their memories with :func:`compute_memory_update`; the evaluation (:mod:`.evaluation`)
scores answers with :func:`sequence_log_probs` and writes its forced-choice memories with
:func:`compute_memory_update`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Turn", "compute_memory_update", "iter_turns", "sequence_log_probs", "trim_padding"]


def trim_padding(attention_mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``attention_mask`` [B, T] and ``tensors`` (each [B, T, ...]) cut to the columns the longest row uses (at
    least one): right padding every row has costs compute and changes nothing."""
    used = max(int(attention_mask.sum(dim=1).max()), 1)
    return (attention_mask[:, :used], *(t[:, :used] for t in tensors))


@dataclass
class Turn:
    """Turn ``index`` of an episode batch: its interactions cut by :func:`trim_padding`, the rows that have it
    (``valid``, bool [B]) and, when the batch has labels, its labels (cut the same way)."""

    index: int
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor | None = None


def iter_turns(input_ids: torch.Tensor, attention_mask: torch.Tensor, turn_mask: torch.Tensor,
               labels: torch.Tensor | None = None) -> Iterator[Turn]:
    """The turns of an episode batch ([B, N, T] tensors, ``turn_mask`` [B, N]) in order, up to the last turn
    any row has (episodes end at their first missing turn)."""
    for k in range(input_ids.shape[1]):
        valid = turn_mask[:, k].bool()
        if not bool(valid.any()):
            return
        if labels is None:
            mask, ids = trim_padding(attention_mask[:, k], input_ids[:, k])
            yield Turn(k, ids, mask, valid)
        else:
            mask, ids, turn_labels = trim_padding(attention_mask[:, k], input_ids[:, k], labels[:, k])
            yield Turn(k, ids, mask, valid, turn_labels)


def compute_memory_update(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, memory: torch.Tensor,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
    """The memory after ``model`` (an RxT model) reads one interaction per row, for the rows ``rows`` (bool [B])
    selects; the others keep their memory (their interaction is padding: a finished episode, a turn without a
    system prompt). Only the selected rows run through the encoder and memory attention, cut to the columns the
    batch's longest interaction uses (:func:`trim_padding`). Differentiable."""
    attention_mask, input_ids = trim_padding(attention_mask, input_ids)
    if rows is None or bool(rows.all()):
        return model.compute_memory_update(input_ids, attention_mask, memory)
    index = rows.nonzero().flatten()
    new = model.compute_memory_update(input_ids[index], attention_mask[index], memory[index])
    return memory.index_copy(0, index, new)


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Log-probabilities of the label tokens of a causal LM pass: ``logits`` [B, T, V] predict ``labels`` [B, T]
    shifted by one (-100: not scored). Returns (per-token log-probs [B, T - 1], 0 where not scored; the number
    of scored tokens per row [B]); their row sums are the sequence log-probs. ``shift=False``: the logits are
    already aligned with their targets (position t predicts ``labels[:, t]``, as in TRL's completion log-probs),
    and the per-token log-probs are [B, T].

    Computed as ``logit[label] - logsumexp(logits)`` in fp32 (TRL's ``selective_log_softmax``): the [B, T, V]
    log-softmax is never materialised, and IMPO's log-probs are TRL's to the bit."""
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match the logits' positions {tuple(logits.shape[:2])}")
    targets = labels[:, 1:] if shift else labels
    scored = targets != -100
    logits = (logits[:, :-1] if shift else logits).float()
    token = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    return token * scored, scored.sum(dim=1)
