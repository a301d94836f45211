"""Memory-retention evaluation: does the model answer questions about facts given turns earlier?

For every dialogue (MRL record with ``probes``, e.g. :func:`~transformers_rxt.data.build_memory_dialogues`)
the model chats turn by turn with batched ``generate`` (greedy). Two runs on the same dialogues:

- **memory**: one STM per dialogue, carried from turn to turn; after each answer the interaction
  ``[BOS][Q]query[A]answer[EOS]`` is written into it (``memory_update="sync"``, the model's own answer, as in a
  real chat; ``teacher_forcing=True`` writes the reference answer instead);
- **reset**: the memory is re-initialised before every turn (the stateless baseline: same model, same
  weights, no memory of earlier turns).

Fact accuracy is scored on the probe turns (exact match of the key word, per distance d = turns between the
fact and the question). Perplexity is teacher-forced over the answers of all turns (and of the probe turns
alone), with the memory carried (updated with the reference interactions) and with it reset.
"""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..data.synthetic import (FACT_KINDS, build_memory_dialogues, dialogue_turns, format_accuracy_table,
                              score_dialogue_answers)
from ..tokenization_rxt import tokenize_interactions, tokenize_prompts
from .episodes import compute_memory_update, sequence_log_probs

__all__ = ["compare_retention", "describe_retention", "evaluate_memory_retention", "evaluate_heldout_retention",
           "forced_choice_recall", "format_retention"]


def _records(dialogues: Any) -> list[dict[str, Any]]:
    if hasattr(dialogues, "to_list"):
        return dialogues.to_list()
    return [dict(d) for d in dialogues]


def _batches(records: Sequence[Mapping[str, Any]], batch_size: int) -> Iterable[list[int]]:
    """Indices of dialogues in batches of equal turn count (the memory runs turn-synchronously)."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_len[len(dialogue_turns(r))].append(i)
    for _, idx in sorted(by_len.items()):
        for start in range(0, len(idx), batch_size):
            yield idx[start : start + batch_size]


def _fresh_memory(model, batch: int, seed: int):
    generator = torch.Generator(device=model.device).manual_seed(seed)
    return model.init_memory(batch, generator=generator)


@torch.no_grad()
def _generate_answers(model, tokenizer, queries: list[str], stm, max_new_tokens: int, memory_update: str):
    enc = tokenize_prompts(tokenizer, queries).to(model.device)
    prompt_len = enc["input_ids"].shape[1]
    budget = min(max_new_tokens, model.config.max_interaction_length - prompt_len)
    if budget < 1:
        raise ValueError(f"a query of {prompt_len} tokens leaves no room for an answer (seq_len limit)")
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        stm=stm,
        max_new_tokens=budget,
        do_sample=False,
        memory_update=memory_update,
    )
    return tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)


@torch.no_grad()
def _answer_nll(model, tokenizer, queries, answers, stm) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Summed answer-token NLL and token count per row (teacher forcing), plus the encoded interactions."""
    enc = tokenize_interactions(tokenizer, queries, answers, return_labels=True).to(model.device)
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], stm=stm).logits
    log_probs, counts = sequence_log_probs(logits, enc["labels"])
    return -log_probs.sum(dim=1), counts, enc


# No autograd anywhere: update_memory records a graph whenever grad is on (training backpropagates through it),
# and the teacher-forced STM chained those graphs across turns (~0.6 GB per batch of 64 nine-turn dialogues).
@torch.no_grad()
def evaluate_memory_retention(
    model,
    tokenizer,
    dialogues: Any,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    teacher_forcing: bool = False,
    compute_perplexity: bool = True,
    mode: str = "key",
    seed: int = 0,
    num_examples: int = 3,
) -> dict[str, Any]:
    """Fact accuracy per distance with the memory carried vs reset every turn, plus perplexity.

    Args:
        model: an `RxTForConversationalGeneration`.
        tokenizer: its RxT tokenizer.
        dialogues: MRL records with ``probes`` (a list of dicts or a ``datasets.Dataset``), e.g.
            ``build_memory_dialogues(200, split="heldout")``.
        batch_size: dialogues per batch (batches hold dialogues with the same number of turns).
        max_new_tokens: answer length limit (also capped by the model's interaction length).
        teacher_forcing: write the reference answers into memory instead of the generated ones.
        compute_perplexity: also compute teacher-forced answer perplexities.
        mode: ``"key"`` (the fact's key word, no rival value) or ``"exact"`` (whole answer) accuracy.
        seed: seed of the initial memories (the same for both runs).
        num_examples: how many probe transcripts to return under ``examples``.

    Returns a dict: ``memory`` and ``reset`` (``score_dialogue_answers`` results: ``accuracy``, ``n``,
    ``per_distance``, ``counts``), ``table`` (plain text), ``perplexity`` / ``probe_perplexity`` (``{"memory",
    "reset"}``, when computed), ``examples`` (query, expected, memory answer, reset answer, distance).
    """
    records = _records(dialogues)
    if not records:
        raise ValueError("no dialogues to evaluate")
    if not any(r.get("probes") for r in records):
        raise ValueError("the dialogues have no 'probes' (recall questions); use build_memory_dialogues()")
    was_training = model.training
    model.eval()
    answers_memory: list[list[str]] = [[] for _ in records]
    answers_reset: list[list[str]] = [[] for _ in records]
    nll = {"memory": 0.0, "reset": 0.0}
    probe_nll = {"memory": 0.0, "reset": 0.0}
    tokens = probe_tokens = 0
    try:
        for b, idx in enumerate(_batches(records, batch_size)):
            turns = [dialogue_turns(records[i]) for i in idx]
            n_turns = len(turns[0])
            probe_turns = {p["turn"] for i in idx for p in records[i].get("probes") or []}
            probe_rows = {(row, p["turn"]) for row, i in enumerate(idx) for p in records[i].get("probes") or []}
            base_seed = seed * 1_000_003 + b
            # --- memory carried
            stm = _fresh_memory(model, len(idx), base_seed)
            stm_tf = _fresh_memory(model, len(idx), base_seed) if compute_perplexity else None
            for k in range(n_turns):
                queries = [t[k]["query"] for t in turns]
                refs = [t[k]["answer"] for t in turns]
                if compute_perplexity:
                    nll_rows, n_rows, enc = _answer_nll(model, tokenizer, queries, refs, stm_tf)
                    nll["memory"] += float(nll_rows.sum())
                    tokens += int(n_rows.sum())
                    for row in range(len(idx)):
                        if (row, k) in probe_rows:
                            probe_nll["memory"] += float(nll_rows[row])
                            probe_tokens += int(n_rows[row])
                    model.update_memory(enc["input_ids"], enc["attention_mask"], stm_tf)
                gen = _generate_answers(
                    model, tokenizer, queries, stm, max_new_tokens, "none" if teacher_forcing else "sync"
                )
                if teacher_forcing:
                    enc = tokenize_interactions(tokenizer, queries, refs).to(model.device)
                    model.update_memory(enc["input_ids"], enc["attention_mask"], stm)
                for row, i in enumerate(idx):
                    answers_memory[i].append(gen[row])
            # --- memory reset before every turn (only probe turns need answers)
            for k in range(n_turns):
                queries = [t[k]["query"] for t in turns]
                if compute_perplexity:
                    refs = [t[k]["answer"] for t in turns]
                    nll_rows, n_rows, _ = _answer_nll(
                        model, tokenizer, queries, refs, _fresh_memory(model, len(idx), base_seed + 7919 * (k + 1))
                    )
                    nll["reset"] += float(nll_rows.sum())
                    for row in range(len(idx)):
                        if (row, k) in probe_rows:
                            probe_nll["reset"] += float(nll_rows[row])
                if k in probe_turns:
                    stm = _fresh_memory(model, len(idx), base_seed + 7919 * (k + 1))
                    gen = _generate_answers(model, tokenizer, queries, stm, max_new_tokens, "none")
                else:
                    gen = [""] * len(idx)
                for row, i in enumerate(idx):
                    answers_reset[i].append(gen[row])
    finally:
        model.train(was_training)

    memory = score_dialogue_answers(answers_memory, records, mode=mode)
    reset = score_dialogue_answers(answers_reset, records, mode=mode)
    result: dict[str, Any] = {
        "memory": {k: v for k, v in memory.items() if k != "correct"},
        "reset": {k: v for k, v in reset.items() if k != "correct"},
        "table": format_accuracy_table({"memory": memory, "reset": reset}),
        "teacher_forcing": teacher_forcing,
    }
    if compute_perplexity:
        result["perplexity"] = {k: math.exp(v / max(tokens, 1)) for k, v in nll.items()}
        result["probe_perplexity"] = {k: math.exp(v / max(probe_tokens, 1)) for k, v in probe_nll.items()}
    examples = []
    for i, r in enumerate(records):
        for p in r.get("probes") or []:
            if len(examples) >= num_examples:
                break
            turns = dialogue_turns(r)
            examples.append(
                {
                    "fact": turns[p["fact_turn"]]["query"],
                    "query": turns[p["turn"]]["query"],
                    "expected": p["expected"],
                    "distance": p["distance"],
                    "memory_answer": answers_memory[i][p["turn"]],
                    "reset_answer": answers_reset[i][p["turn"]],
                }
            )
    result["examples"] = examples
    return result


def evaluate_heldout_retention(model, tokenizer, count: int = 512, max_distance: int = 8, seed: int = 2,
                               **kwargs: Any) -> dict[str, Any]:
    """:func:`evaluate_memory_retention` on ``count`` held-out synthetic dialogues
    (``build_memory_dialogues(count, max_distance, seed=seed, split="heldout")``; seed 2 is the one the stage
    scripts and ``rxt`` use). The result records the dialogues under ``dialogues``, so that two results can be
    checked to come from the same questions before they are compared."""
    dialogues = build_memory_dialogues(count, max_distance, seed=seed, split="heldout")
    result = evaluate_memory_retention(model, tokenizer, dialogues, **kwargs)
    result["dialogues"] = {"count": count, "max_distance": max_distance, "seed": seed, "split": "heldout"}
    return result


def describe_retention(result: Mapping[str, Any]) -> str:
    """What a retention result measured, in words: which dialogues and how many recall questions."""
    dialogues = result.get("dialogues")
    questions = f"{result['memory']['n']:,} recall questions"
    if not dialogues:
        return questions
    return (f"{dialogues['count']:,} {dialogues['split']} dialogues, fact-question distances 1-"
            f"{dialogues['max_distance']}, corpus seed {dialogues['seed']}; {questions}")


def format_retention(result: Mapping[str, Any]) -> str:
    """The accuracy table of a retention result, headed by what it measured, plus the answer perplexities when
    they were computed."""
    lines = [f"[{describe_retention(result)}]", result["table"]]
    if result.get("perplexity"):
        ppl = result["perplexity"]
        lines.append(f"answer perplexity: memory {ppl['memory']:.3f}, reset {ppl['reset']:.3f}")
    return "\n".join(lines)


def compare_retention(before: Mapping[str, Any], after: Mapping[str, Any], names: tuple[str, str] = ("before",
                      "after")) -> str:
    """Two retention results on the same dialogues side by side (memory carried; ``after``'s reset baseline),
    then the overall change with its 95% noise band (two binomial standard errors of the difference), so that
    a change the question count cannot resolve is called noise rather than a gain or a loss."""
    if before.get("dialogues") != after.get("dialogues"):
        raise ValueError(f"cannot compare retention on different dialogues: {before.get('dialogues')} vs "
                         f"{after.get('dialogues')}")
    table = format_accuracy_table({names[0]: before["memory"], names[1]: after["memory"], "reset": after["reset"]})
    p0, p1 = before["memory"]["accuracy"], after["memory"]["accuracy"]
    n0, n1 = max(before["memory"]["n"], 1), max(after["memory"]["n"], 1)
    band = 2 * math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)
    change = p1 - p0
    verdict = "within noise" if abs(change) <= band else ("a gain" if change > 0 else "a loss")
    return "\n".join([f"[{describe_retention(after)}]", table,
                      f"change in recall, {names[0]} -> {names[1]}: {change:+.3f} (95% noise band +-{band:.3f}: "
                      f"{verdict})"])


@torch.no_grad()
def forced_choice_recall(model, tokenizer, dialogues: Any, *, rivals: int = 5, seed: int = 0) -> dict[str, Any]:
    """Does the memory hold the fact's value? A teacher-forced test that needs no fluent generation.

    For every recall probe of ``dialogues`` the interactions before the question are written into a fresh memory
    (reference answers), then the reference answer to the question is scored with its value and with ``rivals``
    other values of the same kind (``"Mia's kite is pink."`` vs ``"... is green."``): the probe counts as recalled
    when the true value's answer has the lowest NLL. The same with a fresh memory before the question ("reset")
    is the baseline: chance is ``1 / (rivals + 1)`` unless the model can guess from the question alone.

    Returns ``{"memory": accuracy, "reset": accuracy, "n": probes, "chance": 1 / (rivals + 1)}``.
    """
    rng = random.Random(seed)
    hits = {"memory": 0, "reset": 0}
    n = 0
    was_training = model.training
    model.eval()
    try:
        fresh = _fresh_memory(model, 1, seed).memory
        for record in _records(dialogues):
            probes = {p["turn"]: p for p in record.get("probes") or []}
            memory = fresh.clone()  # one memory per dialogue, written turn by turn with the reference answers
            turns = dialogue_turns(record)
            for k, turn in enumerate(turns):
                if k in probes:
                    others = [v for v in FACT_KINDS[probes[k]["kind"]] if v != probes[k]["expected"]]
                    values = [probes[k]["expected"], *rng.sample(others, min(rivals, len(others)))]
                    answers = [_with_value(turn["answer"], values[0], v) for v in values]
                    for mode, stm in (("memory", memory), ("reset", fresh)):
                        nll, _, _ = _answer_nll(model, tokenizer, [turn["query"]] * len(values), answers,
                                                stm.expand(len(values), -1, -1, -1))
                        hits[mode] += int(nll.argmin() == 0)
                    n += 1
                if k + 1 == len(turns):
                    break  # nothing reads a write after the last turn
                enc = tokenize_interactions(tokenizer, [turn["query"]], [turn["answer"]]).to(model.device)
                memory = compute_memory_update(model, enc["input_ids"], enc["attention_mask"], memory)
    finally:
        model.train(was_training)
    if not n:
        raise ValueError("the dialogues have no 'probes' (recall questions); use build_memory_dialogues()")
    return {"memory": hits["memory"] / n, "reset": hits["reset"] / n, "n": n, "chance": 1 / (rivals + 1)}


def _with_value(answer: str, value: str, other: str) -> str:
    """The reference answer with its fact value (a whole word) replaced by another value."""
    return re.sub(rf"\b{re.escape(value)}\b", other, answer)
