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
from .episodes import compute_memory_update, iter_turns
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
        review_loss_weight (`float`, defaults to `0.0`): weight of the review questions' answer loss, added to
            the mean turn loss. Reviews (``review_input_ids`` in the batch, from episodes with a ``reviews``
            column) ask the memory about an earlier fact before every turn without writing the question into
            it, so keeping a fact through later writes gets a training signal at every turn, not only at the
            episode's few probe turns. 0 ignores them (the reference's stage 4).
        write_token_loss_weight (`float`, defaults to `0.0`): weight of an auxiliary loss on every FIFO write
            (models with `fifo_write_slots`): the fresh slots of each memory layer must name the written
            interaction's distinct tokens through the shared token embedding (the mean -log p of those tokens
            under the mixture of the slots' vocabulary distributions). The answer loss alone lets the write keep
            what questions ask for most and drop what only tells facts apart, such as whose fact it is. 0 = off.
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
    review_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the review questions' answer loss (0 = reviews unused)."}
    )
    write_token_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the FIFO write's token loss (0 = none)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all collated columns."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backprop_turns < 0:
            raise ValueError(f"backprop_turns must be >= 0 (0 = whole episode), got {self.backprop_turns}")
        if self.review_loss_weight < 0:
            raise ValueError(f"review_loss_weight must be >= 0 (0 = no reviews), got {self.review_loss_weight}")
        if self.write_token_loss_weight < 0:
            raise ValueError(f"write_token_loss_weight must be >= 0 (0 = none), got {self.write_token_loss_weight}")

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


def _mean_over_trained(values: list[torch.Tensor], counts: torch.Tensor | None) -> torch.Tensor:
    """The per-batch mean of ``values``, or (with the step's counts) their sum over the number of entries the
    whole step trains, so that the shares of all micro-batches and processes add up to that mean."""
    stacked = torch.stack(values)
    return stacked.mean() if counts is None else stacked.sum() / (counts > 0).sum()


class RxTForMemoryAwareTraining(RxTStageModel):
    """Stage 4: the full RxT model over a batch of episodes; ``forward`` returns the mean per-turn answer loss.
    ``stage_args`` (a [`MemoryAwareConfig`]) sets ``backprop_turns``, ``train_first_turn`` and the MoE weight
    (defaults without)."""

    def loss_item_counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the loss trains on, three entries per turn boundary k: entry 3k the answer tokens of turn k
        (shifted labels), 3k + 1 those of the reviews asked before turn k (0 without reviews), 3k + 2 the
        episodes whose write of turn k - 1 the write token loss scores (0 without it). Each turn's and each
        review's loss is a token mean, and each boundary's write loss a mean over episodes, over the whole
        step's batch; the loss is the mean over the boundaries that have entries in it."""
        turns = (batch["labels"][:, :, 1:] != -100).sum(dim=(0, 2))
        if not self.stage_arg("train_first_turn", True):
            turns[0] = 0
        counts = torch.zeros(3 * (turns.numel() + 1), dtype=torch.long, device=turns.device)
        counts[0:-3:3] = turns
        reviewing = self._reviewing(batch.get("review_mask"), batch.get("review_labels"))
        if reviewing is not None:
            reviewed = batch["review_labels"][:, :, 1:] != -100
            counts[1::3] = (reviewed & reviewing[:, :, None]).sum(dim=(0, 2))
        if self.stage_arg("write_token_loss_weight", 0.0) > 0:
            counts[5::3] = self._scored_writes(batch["turn_mask"].bool(), reviewing).sum(dim=0)
        return counts

    def _reviewing(self, review_mask: torch.Tensor | None, review_labels: torch.Tensor | None
                   ) -> torch.Tensor | None:
        """bool [B, N + 1]: the review questions that are trained (None without reviews)."""
        if self.stage_arg("review_loss_weight", 0.0) <= 0 or review_mask is None or review_labels is None:
            return None
        return review_mask.bool()

    @staticmethod
    def _scored_writes(turn_mask: torch.Tensor, reviewing: torch.Tensor | None) -> torch.Tensor:
        """bool [B, N]: column k - 1 marks the episodes whose write of turn k - 1 something reads: turn k, or a
        review asked before turn k. The write of an episode's last turn is read by nothing and not scored,
        however long the other episodes of the batch are."""
        read = torch.nn.functional.pad(turn_mask[:, 1:], (0, 1), value=False)
        if reviewing is not None:
            read = read | reviewing[:, 1:]
        return turn_mask & read

    def _answer_losses(
        self,
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
        stm: torch.Tensor,
        totals: list[torch.Tensor | None],
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, float, int]], torch.Tensor | None]:
        """The decoder's answer losses reading ``stm`` for several row sets at once.

        ``parts``: (ids [B, T], mask, labels, rows) per row set (a turn, its reviews). The row sets go through
        the decoder as one batch (at this model size a forward costs about the same for 2B rows as for B) and
        each gets its own token loss: the sum over its tokens divided by its entry of ``totals`` (the tokens of
        the optimizer step's whole batch), or the mean over its tokens where that is None. Returns ((loss,
        this batch's token mean, correct tokens, tokens) per part, MoE aux loss)."""
        used = max(max(int(mask[rows].sum(dim=1).max()), 1) for _, mask, _, rows in parts)

        def pick(x: torch.Tensor, rows: torch.Tensor, fill: int) -> torch.Tensor:  # rows, cut/padded to `used`
            x = x[:, :used].index_select(0, rows)
            return torch.nn.functional.pad(x, (0, used - x.shape[1]), value=fill)

        ids = torch.cat([pick(i, r, self.config.pad_token_id or 0) for i, _, _, r in parts])
        mask = torch.cat([pick(m, r, 0) for _, m, _, r in parts])
        labels = torch.cat([pick(lab, r, -100) for _, _, lab, r in parts])
        base = self.rxt(  # the decoder pass of the RxT model itself
            input_ids=ids, attention_mask=mask, stm=torch.cat([stm.index_select(0, r) for *_, r in parts])
        )
        # The LM head only where a label is predicted (the answer side): the prompt's and the padding's logits
        # would be most of the head's cost and are never used.
        target = labels[:, 1:]
        keep = target != -100
        logits = self.lm_head(base.last_hidden_state[:, :-1][keep])
        token_loss = torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="none")
        row_of = keep.nonzero()[:, 0]
        with torch.no_grad():
            correct = logits.argmax(-1) == target[keep]
        results, start = [], 0
        for (*_, rows), total in zip(parts, totals):
            mine = (row_of >= start) & (row_of < start + rows.numel())
            start += rows.numel()
            mean = token_loss[mine].mean()
            loss = mean if total is None else token_loss[mine].sum() / total
            results.append((loss, mean.detach(), float(correct[mine].sum()), int(mine.sum())))
        return results, base.aux_loss

    def _write_token_loss(self, stm: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          rows: torch.Tensor) -> torch.Tensor:
        """Per row that ``rows`` (bool [B]) selects: how well the slots a FIFO write just filled name the
        interaction's tokens: every memory layer's fresh slots, RMS-normalised, score the vocabulary through the
        shared token embedding; the slots are a mixture (each token needs one slot that names it), and the loss
        is the mean -log p of the interaction's distinct non-special tokens, averaged over the memory layers. The
        answer loss alone keeps what questions ask for most (the value) and drops what only tells facts apart
        (whose fact it is); this asks the write to keep every word."""
        n = self.rxt.memory_attention.fifo_write_slots
        index = rows.nonzero().flatten()
        slots = torch.nn.functional.rms_norm(stm[index, :, :n], (stm.shape[-1],))  # [R, L, n, D]
        logp = torch.log_softmax((slots @ self.get_input_embeddings().weight.T).float(), dim=-1)
        mixture = torch.logsumexp(logp, dim=2) - torch.log(torch.tensor(float(n)))  # [R, L, V]
        ids = input_ids[index].masked_fill(attention_mask[index] == 0, 0)
        present = torch.zeros(ids.shape[0], mixture.shape[-1], device=ids.device)
        present.scatter_(1, ids, 1.0)
        special = [self.config.pad_token_id, self.config.bos_token_id, self.config.eos_token_id,
                   self.config.query_token_id, self.config.answer_token_id]
        present[:, [t for t in special if t is not None]] = 0.0
        per_row = -(mixture * present[:, None]).sum(-1) / present.sum(-1).clamp(min=1.0)[:, None]
        return per_row.mean(dim=1)  # [R]: the mean over memory layers

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
        review_input_ids: torch.LongTensor | None = None,
        review_attention_mask: torch.Tensor | None = None,
        review_labels: torch.LongTensor | None = None,
        review_mask: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RxTStageOutput:
        """The mean per-turn answer loss of the episodes (plus ``review_loss_weight`` x the mean review loss).
        With ``num_items_in_batch`` (the :meth:`loss_item_counts` of the optimizer step's whole batch, from the
        trainer) it is this batch's share of the whole batch's loss: per turn (and review) the sum of token
        losses over that turn's total, and the mean over the turns the whole batch trains."""
        batch, turns, _ = input_ids.shape
        backprop = self.stage_arg("backprop_turns", 1)
        train_first_turn = self.stage_arg("train_first_turn", True)
        aux_weight = self.stage_arg("moe_aux_loss_weight", self.config.router_aux_loss_coef)
        review_weight = self.stage_arg("review_loss_weight", 0.0)
        write_weight = self.stage_arg("write_token_loss_weight", 0.0)
        write_losses: list[torch.Tensor] = []
        write_means: list[torch.Tensor] = []  # this batch's own means, for the logs
        trained_reviews = self._reviewing(review_mask, review_labels)  # as loss_item_counts counts them
        if trained_reviews is None:
            trained_reviews = torch.zeros(batch, turns + 1, dtype=torch.bool, device=input_ids.device)
        scored_writes = self._scored_writes(turn_mask.bool(), trained_reviews)  # [B, N]: column k - 1 at boundary k
        stm = self.initial_memory_tensor(batch, generator=generator)  # differentiable when learned
        if system_input_ids is not None and has_system is not None and bool(has_system.any()):
            stm = compute_memory_update(self, system_input_ids, system_attention_mask, stm, has_system.bool())
        losses, review_losses, aux_losses, metrics = [], [], [], {}
        hits, count, review_hits, review_count = 0.0, 0, 0.0, 0
        episode = list(iter_turns(input_ids, attention_mask, turn_mask, labels))
        # one boundary more than turns: the review asked after the episode's last turn is written
        for k in range(len(episode) + 1):
            turn = episode[k] if k < len(episode) else None
            reviewing = trained_reviews[:, k]
            if turn is None and not bool(reviewing.any()):
                break
            if k > 0:
                if backprop > 0 and (k - 1) % backprop == 0:
                    stm = stm.detach()
                written = episode[k - 1]
                stm = compute_memory_update(self, written.input_ids, written.attention_mask, stm, written.valid)
                scored = scored_writes[:, k - 1]
                if write_weight > 0 and self.training and bool(scored.any()):
                    per_row = self._write_token_loss(stm, written.input_ids, written.attention_mask, scored)
                    write_means.append(per_row.detach().mean())
                    total = None if num_items_in_batch is None else num_items_in_batch[3 * k + 2]
                    write_losses.append(per_row.mean() if total is None else per_row.sum() / total)
            parts, is_review = [], []
            if turn is not None and (k > 0 or train_first_turn) and bool((turn.labels[:, 1:] != -100).any()):
                parts.append((turn.input_ids, turn.attention_mask, turn.labels, turn.valid.nonzero().flatten()))
                is_review.append(False)
            if bool(reviewing.any()):
                parts.append((review_input_ids[:, k], review_attention_mask[:, k], review_labels[:, k],
                              reviewing.nonzero().flatten()))
                is_review.append(True)
            if not parts:
                continue
            totals = [None if num_items_in_batch is None else num_items_in_batch[3 * k + r] for r in is_review]
            results, aux = self._answer_losses(parts, stm, totals)
            for review, (loss_k, mean_k, h, c) in zip(is_review, results):
                if review:
                    review_losses.append(loss_k)
                    review_hits, review_count = review_hits + h, review_count + c
                else:
                    metrics[f"loss_turn_{k}"] = mean_k  # this batch's token mean
                    losses.append(loss_k)
                    hits, count = hits + h, count + c
            if aux is not None and self.training:
                # this forward's share of the step's tokens at this turn boundary (1 without counts)
                share = 1.0 if num_items_in_batch is None else sum(c for *_, c in results) / max(
                    int(sum(totals)), 1)
                aux_losses.append(share * aux)
        if not losses and not review_losses:
            raise ValueError("no turn of this batch has answer labels to train on")
        counts = num_items_in_batch
        turn_counts, review_counts, write_counts = (None,) * 3 if counts is None else (
            counts[0::3], counts[1::3], counts[2::3])
        loss = _mean_over_trained(losses, turn_counts) if losses else input_ids.new_zeros((), dtype=torch.float)
        if aux_losses:  # the mean of (turn loss + weight * aux) over turns, as the reference sums them
            loss = loss + aux_weight * _mean_over_trained(aux_losses, turn_counts)
        metrics["answer_accuracy"] = hits / max(count, 1)
        if write_losses:
            loss = loss + write_weight * _mean_over_trained(write_losses, write_counts)
            metrics["write_token_loss"] = torch.stack(write_means).mean()
        if review_losses:
            review_loss = _mean_over_trained(review_losses, review_counts)
            loss = loss + review_weight * review_loss
            metrics["review_loss"] = review_loss.detach()
            metrics["review_accuracy"] = review_hits / max(review_count, 1)
        return RxTStageOutput(loss=loss, metrics=metrics)


def _check_reviews(args: MemoryAwareConfig, train_dataset: Any) -> None:
    columns = getattr(train_dataset, "column_names", None)
    if args.review_loss_weight > 0 and columns is not None and "review_input_ids" not in columns:
        raise ValueError(
            f"review_loss_weight={args.review_loss_weight} but the training episodes have no reviews: build them "
            "with reviews (memory_dialogues(..., reviews=True) or a 'reviews' column) and tokenize them with "
            "tokenize_mrl_dataset, or set review_loss_weight to 0."
        )


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
        _check_reviews(args, train_dataset)
        if isinstance(model, (str, os.PathLike)):
            model = load_rxt_model(model)
        if args.write_token_loss_weight > 0 and model.rxt.memory_attention.fifo_write_slots is None:
            raise ValueError(
                f"write_token_loss_weight={args.write_token_loss_weight} scores the slots a FIFO write fills, and "
                "this model's memory attention has no fifo_write_slots: set fifo_write_slots in its "
                "memory_attention_config, or write_token_loss_weight to 0."
            )
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
