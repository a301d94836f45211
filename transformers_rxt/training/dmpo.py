"""DMPO: memory-aware DPO on RxT episodes (training.md §6.2), as a ``transformers.Trainer``.

Per episode turn ``k`` there is an accepted and a rejected answer. Both are scored (length-normalised mean
log-prob of the answer tokens) by the policy conditioned on the memory built from turns ``< k``, and by a
frozen reference model conditioned on **its own** memory (same initial state, same accepted interactions,
written by the reference's own encoder and memory attention). Only then is the **accepted** interaction of
turn ``k`` written into the memory. The reference implementation wrote the current accepted answer into the
memory *before* scoring it, so the policy could read the preferred answer from its memory; here the order is
score-then-write, and ``tests/test_impo.py`` checks that the rejected score of a turn does not depend on that
turn's accepted answer.

Loss per turn: ``z = beta * ((s_pi(acc) - s_pi(rej)) - (s_ref(acc) - s_ref(rej)))``,
``-(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z)``; anchored variant (APO-style) adds
``anchor_weight * |s_pi(neutral) - s_ref(neutral)|`` when the data has neutral answers.

Gradient: the policy's decoder, and the encoder/memory attention through the memory update of the previous
turn (the memory is detached before each update, so one update is back-propagated, like SMAT's
``backprop_turns=1``). Everything trainable runs inside :class:`RxTForDMPOTraining.forward` (DDP-safe).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from ..data import DataCollatorForRxTEpisodes
from ..extras import require_extra
from ..modeling_rxt import RxTForConversationalGeneration, flat_rxt_key
from .utils import RxTStageModel, RxTStageOutput, RxTStageTrainer, load_rxt_model

__all__ = ["DMPOConfig", "DMPOTrainer", "RxTForDMPOTraining", "DataCollatorForDMPO", "dmpo_loss", "make_dmpo_records",
           "sequence_scores", "tokenize_dmpo_dataset"]


@dataclass
class DMPOConfig(TrainingArguments):
    """Arguments of :class:`DMPOTrainer` (TRL ``DPOConfig`` names: ``beta``, ``label_smoothing``)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    use_anchored: bool = False
    anchor_weight: float = 0.1
    rpo_alpha: float | None = field(default=None, metadata={
        "help": "TRL's RPO term: add rpo_alpha x the NLL of the accepted answers (per token), which keeps DPO "
                "from lowering the likelihood of the accepted answers along with the rejected ones."})
    train_only_decoder: bool = field(default=False, metadata={"help": "Do not train encoder/memory attention."})
    remove_unused_columns: bool = False


def dmpo_loss(pi_acc, pi_rej, ref_acc, ref_rej, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample DPO loss on (length-normalised) sequence scores."""
    z = beta * ((pi_acc - pi_rej) - (ref_acc - ref_rej))
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def sequence_scores(model: RxTForConversationalGeneration, ids, mask, prompt_lengths, memory) -> torch.Tensor:
    """Mean log-prob of the answer tokens (positions >= prompt length, incl. [EOS]) of right-padded full
    interactions, conditioned on ``memory``."""
    # the RxT model's own forward: `model` may be a stage model, whose forward is its training loss
    logits = RxTForConversationalGeneration.forward(model, input_ids=ids, attention_mask=mask, stm=memory)
    logits = logits.logits[:, :-1].float()
    targets = ids[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    pos = torch.arange(1, ids.shape[1], device=ids.device)[None]
    answer = (pos >= prompt_lengths[:, None]) & mask[:, 1:].bool()
    return (logp * answer).sum(1) / answer.sum(1).clamp(min=1)


def _turn(batch: Mapping[str, torch.Tensor], prefix: str, k: int):
    ids, mask = batch[f"{prefix}input_ids"][:, k], batch[f"{prefix}attention_mask"][:, k]
    used = max(int(mask.sum(1).max()), 1)
    return ids[:, :used], mask[:, :used], batch[f"{prefix}prompt_lengths"][:, k]


def _episode_scores(model, batch, memory, prefixes, detach_between: bool):
    """Scores of every turn for each prefix ('' = accepted, 'rejected_', 'neutral_'), writing the accepted
    interaction into the memory only after the turn is scored."""
    scores = {p: [] for p in prefixes}
    turns = batch["input_ids"].shape[1]
    for k in range(turns):
        for p in prefixes:
            ids, mask, plen = _turn(batch, p, k)
            scores[p].append(sequence_scores(model, ids, mask, plen, memory))
        if k + 1 < turns:  # write the accepted interaction of turn k AFTER scoring it
            ids, mask, _ = _turn(batch, "", k)
            prev = memory.detach() if detach_between else memory
            new = model.compute_memory_update(ids, mask, prev)
            valid = batch["turn_mask"][:, k].bool()[:, None, None, None]
            memory = torch.where(valid, new, prev)
    return {p: torch.stack(v, 1) for p, v in scores.items()}


class RxTForDMPOTraining(RxTStageModel):
    """Stage 5 (DMPO): the policy; ``forward`` takes a preference batch with the reference's scores and the
    initial memory and returns the DPO loss. ``stage_args`` is a [`DMPOConfig`] (required)."""

    def forward(self, init_memory, ref_scores: Mapping[str, torch.Tensor], generator=None,
                **batch) -> RxTStageOutput:
        a = self.stage_args
        if not isinstance(a, DMPOConfig):
            raise TypeError(f"RxTForDMPOTraining needs stage_args=DMPOConfig(...), got {type(a).__name__}")
        prefixes = ["", "rejected_"] + (["neutral_"] if a.use_anchored else [])
        pi = _episode_scores(self, batch, init_memory, prefixes, detach_between=True)
        valid = batch["turn_mask"].float()
        losses = dmpo_loss(pi[""], pi["rejected_"], ref_scores[""], ref_scores["rejected_"], a.beta,
                           a.label_smoothing)
        loss = (losses * valid).sum() / valid.sum().clamp(min=1)
        out = {}
        if a.rpo_alpha:
            nll = -(pi[""] * valid).sum() / valid.sum().clamp(min=1)
            loss = loss + a.rpo_alpha * nll
            out["nll_accepted"] = nll.detach()
        if a.use_anchored:
            anchor = ((pi["neutral_"] - ref_scores["neutral_"]).abs() * valid).sum() / valid.sum().clamp(min=1)
            loss = loss + a.anchor_weight * anchor
            out["anchor"] = anchor.detach()
        margin = (pi[""] - pi["rejected_"]).detach()
        ref_margin = ref_scores[""] - ref_scores["rejected_"]
        n = valid.sum().clamp(min=1)
        out.update({
            "dpo_loss": ((losses * valid).sum() / n).detach(),
            "reward_margin": ((margin * valid).sum() / n),
            "rewards_accuracy": ((((margin - ref_margin) > 0).float() * valid).sum() / n),
            "preference_accuracy": (((margin > 0).float() * valid).sum() / n),
            "score_accepted": ((pi[""].detach() * valid).sum() / n),
            "score_rejected": ((pi["rejected_"].detach() * valid).sum() / n),
        })
        return RxTStageOutput(loss=loss, metrics=out)


@dataclass
class DataCollatorForDMPO:
    """Collates episodes with ``turn_input_ids`` (accepted interactions), ``rejected_turn_input_ids`` and
    optional ``neutral_turn_input_ids`` into ``input_ids``/``rejected_input_ids``/``neutral_input_ids``
    [B, N, T] (+ masks, prompt lengths, ``turn_mask``)."""

    episodes: DataCollatorForRxTEpisodes = field(default_factory=DataCollatorForRxTEpisodes)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        out = self.episodes([{"turn_input_ids": f["turn_input_ids"]} for f in features])
        for prefix in ("rejected_", "neutral_"):
            key = f"{prefix}turn_input_ids"
            if all(f.get(key) for f in features):
                part = self.episodes([{"turn_input_ids": f[key]} for f in features])
                if part["input_ids"].shape[1] != out["input_ids"].shape[1]:
                    raise ValueError(f"{key}: every turn needs an answer")
                for name in ("input_ids", "attention_mask", "prompt_lengths"):
                    out[f"{prefix}{name}"] = part[name]
        if "rejected_input_ids" not in out:
            raise KeyError("DMPO features need 'rejected_turn_input_ids' for every episode")
        out.pop("labels", None)
        return out


class DMPOTrainer(RxTStageTrainer):
    """Memory-aware DPO. ``model`` is the policy (an RxT model or a path, e.g. the stage-4 output);
    ``ref_model`` defaults to a frozen copy of it. Data: see :class:`DataCollatorForDMPO` and
    :func:`tokenize_dmpo_dataset`."""

    rxt_stage = "dmpo"  # the stage name in the model card's training table

    def __init__(self, model, args: DMPOConfig, train_dataset=None, eval_dataset=None, processing_class=None,
                 ref_model: RxTForConversationalGeneration | None = None, data_collator=None, callbacks=None):
        rxt = load_rxt_model(model) if isinstance(model, str) else model
        rxt.train()
        if args.train_only_decoder:
            for name, p in rxt.named_parameters():
                if not flat_rxt_key(name).startswith("decoder."):  # the LM head included
                    p.requires_grad_(False)
        if ref_model is None:
            ref_model = copy.deepcopy(rxt)
        ref_model.eval().requires_grad_(False)
        if data_collator is None:
            base = (DataCollatorForRxTEpisodes.from_tokenizer(processing_class) if processing_class is not None
                    else DataCollatorForRxTEpisodes(pad_token_id=rxt.config.pad_token_id,
                                                    answer_marker_ids=(rxt.config.answer_token_id,)))
            data_collator = DataCollatorForDMPO(base)
        super().__init__(model=RxTForDMPOTraining.from_rxt(rxt, args), args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         callbacks=callbacks)
        self.ref_model = ref_model.to(self.args.device)

    def count_tokens(self, inputs) -> int:
        return int(inputs["attention_mask"].sum() + inputs["rejected_attention_mask"].sum())

    def prepare_stage_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        rxt = self.accelerator.unwrap_model(self.model)
        bsz = inputs["input_ids"].shape[0]
        init = rxt.init_memory(bsz, generator=generator).memory
        prefixes = ["", "rejected_"] + (["neutral_"] if self.args.use_anchored else [])
        with torch.no_grad():  # the reference's own memory pipeline, same start, same accepted interactions
            ref = _episode_scores(self.ref_model, inputs, init.clone(), prefixes, detach_between=True)
        return {**inputs, "init_memory": init, "ref_scores": ref}


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
