"""Stage 3: self-supervised memory-attention pre-training (training.md §3).

Without this stage a randomly initialised memory attention writes noise into the STM, and the decoder learns
to ignore its memory cross-attention. Here only the memory attention is trained, on multi-turn episodes,
to produce a memory that is a *blend* of the previous memory and the newly encoded interaction:

    for turn k (memory reset to its random init at the start of each episode):
        ED_k   = encoder(interaction_k)                       (frozen, no grad)
        new    = MemAttn(STM_{k-1}, ED_k + sigma_in * eps)
        label  = w_acc * STM_{k-1} + w_new * pool(ED_k) + sigma_label * eps'
        loss_k = -mean_{layer, slot} cos(new, label)          (+ optional c * sqrt(k+1) * MSE(new, STM_{k-1}))

``w_new`` follows the reference schedule: 0.9 at the first turn (the memory is still random), then
``0.5 - (k-1) * 0.05`` down to 0.05, with optional random jitter; ``w_acc = 1 - w_new``. The STM is detached
between turns (1-step truncation, like the reference).

**Slots vs tokens (``S != T``).** The reference mixes ``STM_{k-1}`` (S slots) and ``ED_k`` (T token
positions) element-wise, so it only works when the slot count equals the padded sequence length. Here
``pool`` maps the T token states of each row onto the S slots: slot s receives the mean of the s-th of S
contiguous, equal segments of that row's *real* (non-pad) tokens (adaptive average pooling over the
interaction; with fewer tokens than slots, consecutive slots share a token). Why this is sound:

- ``pool`` is a fixed linear map ``P`` (S x T, rows are convex weights) applied to the encoder output, with
  no learnable parameters, so the label cannot drift with (or collapse onto) the model being trained;
- the label stays a convex combination of the old memory and (averages of) encoder states, i.e. in the very
  vector space the decoder's memory cross-attention learned to read in stages 1-2, where it read ``ED`` with
  one "slot" per token; ``P ED`` is that same memory down-sampled along the sequence;
- each slot gets a *different*, local summary of the interaction (slot order follows token order), so the
  memory keeps coverage of the whole interaction instead of S copies of one mean vector;
- padding never enters a label (the reference aligns slot j with the padded position j, pads included).

The two terms are mixed at unit RMS by default (``label_normalization="rms"``): a fresh memory is N(0, 1)
while encoder states are ~100x smaller, so with raw vectors (the reference) the label is the old memory
whatever the weights say; normalised, the weights are the real proportions (the per-slot cosine loss does not
care about the label's overall scale).

When ``S == T`` and a row has no padding, ``P`` is the identity and the label is exactly the reference's.
``slot_alignment="position"`` reproduces the reference literally (slot j <-> token position j, pads
included; needs ``T <= S``, the remaining slots read zeros).

The optimizer steps once per episode batch on the mean of the per-turn losses (the reference steps once per
turn; with the per-turn detach the gradients are the same, only their accumulation differs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from ..modeling_rxt import RxTForConversationalGeneration
from .episodes import iter_turns
from .utils import (
    RxTStageModel,
    RxTStageOutput,
    RxTStageTrainer,
    cosine,
    episode_collator,
    load_rxt_model,
    resolve_stage_args,
    set_component_trainable,
)

__all__ = ["MemoryAttentionConfig", "MemoryAttentionTrainer", "RxTForMemoryAttentionTraining", "segment_pooling"]


@dataclass
class MemoryAttentionConfig(TrainingArguments):
    r"""Configuration of [`MemoryAttentionTrainer`] (stage 3). Extends `TrainingArguments`.

    Parameters:
        first_turn_new_weight (`float`, defaults to `0.9`): weight of the new data in the label at turn 0.
        new_weight_start (`float`, defaults to `0.5`), new_weight_decay (`float`, defaults to `0.05`),
        new_weight_min (`float`, defaults to `0.05`): at turn k >= 1 the new-data weight is
            `max(new_weight_min, new_weight_start - (k - 1) * new_weight_decay)`.
        label_weights (`list[float]`, *optional*): explicit new-data weight per turn (the last one repeats);
            overrides the schedule above. The accumulated memory gets `1 - w`. (Pairs that do not sum to 1
            are not needed: the cosine loss only sees the ratio of the two weights.)
        label_weights_random_factor (`float`, defaults to `0.0`): jitter: each row's new-data weight moves by
            `±U(0, 1) * factor` (the reference's `label_weights_random_factor`; its model cards use 0.15).
        input_noise (`float`, defaults to `0.0`), label_noise (`float`, defaults to `0.0`): std of Gaussian
            noise on the encoded data fed to the memory attention and on the label (reference `noise_levels`).
            Not applied in evaluation.
        stm_diff_weight (`float`, defaults to `0.0`): `c` of the memory-change penalty
            `c * sqrt(k + 1) * MSE(new, old)`.
        slot_alignment (`str`, defaults to `"segment"`): how token states map to slots in the label:
            `"segment"` (pooling, any S and T) or `"position"` (the reference: slot j = token j, needs T <= S).
        label_normalization (`str`, defaults to `"rms"`): `"rms"` scales every memory slot and every pooled
            encoder state to unit RMS before mixing them, so the weights are the real proportions of the
            label; `"none"` mixes raw vectors like the reference. (A fresh memory is N(0, 1) while encoder
            states are typically ~100x smaller, so with raw vectors the label is the old memory whatever the
            weights say.)
    """

    first_turn_new_weight: float = field(default=0.9, metadata={"help": "New-data label weight at turn 0."})
    new_weight_start: float = field(default=0.5, metadata={"help": "New-data label weight at turn 1."})
    new_weight_decay: float = field(default=0.05, metadata={"help": "Decrease of the weight per turn."})
    new_weight_min: float = field(default=0.05, metadata={"help": "Lowest new-data label weight."})
    label_weights: list[float] | None = field(
        default=None, metadata={"help": "Explicit new-data weight per turn (overrides the schedule)."}
    )
    label_weights_random_factor: float = field(default=0.0, metadata={"help": "Random jitter of the weights."})
    input_noise: float = field(default=0.0, metadata={"help": "Noise std on the memory attention's input."})
    label_noise: float = field(default=0.0, metadata={"help": "Noise std on the label."})
    stm_diff_weight: float = field(default=0.0, metadata={"help": "Memory-change penalty coefficient."})
    slot_alignment: str = field(default="segment", metadata={"help": "'segment' or 'position'."})
    label_normalization: str = field(
        default="rms", metadata={"help": "'rms': mix unit-RMS memory and encoded states; 'none': raw (reference)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all collated columns."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.slot_alignment not in ("segment", "position"):
            raise ValueError(f"slot_alignment must be 'segment' or 'position', got {self.slot_alignment!r}")
        if self.label_normalization not in ("rms", "none"):
            raise ValueError(f"label_normalization must be 'rms' or 'none', got {self.label_normalization!r}")
        weights = [self.first_turn_new_weight, self.new_weight_start, self.new_weight_min, *(self.label_weights or [])]
        if any(not 0.0 <= w <= 1.0 for w in weights):
            raise ValueError(f"label weights must be in [0, 1], got {weights}")

    def new_data_weight(self, turn: int) -> float:
        """The scheduled weight of the new data in the label at ``turn`` (0-based), before jitter."""
        if self.label_weights:
            return self.label_weights[min(turn, len(self.label_weights) - 1)]
        if turn == 0:
            return self.first_turn_new_weight
        return max(self.new_weight_min, self.new_weight_start - (turn - 1) * self.new_weight_decay)


def segment_pooling(encoded: torch.Tensor, attention_mask: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Pool per-layer token states ``[B, L, T, D]`` onto ``num_slots`` slots -> ``[B, L, S, D]``.

    Slot s is the mean of the real tokens whose rank r (0-based among the row's non-pad tokens, any padding
    side) satisfies ``floor(s n / S) <= r < ceil((s + 1) n / S)``, with n the row's real-token count: adaptive
    average pooling over the interaction. ``S == T`` without padding is the identity.
    """
    mask = attention_mask.bool()
    n = mask.sum(dim=1, keepdim=True)  # [B, 1]
    rank = mask.long().cumsum(dim=1) - 1  # [B, T]
    s = torch.arange(num_slots, device=encoded.device)[None, :]  # [1, S]
    start = torch.div(s * n, num_slots, rounding_mode="floor")  # [B, S]
    end = -torch.div(-(s + 1) * n, num_slots, rounding_mode="floor")  # ceil
    inside = (rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < end[..., None]) & mask[:, None, :]
    weights = inside.to(encoded.dtype)
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return torch.einsum("bst,bltd->blsd", weights, encoded)


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x / x.float().pow(2).mean(dim=-1, keepdim=True).sqrt().clamp(min=1e-6).to(x.dtype)


class RxTForMemoryAttentionTraining(RxTStageModel):
    """Stage 3: frozen encoder + trainable memory attention over an episode; ``forward`` returns the mean
    per-turn negative cosine loss and per-turn cosine/RMSE metrics. ``stage_args`` is a
    [`MemoryAttentionConfig`] (required: it holds the label schedule)."""

    def freeze_all_but_memory_attention(self) -> None:
        """Only the memory attention learns here; the frozen parts stay out of DDP's reducer."""
        set_component_trainable(self, ("embedding", "decoder", "encoder"), False)
        set_component_trainable(self, ("memory_attention",), True)

    def loss_item_counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """Episodes per turn (entry k: the rows that have turn k). Each turn's loss is a mean over the optimizer
        step's whole batch (all micro-batches and processes) and the loss the mean over the turns it has, so
        data parallelism and gradient accumulation give the update of one process on the concatenated batch."""
        return batch["turn_mask"].bool().sum(dim=0)

    def label_source(self, encoded: torch.Tensor, mask: torch.Tensor, slots: int) -> torch.Tensor:
        if self.stage_args.slot_alignment == "segment":
            return segment_pooling(encoded, mask, slots)
        length = encoded.shape[2]
        if length > slots:
            raise ValueError(
                f"slot_alignment='position' (the reference) needs interactions of at most stm_size={slots} "
                f"tokens, got {length}; use slot_alignment='segment' for any length"
            )
        return torch.nn.functional.pad(encoded, (0, 0, 0, slots - length))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        turn_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        num_items_in_batch: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RxTStageOutput:
        """The mean over turns of the rows' negative cosine to their labels (plus the memory-change term).
        With ``num_items_in_batch`` (the :meth:`loss_item_counts` of the optimizer step's whole batch, from the
        trainer) it is this batch's share of the whole batch's loss: per turn the sum over this batch's rows
        divided by that turn's total, and the mean over the turns the whole batch has."""
        args = self.stage_args
        if not isinstance(args, MemoryAttentionConfig):
            raise TypeError("RxTForMemoryAttentionTraining needs stage_args=MemoryAttentionConfig(...) (its label "
                            f"schedule), got {type(args).__name__}")
        batch = input_ids.shape[0]
        noisy = self.training
        stm = self.initial_memory_tensor(batch, generator=generator)  # differentiable when learned
        losses, metrics = [], {}
        for turn in iter_turns(input_ids, attention_mask, turn_mask):
            k, ids_k, mask_k, valid = turn.index, turn.input_ids, turn.attention_mask, turn.valid
            with torch.no_grad():
                encoded, _ = self.encode(ids_k, mask_k)
            old = stm.detach()
            w_new = torch.full((batch,), args.new_data_weight(k), device=old.device)
            if noisy and args.label_weights_random_factor > 0:
                delta = torch.rand(batch, generator=generator, device=old.device) * args.label_weights_random_factor
                sign = torch.where(torch.rand(batch, generator=generator, device=old.device) < 0.5, 1.0, -1.0)
                w_new = (w_new + sign * delta).clamp(0.0, 1.0)
            w_new = w_new.to(old.dtype)[:, None, None, None]
            inputs = encoded
            if noisy and args.input_noise > 0:
                inputs = encoded + args.input_noise * torch.randn(
                    encoded.shape, generator=generator, device=encoded.device, dtype=encoded.dtype
                )
            written = self.memory_attention(old, inputs, mask_k)
            fifo = self.memory_attention.fifo_write_slots
            if fifo is not None:
                # A FIFO write fills `fifo` fresh slots and only shifts the others: the label of the fresh slots
                # is the interaction pooled onto them (they hold nothing to blend with); the shifted slots are
                # copies and need none. (Against the blend of all S slots, the fresh slots' label was the first
                # fifo/S of the interaction mixed with the slots the write had just dropped.)
                new, reference = written[:, :, :fifo], old[:, :, :fifo]
                label = self.label_source(encoded, mask_k, fifo)
                if args.label_normalization == "rms":
                    label = _unit_rms(label)
            else:
                new, reference = written, old
                source = self.label_source(encoded, mask_k, old.shape[2])
                if args.label_normalization == "rms":
                    label = (1 - w_new) * _unit_rms(old) + w_new * _unit_rms(source)
                else:
                    label = (1 - w_new) * old + w_new * source
            if noisy and args.label_noise > 0:
                label = label + args.label_noise * torch.randn(
                    label.shape, generator=generator, device=label.device, dtype=label.dtype
                )
            cos = cosine(new, label.detach()).mean(dim=(1, 2))  # [B]
            weight = valid.to(cos.dtype)
            rows = weight.sum() if num_items_in_batch is None else num_items_in_batch[k]
            loss_k = -(cos * weight).sum() / rows
            diff = (new.float() - reference.float()).pow(2).mean(dim=(1, 2, 3))  # [B]
            if args.stm_diff_weight > 0:
                loss_k = loss_k + args.stm_diff_weight * math.sqrt(k + 1) * (diff * weight).sum() / rows
            losses.append(loss_k)
            with torch.no_grad():
                metrics[f"cosine_turn_{k}"] = (cos * weight).sum() / weight.sum()
                metrics[f"memory_rmse_turn_{k}"] = ((diff.sqrt() * weight).sum() / weight.sum())
            stm = torch.where(valid[:, None, None, None], written.detach(), old)
        losses = torch.stack(losses)
        loss = losses.mean() if num_items_in_batch is None else losses.sum() / (num_items_in_batch > 0).sum()
        with torch.no_grad():
            cosines = [v for k, v in metrics.items() if k.startswith("cosine_turn_")]
            rmses = [v for k, v in metrics.items() if k.startswith("memory_rmse_turn_")]
            summary = {"cosine": torch.stack(cosines).mean(), "memory_rmse": torch.stack(rmses).mean()}
        return RxTStageOutput(loss=loss, metrics={**summary, **metrics})


class MemoryAttentionTrainer(RxTStageTrainer):
    """Stage-3 trainer: self-supervised memory-attention pre-training on multi-turn episodes.

    Args:
        model: an `RxTForConversationalGeneration` (typically the stage-2 output), or a path/Hub id.
        args: a [`MemoryAttentionConfig`].
        train_dataset / eval_dataset: episodes tokenized with `tokenize_mrl_dataset` (column
            `turn_input_ids`), collated by `DataCollatorForRxTEpisodes` (the default collator).
        processing_class: the RxT tokenizer (saved with the model).

    Only the memory attention is trained (the encoder runs without gradient). Logs `cosine`, `memory_rmse`
    (RMS change of the memory per turn) and their per-turn values `cosine_turn_k`, `memory_rmse_turn_k`.
    """

    rxt_stage = "memory-attention-pretraining"  # the stage name in the model card's training table

    def __init__(
        self,
        model: RxTForConversationalGeneration | str | os.PathLike,
        args: MemoryAttentionConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ):
        args = resolve_stage_args(args, MemoryAttentionConfig, "rxt-output-memattn")
        if isinstance(model, (str, os.PathLike)):
            model = load_rxt_model(model)
        data_collator = episode_collator(data_collator, processing_class, model)
        stage_model = RxTForMemoryAttentionTraining.from_rxt(model, args)
        stage_model.freeze_all_but_memory_attention()
        super().__init__(
            model=stage_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            processing_class=processing_class,
            **kwargs,
        )
