"""DMPO: memory-aware DPO on RxT episodes (training.md §6.2), as a ``trl.DPOTrainer``.

Per episode turn ``k`` there is an accepted and a rejected answer. Both are scored by the policy conditioned on
the memory built from the accepted turns ``< k``, and by the frozen reference model conditioned on **its own**
memory (same initial state, same accepted interactions, written by the reference's own encoder and memory
attention). Only then is the **accepted** interaction of turn ``k`` written into the memory. (The reference
implementation wrote the current accepted answer into the memory *before* scoring it, so the policy could read
the preferred answer from its memory; here the order is score-then-write, and ``tests/test_impo.py`` checks that
the scores of a turn do not depend on that turn's accepted answer.)

How it sits on TRL
------------------
:class:`DMPOConfig` is a ``trl.DPOConfig`` and :class:`DMPOTrainer` a ``trl.DPOTrainer``; TRL's ``_compute_loss``
runs unchanged, so every TRL loss type (``loss_type=["sigmoid"]``, ``"ipo"``, ``"hinge"``, ``"apo_zero"``,
``["sigmoid", "sft"]`` = RPO, ...), ``loss_weights``, ``label_smoothing``, ``f_divergence_type``, ``ld_alpha``
and TRL's metrics apply, and ``beta`` means what it means in TRL: the log-probs are **summed** over the answer
tokens (TRL's sequence log-prob; the previous DMPO used length-normalised means, whose ``beta`` was not DPO's).
TRL's batch is its concatenated forward: rows ``[accepted turns; rejected turns]``, here one row per (episode,
turn) with the episode's accepted turns alongside for the memory. The TRL methods overridden, and why:

- ``_prepare_dataset``: TRL tokenizes prompt/chosen/rejected texts; DMPO episodes are tokenized per turn
  (:func:`tokenize_dmpo_dataset`), raw spec records are tokenized here.
- ``compute_loss``: adds ``init_memory`` (the episodes' fresh memory, drawn from a step-seeded generator, so the
  policy and the reference start from the same one and a resumed run draws it again) to TRL's inputs, then
  TRL's loss. TRL calls the policy and the reference with the same inputs, so each rebuilds the memories in its
  own ``forward``.
- the models' ``forward``: TRL patches it with a fused LM head that runs the backbone on ids alone;
  :class:`RxTForDMPOTraining.forward` returns the same outputs (per-token log-probs, entropy, mean logits,
  top-1 hits) from memory-conditioned logits, so the patch is removed.

The turns, the row-masked memory writes and the answer log-probs go through the episode engine (:mod:`.episodes`).

Gradient: the policy's decoder, and the encoder/memory attention through the memory update of the previous turn
(the memory is detached before each update, so one update is back-propagated, like SMAT's ``backprop_turns=1``).

Not kept from the previous DMPO: the neutral-answer anchor (TRL's ``apo_zero``/``apo_down`` are TRL's anchored
losses) and ``rpo_alpha`` (TRL 1.x spells RPO as ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, alpha]``).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import DataCollatorForRxTEpisodes
from ..extras import require_extra
from ..modeling_rxt import RxTForConversationalGeneration, flat_rxt_key
from .episodes import compute_memory_update, iter_turns, sequence_log_probs
from .utils import RxTStageModel, _mix_seed, load_rxt_model, restore_class_forward

trl = require_extra("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from ..hub.trainer import RxTHubTrainerMixin  # noqa: E402

__all__ = ["DMPOConfig", "DMPOTrainer", "RxTForDMPOTraining", "DataCollatorForDMPO", "lm_head_outputs",
           "make_dmpo_records", "tokenize_dmpo_dataset"]


@dataclass
class DMPOConfig(DPOConfig):
    """Arguments of :class:`DMPOTrainer`: a ``trl.DPOConfig`` (every TRL field keeps its meaning) plus
    ``train_only_decoder``. Defaults that differ from ``DPOConfig``: ``gradient_checkpointing=False``,
    ``bf16=False`` (small CPU models), ``logging_steps=1``, ``remove_unused_columns=False`` (the episode columns
    are not TRL's)."""

    train_only_decoder: bool = field(default=False, metadata={"help": "Do not train encoder/memory attention."})
    gradient_checkpointing: bool = False
    bf16: bool | None = False
    logging_steps: float = 1
    remove_unused_columns: bool | None = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs: the reference's log-probs depend on the episode's memory, "
                             "drawn per step; set precompute_ref_log_probs=False")
        if self.padding_free:
            raise ValueError("padding_free is not supported: every row reads its own memory; set padding_free=False")


def lm_head_outputs(logits: torch.Tensor, labels: torch.Tensor) -> FusedCausalLMOutput:
    """What TRL's fused LM head returns (``FusedCausalLMOutput``), from full logits [B, T, V] and labels [B, T]
    (-100 = not scored): next-token log-probs (with gradient), entropy, ``log(sum p^2)``, mean logit and top-1
    hits (without), all zero where the label is -100."""
    log_probs, _ = sequence_log_probs(logits, labels)
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0.0)
        log_sum_sq = torch.logsumexp(2 * logp, -1).masked_fill(~mask, 0.0)
        mean_logits = logits.mean(-1).masked_fill(~mask, 0.0)
        is_top1 = (logits.argmax(-1) == targets) & mask
    return FusedCausalLMOutput(loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs,
                               entropy=entropy, log_sum_sq_probs=log_sum_sq, mean_logits=mean_logits,
                               is_top1=is_top1, label_mask=mask)


class RxTForDMPOTraining(RxTStageModel):
    """Stage 5 (DMPO): the policy, or (frozen) the reference. ``forward`` takes TRL's concatenated preference
    batch (``input_ids`` [2R, T]: R accepted rows, then the R rejected rows of the same (episode, turn) pairs)
    plus the episodes (``episode_input_ids`` [B, N, T'], ``turn_mask``, ``row_episode``/``row_turn`` [R]) and
    their initial memory; it builds each turn's memory from the accepted turns before it and returns TRL's
    fused-head outputs (:func:`lm_head_outputs`) for every row, read from its turn's memory."""

    def episode_memories(self, episode_input_ids: torch.Tensor, episode_attention_mask: torch.Tensor,
                         turn_mask: torch.Tensor, init_memory: torch.Tensor) -> torch.Tensor:
        """Memory before each turn, [B, N, L, S, D]: turn k reads the accepted turns < k (score, then write)."""
        memory, out, last = init_memory, [], episode_input_ids.shape[1] - 1
        for turn in iter_turns(episode_input_ids, episode_attention_mask, turn_mask):
            out.append(memory)
            if turn.index < last:  # the last turn's write is read by no row
                # one update back-propagated per turn: the memory is detached before it
                memory = compute_memory_update(self, turn.input_ids, turn.attention_mask, memory.detach(), turn.valid)
        return torch.stack(out, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, init_memory: torch.Tensor,
                episode_input_ids: torch.Tensor, episode_attention_mask: torch.Tensor, turn_mask: torch.Tensor,
                row_episode: torch.Tensor, row_turn: torch.Tensor, labels: torch.Tensor | None = None,
                **_: Any) -> FusedCausalLMOutput:
        memories = self.episode_memories(episode_input_ids, episode_attention_mask, turn_mask, init_memory)
        rows = memories[row_episode, row_turn]
        stm = torch.cat([rows, rows])  # accepted and rejected answers of a turn read the same memory
        logits = RxTForConversationalGeneration.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                                        stm=stm).logits
        return lm_head_outputs(logits, labels if labels is not None else input_ids)


def _pad_rows(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    width = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=value) for r in rows])


@dataclass
class DataCollatorForDMPO:
    """Collates DMPO episodes (``turn_input_ids`` = accepted interactions, ``rejected_turn_input_ids``) into
    TRL's concatenated preference batch: ``input_ids``/``attention_mask``/``completion_mask`` [2R, T] with one
    row per existing (episode, turn), accepted rows first, then the rejected ones in the same order
    (``completion_mask`` marks the answer tokens, ``[EOS]`` included); and, for the memory,
    ``episode_input_ids``/``episode_attention_mask`` [B, N, T'] (accepted turns), ``turn_mask`` [B, N] and each
    row's ``row_episode``/``row_turn``."""

    episodes: DataCollatorForRxTEpisodes = field(default_factory=DataCollatorForRxTEpisodes)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not all(f.get("rejected_turn_input_ids") for f in features):
            raise KeyError("DMPO features need 'rejected_turn_input_ids' for every episode")
        acc = self.episodes([{"turn_input_ids": f["turn_input_ids"]} for f in features])
        rej = self.episodes([{"turn_input_ids": f["rejected_turn_input_ids"]} for f in features])
        if rej["input_ids"].shape[1] != acc["input_ids"].shape[1] or not torch.equal(rej["turn_mask"],
                                                                                       acc["turn_mask"]):
            raise ValueError("rejected_turn_input_ids: every turn needs an answer")
        row_episode, row_turn = acc["turn_mask"].nonzero(as_tuple=True)
        parts = {}
        for name, part in (("chosen", acc), ("rejected", rej)):
            ids = part["input_ids"][row_episode, row_turn]
            mask = part["attention_mask"][row_episode, row_turn]
            positions = torch.arange(ids.shape[1])[None]
            answer = (positions >= part["prompt_lengths"][row_episode, row_turn][:, None]) & mask.bool()
            parts[name] = (ids, mask, answer.long())
        pad = self.episodes.pad_token_id
        out = {key: _pad_rows([*parts["chosen"][i], *parts["rejected"][i]], pad if i == 0 else 0)
               for i, key in enumerate(("input_ids", "attention_mask", "completion_mask"))}
        out.update(episode_input_ids=acc["input_ids"], episode_attention_mask=acc["attention_mask"],
                   turn_mask=acc["turn_mask"], row_episode=row_episode, row_turn=row_turn)
        return out


class DMPOTrainer(RxTHubTrainerMixin, DPOTrainer):
    """Memory-aware DPO as a ``trl.DPOTrainer`` (see the module doc for the TRL methods overridden and why).

    Args:
        model: the policy, an ``RxTForConversationalGeneration`` or a path (e.g. the stage-4 output).
        ref_model: the frozen reference (default: a frozen copy of the policy), with its own memory pipeline.
        args: :class:`DMPOConfig`.
        train_dataset: DMPO episodes (:func:`tokenize_dmpo_dataset`; raw spec records are tokenized here).
        processing_class: the RxT tokenizer.
    """

    rxt_stage = "dmpo"  # the stage name in the model card's training table
    _tag_names = ["trl", "dpo", "dmpo", "rxt"]
    _name = "DMPO"

    def __init__(self, model: RxTForConversationalGeneration | str, ref_model=None, args: DMPOConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 callbacks=None, optimizers=(None, None)):
        if not isinstance(args, DMPOConfig):
            raise TypeError(f"DMPOTrainer needs args=DMPOConfig(...), got {type(args).__name__}")
        rxt = load_rxt_model(model) if isinstance(model, str) or hasattr(model, "__fspath__") else model
        rxt.train()
        if args.train_only_decoder:
            for name, p in rxt.named_parameters():
                if not flat_rxt_key(name).startswith("decoder."):  # the LM head included
                    p.requires_grad_(False)
        ref = copy.deepcopy(rxt) if ref_model is None else ref_model
        ref = RxTForDMPOTraining.from_rxt(ref.eval().requires_grad_(False), args)
        if data_collator is None:
            base = (DataCollatorForRxTEpisodes.from_tokenizer(processing_class) if processing_class is not None
                    else DataCollatorForRxTEpisodes(pad_token_id=rxt.config.pad_token_id,
                                                    answer_marker_ids=(rxt.config.answer_token_id,)))
            data_collator = DataCollatorForDMPO(base)
        super().__init__(model=RxTForDMPOTraining.from_rxt(rxt, args), ref_model=ref, args=args,
                         data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers)
        restore_class_forward(self.model)
        restore_class_forward(self.accelerator.unwrap_model(self.ref_model))
        self._rng = (-1, 0)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """DMPO episodes are tokenized per turn, not as TRL's prompt/chosen/rejected texts: raw spec records
        (``interactions`` with ``accepted``/``rejected``) are tokenized by :func:`tokenize_dmpo_dataset`."""
        if dataset is not None and "interactions" in getattr(dataset, "column_names", ()):
            return tokenize_dmpo_dataset(list(dataset), processing_class, args.max_length)
        return dataset

    def _step_generator(self, device: torch.device) -> torch.Generator:
        step = self.state.global_step
        micro = self._rng[1] + 1 if self._rng[0] == step else 0
        self._rng = (step, micro)
        seed = _mix_seed(self.args.seed, step, micro, self.args.process_index, 0 if self.model.training else 1)
        return torch.Generator(device=device).manual_seed(seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss, with the episodes' initial memory added to the inputs TRL gives the policy and the
        reference (the same memory for both; a function of (seed, step, micro-batch, process))."""
        rxt = self.accelerator.unwrap_model(self.model)
        generator = self._step_generator(self.accelerator.device)
        init = rxt.init_memory(inputs["turn_mask"].shape[0], generator=generator).memory
        return super().compute_loss(model, {**inputs, "init_memory": init}, return_outputs, num_items_in_batch)


# ---------------------------------------------------------------------------------------------------- data
def make_dmpo_records(mrl_records: Sequence[Mapping[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Preference episodes from MRL records (e.g. ``build_memory_dialogues``): accepted = the reference
    answer; rejected = for a recall probe, the same answer with the recalled value swapped for a value of the
    same kind from another episode (a memory error), otherwise the answer of another episode's turn."""
    rng = random.Random(seed)
    recs = [dict(r) for r in mrl_records]
    values_by_kind: dict[str, list[str]] = {}
    for r in recs:
        for p in r.get("probes") or []:
            values_by_kind.setdefault(p["kind"], []).append(p["expected"])
    all_answers = [t["answer"] for r in recs for t in [{"answer": r["answer"]}, *r["interactions"]]]
    out = []
    for r in recs:
        turns = [{"query": r["query"], "answer": r["answer"]}, *r["interactions"]]
        probes = {p["turn"]: p for p in r.get("probes") or []}
        inter = []
        for k, t in enumerate(turns):
            rejected = None
            p = probes.get(k)
            if p is not None:
                others = [v for v in values_by_kind.get(p["kind"], []) if v != p["expected"]]
                if others and p["expected"] in t["answer"]:
                    rejected = t["answer"].replace(p["expected"], rng.choice(others))
            while rejected is None or rejected == t["answer"]:
                rejected = rng.choice(all_answers)
            inter.append({"query": t["query"], "accepted": t["answer"], "rejected": rejected})
        out.append({"interactions": inter})
    return out


def tokenize_dmpo_dataset(records: Sequence[Mapping[str, Any]], tokenizer, max_length: int | None = None):
    """Spec-format DMPO records (``{"interactions": [{"query", "accepted", "rejected", "neutral"?}]}``,
    answers as text or ``{"answer": text}``) -> a ``datasets.Dataset`` with ``turn_input_ids``,
    ``rejected_turn_input_ids`` (and ``neutral_turn_input_ids``)."""
    datasets = require_extra("datasets")

    from ..data import tokenize_mrl_dataset

    def text(x):
        return x.get("answer", "") if isinstance(x, Mapping) else x

    columns: dict[str, list] = {}
    for field_name, key in (("accepted", "turn_input_ids"), ("rejected", "rejected_turn_input_ids"),
                            ("neutral", "neutral_turn_input_ids")):
        if not all(all(field_name in t for t in r["interactions"]) for r in records):
            continue
        rows = []
        for r in records:
            turns = [{"query": t["query"], "answer": text(t[field_name])} for t in r["interactions"]]
            rows.append({"query": turns[0]["query"], "answer": turns[0]["answer"], "interactions": turns[1:]})
        tok = tokenize_mrl_dataset(datasets.Dataset.from_list(rows), tokenizer, max_length, truncation=True)
        columns[key] = tok["turn_input_ids"]
    return datasets.Dataset.from_dict(columns)
