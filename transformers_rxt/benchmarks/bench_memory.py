"""Memory benchmark: RxT trained by the curriculum vs stateless transformers decoders that re-read the chat.

Three models, one tokenizer (the RxT model's), one corpus (the embedded synthetic one):

* **RxT**: a model trained by ``rxt train`` (``--rxt OUT/hub``). Each turn its decoder reads the new query plus
  the fixed-size STM; the interaction is written into the STM after the answer.
* **stateless, decoder shape**: a ``LlamaForCausalLM`` with the RxT decoder's width, depth, heads and
  feed-forward size;
* **stateless, RxT params**: a ``LlamaForCausalLM`` as wide as needed (at the decoder's depth) to have RxT's
  total parameter count (decoder + encoder + memory attention + embedding).

The stateless decoders are trained here from scratch, one thread, seeded, for the RxT curriculum's training
time (the trainer time its ``stage_report.json`` files record; ``--budget-seconds`` overrides): first
pre-training paragraphs (all tokens), then whole multi-turn train-split dialogues rendered with the chat
template as one sequence (loss on the answers only). They see a fixed context window of ``--context`` tokens
(their training length): a prompt keeps the newest whole turns of the history that fit in the window with
room for the answer (``--context`` minus 32 tokens); older turns are dropped.

Measured, side by side, in one session:

1. recall per distance on held-out 9-turn dialogues (the dialogues, seed, greedy decoding and key-word
   scoring of ``rxt eval-memory``; every model keeps its own earlier answers in its history or memory), the
   teacher-forced answer perplexity, and training time;
2. the same on long held-out dialogues (``--long-turns``, facts asked up to ``--long-max-distance`` turns
   later), distances bucketed, where the window makes the stateless decoders drop the oldest turns;
3. per-turn cost: milliseconds per turn over a long chat at batch 1, the models taking turns (rotating order)
   at every chat turn; every model generates the reference answer's token count, so the work per turn differs
   only in what the model reads (RxT: query + STM, with its memory update; stateless: history + query).

Run: ``python benchmarks/bench_memory.py --rxt outputs/main/hub`` (reads ``outputs/main/stage*/
stage_report.json``). Smoke run: ``--budget-seconds 20 --dialogues 16 --long-dialogues 8``. Re-evaluate saved
baselines: ``--skip-train --baseline-dirs DIR_SHAPE DIR_PARAMS`` (written under ``--save-dir`` by a run).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from transformers_rxt import RxTForConversationalGeneration, load_rxt_tokenizer, tokenize_prompt
from transformers_rxt.data.synthetic import dialogue_turns, memory_dialogues, pretraining_texts, score_dialogue_answers
from transformers_rxt.tokenization_rxt import pad_sequences, tokenize_interaction_records
from transformers_rxt.training.evaluation import evaluate_memory_retention

MAX_NEW_TOKENS = 32  # as evaluate_memory_retention; also the answer room kept free in a stateless window
SHAPE, PARAMS = "stateless, decoder shape", "stateless, RxT params"
BASELINE_KEYS = {SHAPE: "shape", PARAMS: "params"}  # --train-only's names, and the save folders' (stateless-KEY)
LONG_BUCKETS = ((1, 4), (5, 8), (9, 16), (17, 24), (25, 32), (33, 10_000))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ RxT side


def find_stage_reports(rxt_dir: Path, output_root: Path | None) -> list[dict]:
    """The curriculum's stage reports: under ``output_root``, or beside the model (``OUT/hub`` -> ``OUT``).
    A model that is a stage's output (``OUT/stage4``) counts only the stages up to its own."""
    last = int(rxt_dir.name[5:]) if re.fullmatch(r"stage\d", rxt_dir.name) else 9
    for root in ([output_root] if output_root else [rxt_dir, rxt_dir.parent]):
        files = [f for f in sorted(Path(root).glob("stage*/stage_report.json"))
                 if re.fullmatch(r"stage\d", f.parent.name) and int(f.parent.name[5:]) <= last]
        if files:
            return [json.loads(f.read_text()) for f in files]
    return []


def rxt_training_seconds(reports: list[dict]) -> dict:
    """Training time of the curriculum: CPU time where a report has it, else the trainer's run time (wall
    clock, which is at least the CPU time of a one-thread run), else the stage's wall time (stage 0).
    A wall clock counts once per process and thread the stage ran (``world_size`` x ``torch_threads``): the main
    job trains stages 1-4 as two one-thread processes, so its CPU budget is twice its wall time, and the
    stateless baselines, trained on one thread, get that much CPU time (for a many-thread stage an upper bound)."""
    seconds, clocks = 0.0, []
    for r in reports:
        for key, clock in (("cpu_time_s", "cpu"), ("train_runtime_s", "trainer wall"), ("wall_time_s", "wall")):
            if r.get(key) is not None:
                cores = 1 if clock == "cpu" else int(r.get("world_size") or 1) * int(r.get("torch_threads") or 1)
                seconds += float(r[key]) * cores
                clocks.append(clock if cores == 1 else f"{clock} x {cores}")
                break
    return {"seconds": seconds, "clock": "+".join(sorted(set(clocks))) or "none",
            "stage_wall_s": sum(float(r.get("wall_time_s") or 0) for r in reports),
            "stages": [r.get("stage") for r in reports]}


# ----------------------------------------------------------------------------------------- stateless side


def llama_config(tokenizer, dim: int, layers: int, heads: int, ff: int, context: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ff,
                       max_position_embeddings=context, tie_word_embeddings=False, hidden_act="silu",
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def count_parameters(config: LlamaConfig) -> int:
    with torch.device("meta"):  # no memory, no init time
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def stateless_configs(rxt, tokenizer, context: int) -> dict[str, LlamaConfig]:
    """The decoder-shaped config, and one with RxT's total parameter count: the decoder's depth and head size,
    the width whose ff = 2 x width count comes closest, then ff (a multiple of 8) set to close the gap."""
    dec = rxt.config.decoder_config
    dim, layers, heads = dec["embed_dim"], dec["num_layers"], dec["att_heads"]
    shape = llama_config(tokenizer, dim, layers, heads, dec["ff_dim"], context)
    target, head_dim = rxt.num_parameters(), dim // heads

    def count(width, ff):
        return count_parameters(llama_config(tokenizer, width, layers, width // head_dim, ff, context))

    width = min(range(head_dim, 16 * dim + 1, head_dim), key=lambda w: abs(count(w, 2 * w) - target))
    per_ff_unit = 3 * width * layers  # gate, up and down projections
    ff = max(8, 2 * width + round((target - count(width, 2 * width)) / per_ff_unit / 8) * 8)
    matched = llama_config(tokenizer, width, layers, width // head_dim, ff, context)
    return {SHAPE: shape, PARAMS: matched}


def describe(config: LlamaConfig) -> str:
    return (f"dim {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
            f"ff {config.intermediate_size}")


def dialogue_rows(tokenizer, dialogues: list[dict], context: int) -> list[tuple[list[int], list[int]]]:
    """Each dialogue as one chat-template sequence (interactions back to back), labels on the answers only."""
    turns = [dialogue_turns(d) for d in dialogues]
    ids, labels = tokenize_interaction_records(tokenizer, [t for ts in turns for t in ts])
    rows, at = [], 0
    for ts in turns:
        seq = [i for one in ids[at:at + len(ts)] for i in one]
        lab = [i for one in labels[at:at + len(ts)] for i in one]
        rows.append((seq[:context], lab[:context]))
        at += len(ts)
    return rows


def paragraph_rows(tokenizer, texts: list[str], context: int) -> list[tuple[list[int], list[int]]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        seq = [bos, *ids, eos][:context]
        rows.append((seq, seq))
    return rows


def shuffled_batches(rows: list, batch_size: int, rng: random.Random):
    """Batches of rows, reshuffled every epoch, forever."""
    while True:
        order = rng.sample(range(len(rows)), len(rows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[i] for i in order[start:start + batch_size]]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (labels padded with -100)."""
    batch = pad_sequences([ids for ids, _ in rows], pad_token_id=pad_id, labels=[lab for _, lab in rows])
    return dict(batch)


def train_stateless(model, tokenizer, args, name: str) -> dict:
    """Train for ``args.budget_seconds`` of this process's CPU time (``--budget-clock wall``: wall time).

    The learning rate follows the budget, not a step count: linear warm-up over the first steps, then a cosine
    over the elapsed share of the budget, down to 10 %.
    """
    budget, context, pad_id = args.budget_seconds, args.context, tokenizer.pad_token_id
    pool = min(12_000, 256 + int(40 * budget))  # enough rows for one epoch at ~30 rows/s; cycled if not
    texts = pretraining_texts(pool, seed=args.corpus_seed)
    dialogues = memory_dialogues(pool, 8, seed=args.corpus_seed, split="train")
    # Separate orders: where the switch to dialogues falls depends on the clock, the dialogue order must not.
    pretrain = shuffled_batches(paragraph_rows(tokenizer, texts, context), args.batch_size,
                                random.Random(args.train_seed))
    chats = shuffled_batches(dialogue_rows(tokenizer, dialogues, context), args.batch_size,
                             random.Random(args.train_seed + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    clock = time.process_time if args.budget_clock == "cpu" else time.perf_counter
    model.train()
    start, step, tokens, next_report, losses = clock(), 0, 0, 0.1, []
    while (used := clock() - start) < budget:
        share = used / budget
        batch = collate(next(pretrain if share < args.pretrain_share else chats), pad_id)
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * share)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, tokens = step + 1, tokens + int(batch["attention_mask"].sum())
        losses.append(loss.item())
        if share >= next_report:
            phase = "paragraphs" if share < args.pretrain_share else "dialogues"
            log(f"[train {name}] {share:4.0%} of {budget:.0f} s: step {step}, {phase}, "
                f"loss {statistics.mean(losses[-20:]):.3f}, lr {lr:.2e}")
            next_report += 0.1
    model.eval()
    return {"seconds": round(clock() - start, 1), "clock": args.budget_clock, "steps": step, "tokens": tokens,
            "final_loss": statistics.mean(losses[-20:]) if losses else None, "batch_size": args.batch_size,
            "lr": args.lr, "pretrain_share": args.pretrain_share, "context": context, "seed": args.train_seed}


def train_or_load_baselines(rxt, tokenizer, args) -> dict[str, tuple[LlamaForCausalLM, dict]]:
    if args.skip_train:
        if not args.baseline_dirs or len(args.baseline_dirs) != 2:
            raise SystemExit("--skip-train needs --baseline-dirs DIR_SHAPE DIR_PARAMS")
        out = {}
        for name, folder in zip((SHAPE, PARAMS), args.baseline_dirs):
            report = json.loads((Path(folder) / "train_report.json").read_text())
            out[name] = (LlamaForCausalLM.from_pretrained(folder).eval(), report)
        return out
    out = {}
    for name, config in stateless_configs(rxt, tokenizer, args.context).items():
        if args.train_only not in (None, BASELINE_KEYS[name]):
            continue
        torch.manual_seed(args.train_seed)
        model = LlamaForCausalLM(config)
        log(f"[train {name}] {describe(config)}: {model.num_parameters() / 1e6:.3f} M parameters, "
            f"{args.budget_seconds:.0f} s ({args.budget_clock})")
        report = train_stateless(model, tokenizer, args, name)
        folder = Path(args.save_dir) / f"stateless-{BASELINE_KEYS[name]}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "train_report.json").write_text(json.dumps(report, indent=2))
        out[name] = (model, report)
    return out


# -------------------------------------------------------------------------------------- stateless chatting


def history_in_window(history: list[list[int]], prompt_len: int, limit: int | None) -> list[int]:
    """The newest whole turns of ``history`` that fit before a prompt of ``prompt_len`` within ``limit``."""
    kept, size = [], prompt_len
    for turn in reversed(history):
        if limit is not None and size + len(turn) > limit:
            break
        kept.append(turn)
        size += len(turn)
    return [token for turn in reversed(kept) for token in turn]


@torch.no_grad()
def greedy_answers(model, seqs: list[list[int]], pad_id: int, eos_id: int, new_tokens: int | None = None):
    """Greedy answer ids (up to, without, [EOS]); ``new_tokens`` forces that many tokens (timing)."""
    batch = pad_sequences(seqs, pad_token_id=pad_id, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    fixed = {"min_new_tokens": new_tokens} if new_tokens else {}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens or MAX_NEW_TOKENS,
                         do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id, **fixed)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


@torch.no_grad()
def answer_nll(model, contexts: list[list[int]], interactions: list[list[int]], labels: list[list[int]], pad_id):
    """Summed NLL and count of the answer tokens of each interaction, read after its context."""
    rows = [(c + i, [-100] * len(c) + lab) for c, i, lab in zip(contexts, interactions, labels)]
    batch = collate(rows, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    keep = target != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep
    return float(nll.sum()), int(keep.sum())


def evaluate_stateless(model, tokenizer, dialogues: list[dict], window: int, batch_size: int, name: str) -> dict:
    """Greedy chat over each dialogue, the model's own answers kept in its history (windowed), scored like
    ``evaluate_memory_retention``; plus the teacher-forced answer perplexity (reference history, same window)."""
    pad_id, eos_id, limit = tokenizer.pad_token_id, tokenizer.eos_token_id, window - MAX_NEW_TOKENS
    answers: list[list[str]] = []
    nll = tokens = dropped = 0
    prompt_tokens: dict[int, list[int]] = {}
    for start in range(0, len(dialogues), batch_size):
        turns = [dialogue_turns(d) for d in dialogues[start:start + batch_size]]
        own: list[list[list[int]]] = [[] for _ in turns]
        ref: list[list[list[int]]] = [[] for _ in turns]
        texts: list[list[str]] = [[] for _ in turns]
        for k in range(len(turns[0])):
            records = [t[k] for t in turns]
            inter, labels = tokenize_interaction_records(tokenizer, records)
            prompts = [tokenize_prompt(tokenizer, r["query"])["input_ids"] for r in records]
            contexts = [history_in_window(ref[i], len(p), limit) for i, p in enumerate(prompts)]
            n, c = answer_nll(model, contexts, inter, labels, pad_id)
            nll, tokens = nll + n, tokens + c
            seqs = []
            for i, p in enumerate(prompts):
                kept = history_in_window(own[i], len(p), limit)
                dropped += len(kept) < sum(map(len, own[i]))
                seqs.append(kept + p)
            prompt_tokens.setdefault(k + 1, []).extend(map(len, seqs))
            for i, (p, a) in enumerate(zip(prompts, greedy_answers(model, seqs, pad_id, eos_id))):
                own[i].append(p + a + [eos_id])
                ref[i].append(inter[i])
                texts[i].append(tokenizer.decode(a, skip_special_tokens=True))
        answers += texts
        log(f"[eval {name}] {min(start + batch_size, len(dialogues))}/{len(dialogues)} dialogues")
    score = score_dialogue_answers(answers, dialogues)
    score.pop("correct")
    return {**score, "perplexity": math.exp(nll / max(tokens, 1)), "window": window, "turns_with_dropped_history":
            dropped, "mean_prompt_tokens": {k: statistics.mean(v) for k, v in prompt_tokens.items()}}


def evaluate_rxt(model, tokenizer, dialogues: list[dict], batch_size: int) -> dict[str, dict]:
    """``evaluate_memory_retention`` as ``rxt eval-memory`` runs it (initial memories seeded 0): memory carried,
    and reset every turn."""
    result = evaluate_memory_retention(model, tokenizer, dialogues, batch_size=batch_size)
    return {run: {**result[run], "perplexity": result["perplexity"][run]} for run in ("memory", "reset")}


# --------------------------------------------------------------------------------------------- turn cost


@torch.no_grad()
def per_turn_cost(rxt, stateless: dict, tokenizer, dialogues: list[dict], new_tokens: int) -> dict:
    """Median CPU and wall ms per turn and prompt tokens per turn, batch 1, the contenders taking turns (in a
    rotating order) at every chat turn.

    ``stateless`` maps a name to ``(model, limit)`` (``limit``: prompt token limit, None = whole history). The
    history is the reference turns, and every model generates exactly ``new_tokens`` tokens per turn, so the
    work per turn differs only in what the model reads. CPU time (one thread) is what the load of a shared
    machine disturbs least; wall time is kept too.
    """
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    names = ["RxT", *stateless]
    cpu_ms: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    wall_ms: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    lengths: dict[str, dict[int, int]] = {n: {} for n in names}

    def rxt_turn(prompt, stm):
        ids = torch.tensor([prompt])
        rxt.generate(input_ids=ids, attention_mask=torch.ones_like(ids), stm=stm, max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, do_sample=False, memory_update="sync")
        return len(prompt)

    def stateless_turn(name, prompt, history):
        model, limit = stateless[name]
        seq = history_in_window(history, len(prompt), limit) + prompt
        greedy_answers(model, [seq], pad_id, eos_id, new_tokens)
        return len(seq)

    for d, dialogue in enumerate(dialogues):
        turns = dialogue_turns(dialogue)
        inter, _ = tokenize_interaction_records(tokenizer, turns)
        stm = rxt.init_memory(1, generator=torch.Generator().manual_seed(d))
        history: list[list[int]] = []
        for k, turn in enumerate(turns):
            prompt = tokenize_prompt(tokenizer, turn["query"])["input_ids"]
            if d == 0 and k == 0:  # warm-up, untimed
                rxt_turn(prompt, rxt.init_memory(1))
                for name in stateless:
                    stateless_turn(name, prompt, [])
            for name in names[k % len(names):] + names[:k % len(names)]:
                wall, cpu = time.perf_counter(), time.process_time()
                n = rxt_turn(prompt, stm) if name == "RxT" else stateless_turn(name, prompt, history)
                cpu_ms[name].setdefault(k + 1, []).append(1e3 * (time.process_time() - cpu))
                wall_ms[name].setdefault(k + 1, []).append(1e3 * (time.perf_counter() - wall))
                lengths[name][k + 1] = max(lengths[name].get(k + 1, 0), n)
            history.append(inter[k])
        log(f"[cost] dialogue {d + 1}/{len(dialogues)}")
    return {name: {"cpu_ms": {k: statistics.median(v) for k, v in cpu_ms[name].items()},
                   "wall_ms": {k: statistics.median(v) for k, v in wall_ms[name].items()},
                   "prompt_tokens": lengths[name]} for name in names}


# ------------------------------------------------------------------------------------------------ tables


def recall_rows(score: dict, buckets: Sequence[tuple[int, int]] | None) -> dict[str, tuple[float, int]]:
    """``{row label: (accuracy, probes)}`` per distance, or per distance bucket."""
    per, counts = score["per_distance"], score["counts"]
    if buckets is None:
        return {str(d): (per[d], counts[d]) for d in sorted(counts)}
    rows = {}
    for lo, hi in buckets:
        inside = [d for d in counts if lo <= d <= hi]
        n = sum(counts[d] for d in inside)
        if n:
            label = f"{lo}+" if hi >= 10_000 else f"{lo}-{hi}"
            rows[label] = (sum(per[d] * counts[d] for d in inside) / n, n)
    return rows


def recall_table(results: dict[str, dict], buckets=None) -> str:
    names = list(results)
    rows = {n: recall_rows(results[n], buckets) for n in names}
    first = rows[names[0]]
    lines = ["| distance | " + " | ".join(names) + " | probes |", "|---" + "|---:" * (len(names) + 1) + "|"]
    for label in first:
        cells = " | ".join(f"{rows[n][label][0]:.3f}" if label in rows[n] else "-" for n in names)
        lines.append(f"| {label} | {cells} | {first[label][1]} |")
    lines.append("| all | " + " | ".join(f"{results[n]['accuracy']:.3f}" for n in names)
                 + f" | {results[names[0]]['n']} |")
    lines.append("| answer perplexity | " + " | ".join(f"{results[n]['perplexity']:.3f}" for n in names) + " | |")
    return "\n".join(lines)


def cost_table(cost: dict, turns: int) -> str:
    names = list(cost)
    shown = sorted({*range(1, turns + 1, 4), turns})
    head = " | ".join(f"{n}: CPU ms | prompt tokens" for n in names)
    lines = [f"| turn | {head} |", "|---:" + "|---:" * (2 * len(names)) + "|"]
    for k in shown:
        cells = " | ".join(f"{cost[n]['cpu_ms'][k]:.1f} | {cost[n]['prompt_tokens'][k]}" for n in names)
        lines.append(f"| {k} | {cells} |")
    # Single turns are noisy on a loaded machine: compare the median of the last few turns with the first few.
    span = max(1, min(4, turns // 2))
    first, last = range(1, span + 1), range(turns - span + 1, turns + 1)

    def ratio(series: dict[int, float]) -> str:
        return f"{statistics.median(series[k] for k in last) / statistics.median(series[k] for k in first):.2f}x"

    for clock in ("cpu_ms", "wall_ms"):
        cells = " | ".join(f"{ratio(cost[n][clock])} | {ratio(cost[n]['prompt_tokens'])}" for n in names)
        lines.append(f"| turns {last.start}-{turns} / turns 1-{span} ({clock.split('_')[0]}) | {cells} |")
    return "\n".join(lines)


def models_table(rxt, rxt_time: dict, baselines: dict, args) -> str:
    dec = rxt.config.decoder_config
    lines = ["| model | shape | parameters | training time s | clock | steps | reads per turn |",
             "|---|---|---:|---:|---|---:|---|"]
    lines.append(f"| RxT ({args.rxt}) | decoder dim {dec['embed_dim']}, {dec['num_layers']} layers, "
                 f"{dec['att_heads']} heads, ff {dec['ff_dim']}; STM {rxt.config.stm_size} slots | "
                 f"{rxt.num_parameters() / 1e6:.3f} M | {rxt_time['seconds']:.1f} | {rxt_time['clock']} "
                 f"(stage reports) | - | query + STM |")
    for name, (model, report) in baselines.items():
        lines.append(f"| {name} | {describe(model.config)} | {model.num_parameters() / 1e6:.3f} M | "
                     f"{report['seconds']:.1f} | {report['clock']} | {report['steps']} | "
                     f"history + query, window {report['context']} tokens |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rxt", required=True, help="trained RxT model directory (with its tokenizer), e.g. "
                                                     "outputs/main/hub")
    parser.add_argument("--rxt-output", default=None, help="the curriculum's output root with stage*/"
                        "stage_report.json (default: the model directory or its parent)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="training time of each stateless decoder (default: the RxT curriculum's)")
    parser.add_argument("--budget-clock", choices=["cpu", "wall"], default="cpu",
                        help="how the stateless training budget is counted (this process's CPU time or wall time)")
    parser.add_argument("--dialogues", type=int, default=512, help="held-out 9-turn dialogues")
    parser.add_argument("--long-dialogues", type=int, default=128, help="held-out long dialogues (0 = skip)")
    parser.add_argument("--long-turns", type=int, default=32)
    parser.add_argument("--long-max-distance", type=int, default=24, help="longest fact-question distance there")
    parser.add_argument("--cost-dialogues", type=int, default=3, help="long dialogues timed turn by turn (0 = skip)")
    parser.add_argument("--cost-new-tokens", type=int, default=16, help="tokens generated per timed turn")
    parser.add_argument("--seed", type=int, default=2, help="held-out corpus seed (2: the one rxt eval-memory uses)")
    parser.add_argument("--corpus-seed", type=int, default=0, help="training corpus seed (the trainers' one)")
    parser.add_argument("--train-seed", type=int, default=0, help="initialisation and data-order seed")
    parser.add_argument("--context", type=int, default=256, help="stateless training length and window (tokens)")
    parser.add_argument("--batch-size", type=int, default=16, help="stateless training batch")
    parser.add_argument("--lr", type=float, default=2e-3, help="stateless peak learning rate")
    parser.add_argument("--pretrain-share", type=float, default=0.25, help="budget share of pre-training text")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for every model")
    parser.add_argument("--save-dir", default="outputs/bench_memory", help="where trained baselines are saved")
    parser.add_argument("--skip-train", action="store_true", help="load the baselines from --baseline-dirs")
    parser.add_argument("--train-only", choices=list(BASELINE_KEYS.values()), default=None,
                        help="train and save only this baseline, then stop (two such runs side by side use two "
                             "cores; then evaluate with --skip-train --baseline-dirs)")
    parser.add_argument("--baseline-dirs", nargs=2, metavar=("SHAPE_DIR", "PARAMS_DIR"), default=None)
    parser.add_argument("--output", default=None, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.train_only and args.skip_train:
        parser.error("--train-only trains a baseline and --skip-train loads them: pass one of the two")
    return args


def machine_load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began, load_before = time.perf_counter(), machine_load()
    rxt = RxTForConversationalGeneration.from_pretrained(args.rxt).eval()
    tokenizer = load_rxt_tokenizer(args.rxt)
    rxt_time = rxt_training_seconds(find_stage_reports(Path(args.rxt), args.rxt_output and Path(args.rxt_output)))
    if args.budget_seconds is None:
        if not rxt_time["seconds"]:
            raise SystemExit(f"no stage_report.json beside {args.rxt}: pass --rxt-output or --budget-seconds")
        args.budget_seconds = rxt_time["seconds"]
    baselines = train_or_load_baselines(rxt, tokenizer, args)
    if args.train_only:  # one baseline trained and saved; the evaluation runs later with --skip-train
        return {"budget_seconds": args.budget_seconds, "trained": {n: rep for n, (_, rep) in baselines.items()}}

    settings = {"9 turns": dict(count=args.dialogues, max_distance=8, turns=None, buckets=None)}
    if args.long_dialogues:
        settings[f"{args.long_turns} turns"] = dict(count=args.long_dialogues, max_distance=args.long_max_distance,
                                                    turns=args.long_turns, buckets=LONG_BUCKETS)
    results = {}
    for label, s in settings.items():
        dialogues = memory_dialogues(s["count"], s["max_distance"], seed=args.seed, split="heldout",
                                     num_turns=s["turns"])
        log(f"[eval RxT] {label}: {len(dialogues)} held-out dialogues")
        rxt_scores = evaluate_rxt(rxt, tokenizer, dialogues, args.eval_batch_size)
        scores = {"RxT": rxt_scores["memory"], "RxT, memory reset": rxt_scores["reset"]}
        for name, (model, _) in baselines.items():
            scores[name] = evaluate_stateless(model, tokenizer, dialogues, args.context, args.eval_batch_size, name)
        results[label] = {"dialogues": {"count": s["count"], "max_distance": s["max_distance"],
                                        "turns": s["turns"] or s["max_distance"] + 1, "seed": args.seed,
                                        "split": "heldout"}, "scores": scores}

    cost = None
    if args.cost_dialogues:
        dialogues = memory_dialogues(args.cost_dialogues, args.long_max_distance, seed=args.seed, split="heldout",
                                     num_turns=args.long_turns)
        shape_model, params_model = baselines[SHAPE][0], baselines[PARAMS][0]
        window = args.context - MAX_NEW_TOKENS
        cost = per_turn_cost(rxt, {SHAPE: (shape_model, None), PARAMS: (params_model, None),
                                   f"{SHAPE}, window {args.context}": (shape_model, window)}, tokenizer, dialogues,
                             args.cost_new_tokens)

    budget = (f"stateless decoders loaded from {' and '.join(args.baseline_dirs)}" if args.skip_train else
              f"stateless training budget {args.budget_seconds:.0f} s ({args.budget_clock}) each")
    print(f"# Memory benchmark: RxT vs stateless decoders\n\nRxT: {args.rxt}; {args.threads} thread(s); {budget}; "
          f"load: {load_before}\n")
    print(models_table(rxt, rxt_time, baselines, args) + "\n")
    for label, r in results.items():
        d = r["dialogues"]
        buckets = settings[label]["buckets"]
        print(f"## Recall per distance, {d['count']} held-out {d['turns']}-turn dialogues (seed {d['seed']}), "
              f"own answers kept; stateless window {args.context} tokens\n")
        print(recall_table(r["scores"], buckets) + "\n")
        dropped = {n: s["turns_with_dropped_history"] for n, s in r["scores"].items() if n.startswith("stateless")}
        print(f"turns where the stateless window dropped history: {dropped}\n")
    if cost:
        print(f"## Per-turn cost, batch 1, {args.cost_new_tokens} generated tokens per turn, median of "
              f"{args.cost_dialogues} held-out {args.long_turns}-turn dialogues (RxT: answer + memory update; "
              f"stateless without a window re-read the whole history)\n")
        print(cost_table(cost, args.long_turns) + "\n")
    elapsed = time.perf_counter() - began
    print(f"benchmark run time {elapsed:.0f} s; load after: {machine_load()}")

    out = {"rxt": {"model": args.rxt, "parameters": rxt.num_parameters(), "training": rxt_time},
           "stateless": {n: {"config": describe(m.config), "parameters": m.num_parameters(), "training": rep}
                         for n, (m, rep) in baselines.items()},
           "budget_seconds": args.budget_seconds, "threads": args.threads, "settings": results, "cost": cost,
           "load": {"before": load_before, "after": machine_load()}, "run_time_s": round(elapsed, 1)}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
        print(f"[written to {args.output}]")
    return out


if __name__ == "__main__":
    main()
