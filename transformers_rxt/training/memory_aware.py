"""Stage 4: supervised memory-aware training, SMAT (training.md §4).

The first stage where the decoder reads a *real* memory. For an episode of turns I_0 .. I_{N-1}:

    STM_0 = random init                    (the memory a new conversation starts with)
    turn 0: decoder answers I_0 from STM_0
    turn k: STM_k = MemAttn(STM_{k-1}, encoder(I_{k-1}))      encode the previous interaction, update
            decoder answers I_k from STM_k (teacher forcing, loss on the answer side only)

The loss is the mean of the per-turn answer losses; all of it runs inside one ``forward`` (DDP-safe) with one
backward and one optimizer step per batch of episodes. In training each turn's loss is a token mean over the
optimizer step's whole batch (all micro-batches, all processes: ``loss_item_counts``), so data parallelism and
gradient accumulation give the update of one process on the concatenated batch.

Gradient through the memory (``backprop_turns``): ``1`` detaches the STM before every update, so turn k's
loss trains the memory attention and encoder only through the update that consumed I_{k-1} (the reference);
``k > 1`` lets each loss reach back through up to k updates (truncated BPTT); ``0`` backpropagates through
the whole episode (the paper's description).

Gradual unfreezing (decoder, then memory attention, then encoder): the optimizer always holds every
parameter, in named groups per component (``embedding``, ``decoder``, ``memory_attention``, ``encoder``).
A frozen component has ``requires_grad=False`` (no backward compute) in single-process runs; under DDP all
parameters keep ``requires_grad=True`` (DDP fixes the set of synchronised parameters when it wraps the model,
so a parameter frozen then would never be synchronised after unfreezing) and the frozen ones' gradients are
dropped after backward. Either way a frozen parameter has no gradient at the optimizer step, so AdamW does
not touch it (no update, no weight decay, no state); once unfrozen it is updated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from ..modeling_rxt import RxTForConversationalGeneration
from .utils import (
    COMPONENTS,
    RxTStageModel,
    RxTStageOutput,
    RxTStageTrainer,
    component_of,
    episode_collator,
    load_rxt_model,
    resolve_stage_args,
    set_component_trainable,
)

__all__ = ["GradualUnfreezeCallback", "MemoryAwareConfig", "MemoryAwareTrainer", "RxTForMemoryAwareTraining"]


@dataclass
class MemoryAwareConfig(TrainingArguments):
    r"""Configuration of [`MemoryAwareTrainer`] (stage 4). Extends `TrainingArguments`.

    Parameters:
        backprop_turns (`int`, defaults to `1`): how many memory updates each turn's loss backpropagates
            through: 1 = detach the memory before every update (the reference), k = truncated BPTT over k
            updates, 0 = the whole episode (the paper).
        train_first_turn (`bool`, defaults to `True`): also train turn 0, answered from the initial memory.
        unfreeze_memory_attention_epoch (`float`, defaults to `0.0`), unfreeze_encoder_epoch (`float`,
            defaults to `0.0`): (fractional) epoch from which the memory attention / encoder are trained; 0 =
            from the start (reference `unfreeze_epochs`).
        unfreeze_memory_attention_step (`int`, *optional*), unfreeze_encoder_step (`int`, *optional*): the same
            in optimizer steps; when set they take precedence over the epochs.
        train_only_decoder (`bool`, defaults to `False`): never train the memory attention and encoder.
        freeze_embeddings (`bool`, defaults to `False`): keep the shared token embedding frozen.
        memory_attention_learning_rate (`float`, *optional*), encoder_learning_rate (`float`, *optional*):
            learning rates of those components (default `learning_rate`).
        moe_aux_loss_weight (`float`, *optional*): MoE load-balancing weight (None: the model config's).
    """

    backprop_turns: int = field(default=1, metadata={"help": "Memory updates per loss in backprop (0 = all)."})
    train_first_turn: bool = field(default=True, metadata={"help": "Train turn 0 (random memory) too."})
    unfreeze_memory_attention_epoch: float = field(default=0.0, metadata={"help": "Epoch to unfreeze mem-attn."})
    unfreeze_encoder_epoch: float = field(default=0.0, metadata={"help": "Epoch to unfreeze the encoder."})
    unfreeze_memory_attention_step: int | None = field(default=None, metadata={"help": "Step to unfreeze mem-attn."})
    unfreeze_encoder_step: int | None = field(default=None, metadata={"help": "Step to unfreeze the encoder."})
    train_only_decoder: bool = field(default=False, metadata={"help": "Never train mem-attn and encoder."})
    freeze_embeddings: bool = field(default=False, metadata={"help": "Keep the token embedding frozen."})
    memory_attention_learning_rate: float | None = field(default=None, metadata={"help": "Mem-attn LR."})
    encoder_learning_rate: float | None = field(default=None, metadata={"help": "Encoder LR."})
    moe_aux_loss_weight: float | None = field(default=None, metadata={"help": "MoE aux loss weight."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all collated columns."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backprop_turns < 0:
            raise ValueError(f"backprop_turns must be >= 0 (0 = whole episode), got {self.backprop_turns}")

    def trainable_components(self, step: int, epoch: float) -> set[str]:
        """Which components train at optimizer step ``step`` / epoch ``epoch`` (the unfreeze schedule)."""
        out = {"decoder"} if self.freeze_embeddings else {"decoder", "embedding"}
        if self.train_only_decoder:
            return out
        for name, at_step, at_epoch in (
            ("memory_attention", self.unfreeze_memory_attention_step, self.unfreeze_memory_attention_epoch),
            ("encoder", self.unfreeze_encoder_step, self.unfreeze_encoder_epoch),
        ):
            if (step >= at_step) if at_step is not None else (epoch >= at_epoch):
                out.add(name)
        return out


def _take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


class RxTForMemoryAwareTraining(RxTStageModel):
    """Stage 4: the full RxT model over a batch of episodes; ``forward`` returns the mean per-turn answer loss.
    ``stage_args`` (a [`MemoryAwareConfig`]) sets ``backprop_turns``, ``train_first_turn`` and the MoE weight
    (defaults without)."""

    def loss_item_counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """Answer tokens per turn that the loss trains on (shifted labels), [turns]: the per-turn loss is a token
        mean over the whole step's batch, and the loss the mean over turns that have answer tokens in it."""
        counts = (batch["labels"][:, :, 1:] != -100).sum(dim=(0, 2))
        if not self.stage_arg("train_first_turn", True):
            counts[0] = 0
        return counts

    def _update(self, stm: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Write one interaction per valid row into the memory; rows without one keep their memory."""
        used = max(int(mask.sum(dim=1).max()), 1)
        ids, mask = ids[:, :used], mask[:, :used]
        if bool(valid.all()):
            return self.compute_memory_update(ids, mask, stm)
        rows = valid.nonzero().flatten()
        new = self.compute_memory_update(ids[rows], mask[rows], stm[rows])
        return stm.index_copy(0, rows, new)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        labels: torch.LongTensor,
        turn_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        system_input_ids: torch.LongTensor | None = None,
        system_attention_mask: torch.Tensor | None = None,
        has_system: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RxTStageOutput:
        """The mean per-turn answer loss of the episodes. With ``num_items_in_batch`` (the
        :meth:`loss_item_counts` of the optimizer step's whole batch, from the trainer) it is this batch's share
        of the whole batch's loss: per turn the sum of token losses over that turn's total."""
        batch, turns, _ = input_ids.shape
        backprop = self.stage_arg("backprop_turns", 1)
        train_first_turn = self.stage_arg("train_first_turn", True)
        aux_weight = self.stage_arg("moe_aux_loss_weight", self.config.router_aux_loss_coef)
        stm = self.initial_memory_tensor(batch, generator=generator)  # differentiable when learned
        if system_input_ids is not None and has_system is not None and bool(has_system.any()):
            stm = self._update(stm, system_input_ids, system_attention_mask, has_system.bool())
        losses, metrics, hits, count = [], {}, 0.0, 0
        for k in range(turns):
            valid = turn_mask[:, k].bool()
            if not bool(valid.any()):
                break
            if k > 0:
                if backprop > 0 and (k - 1) % backprop == 0:
                    stm = stm.detach()
                stm = self._update(stm, input_ids[:, k - 1], attention_mask[:, k - 1], turn_mask[:, k - 1].bool())
            if k == 0 and not train_first_turn:
                continue
            labels_k = labels[:, k]
            if not bool((labels_k[:, 1:] != -100).any()):  # none to predict (shifted)
                continue
            rows = None if bool(valid.all()) else valid.nonzero().flatten()
            used = max(int(attention_mask[:, k].sum(dim=1).max()), 1)
            lab = _take_rows(labels_k[:, :used], rows)
            local = int((lab[:, 1:] != -100).sum())
            share = 1.0 if num_items_in_batch is None else local / num_items_in_batch[k]  # of the turn's tokens
            out = super().forward(  # the decoder pass of the RxT model itself
                input_ids=_take_rows(input_ids[:, k, :used], rows),
                attention_mask=_take_rows(attention_mask[:, k, :used], rows),
                stm=_take_rows(stm, rows),
                labels=lab,
                num_items_in_batch=None if num_items_in_batch is None else num_items_in_batch[k],
            )
            loss_k = out.lm_loss
            if out.aux_loss is not None and self.training:
                loss_k = loss_k + aux_weight * share * out.aux_loss
            losses.append(loss_k)
            with torch.no_grad():
                keep = lab[:, 1:] != -100
                hits += float((out.logits[:, :-1].argmax(-1)[keep] == lab[:, 1:][keep]).sum())
                count += local
                metrics[f"loss_turn_{k}"] = out.lm_loss.detach() / share  # this batch's token mean
        if not losses:
            raise ValueError("no turn of this batch has answer labels to train on")
        if num_items_in_batch is None:
            loss = torch.stack(losses).mean()
        else:  # the mean over the turns the whole batch trains
            loss = torch.stack(losses).sum() / (num_items_in_batch > 0).sum()
        metrics["answer_accuracy"] = hits / max(count, 1)
        return RxTStageOutput(loss=loss, metrics=metrics)


class GradualUnfreezeCallback(TrainerCallback):
    """Applies [`MemoryAwareConfig`]'s unfreeze schedule at the start of training and of every step."""

    def __init__(self, trainer: MemoryAwareTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # FSDP replaces the parameters when it wraps the model: collect the frozen ones again
        self.trainer.apply_unfreeze_schedule(refresh=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.apply_unfreeze_schedule()


class MemoryAwareTrainer(RxTStageTrainer):
    """Stage-4 trainer: supervised memory-aware training on multi-turn episodes.

    Args:
        model: an `RxTForConversationalGeneration` (typically the stage-3 output), or a path/Hub id.
        args: a [`MemoryAwareConfig`].
        train_dataset / eval_dataset: episodes tokenized with `tokenize_mrl_dataset`, collated by
            `DataCollatorForRxTEpisodes` (the default).
        processing_class: the RxT tokenizer (saved with the model).

    Logs `loss_turn_k` (the answer loss of turn k), `answer_accuracy`, and `trainable_parameters`.
    `trainable_components` is the current set of trained components.
    """

    rxt_stage = "supervised-memory-aware"  # the stage name in the model card's training table

    def __init__(
        self,
        model: RxTForConversationalGeneration | str | os.PathLike,
        args: MemoryAwareConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        **kwargs: Any,
    ):
        args = resolve_stage_args(args, MemoryAwareConfig, "rxt-output-smat")
        if isinstance(model, (str, os.PathLike)):
            model = load_rxt_model(model)
        data_collator = episode_collator(data_collator, processing_class, model)
        module = RxTForMemoryAwareTraining.from_rxt(model, args)
        # Components that are never trained are frozen for good (also under DDP, before wrapping).
        never = set(COMPONENTS) - args.trainable_components(step=10**18, epoch=float("inf"))
        set_component_trainable(module, COMPONENTS, True)
        set_component_trainable(module, never, False)
        self.trainable_components: set[str] = set()
        self._frozen_params: list[torch.nn.Parameter] = []
        super().__init__(
            model=module,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            processing_class=processing_class,
            callbacks=[*(callbacks or []), GradualUnfreezeCallback(self)],
            **kwargs,
        )
        self.apply_unfreeze_schedule()

    def component_learning_rates(self) -> dict[str, float]:
        lrs = {}
        if self.args.memory_attention_learning_rate is not None:
            lrs["memory_attention"] = self.args.memory_attention_learning_rate
        if self.args.encoder_learning_rate is not None:
            lrs["encoder"] = self.args.encoder_learning_rate
        return lrs

    @property
    def _distributed(self) -> bool:
        return self.args.world_size > 1

    def apply_unfreeze_schedule(self, refresh: bool = False) -> set[str]:
        """Freeze/unfreeze components for the current step; returns the trainable components. ``refresh``
        re-applies the current schedule (after the model's parameters were replaced, e.g. by FSDP)."""
        wanted = self.args.trainable_components(self.state.global_step, self.state.epoch or 0.0)
        if wanted == self.trainable_components and not refresh:
            return wanted
        frozen = set(COMPONENTS) - wanted
        if not self._distributed:
            set_component_trainable(self.model, wanted, True)
            set_component_trainable(self.model, frozen, False)
        self._frozen_params = [p for n, p in self.model.named_parameters() if component_of(n) in frozen]
        if self.trainable_components and wanted != self.trainable_components and self.is_world_process_zero():
            added = sorted(wanted - self.trainable_components)
            print(f"[MemoryAwareTrainer] step {self.state.global_step}: unfreezing {', '.join(added) or '-'}; "
                  f"training {', '.join(sorted(wanted))}")
        self.trainable_components = wanted
        return wanted

    def trainable_parameter_count(self) -> int:
        frozen = {id(p) for p in self._frozen_params}
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad and id(p) not in frozen)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Frozen parameters must not move: drop any gradient they got (under DDP they compute one).
        for p in self._frozen_params:
            p.grad = None
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs["trainable_parameters"] = self.trainable_parameter_count()
        super().log(logs, start_time)
