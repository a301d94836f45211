"""Sparse Query Attention benchmark: speed of MHA / GQA / SQA / sSQA / xSQA, and a short quality comparison.

Speed (``--speed``):
  * one attention layer (a stock ``LlamaAttention`` with ``attn_implementation="sqa"``: projections, RoPE and
    the kernel), forward and forward+backward, batch 1, pure causal (no padding);
  * a small full ``LlamaForCausalLM`` (loss on all tokens), forward and forward+backward.
  Sequence lengths: 1k-16k on CPU (``--quick``: 1k-4k), 32k-128k on CUDA. All variants run the same "sqa"
  kernel; a stock-``sdpa`` GQA row checks that the kernel is no slower than transformers' own. Reported:
  best-of-N time (variants interleaved), speed-up vs GQA and vs MHA, the theoretical H/H_q, and the speed-up
  vs GQA as a share of the theoretical one.

Quality (``--quality``): byte-level tiny Llama models, same data, same steps, same seeds (3 by default),
trained from scratch per variant; then a trained MHA model converted with ``convert_to_sqa`` (select / pool)
to each variant: loss right after conversion (the jump) and after a few up-training steps.

Machines here are noisy: compare ratios within one run, not absolute times across runs.

Usage::

    python benchmarks/bench_sqa.py --quick                 # a couple of minutes on a 2-core CPU
    python benchmarks/bench_sqa.py --speed --quality --markdown benchmarks/sqa_tables.md
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from transformers_rxt.sqa import convert_to_sqa, register_sqa_attention, sqa_config


register_sqa_attention()


@dataclass(frozen=True)
class Variant:
    name: str
    q_heads: int
    kv_heads: int
    attn_implementation: str = "sqa"


def variants(num_heads: int, with_stock: bool = False) -> list[Variant]:
    """The paper's geometries for a baseline of ``num_heads`` heads (GQA with H/4 key/value heads)."""
    h = num_heads
    out = [
        Variant("MHA", h, h),
        Variant("GQA", h, h // 4),
        Variant("SQA", h // 2, h // 4),
        Variant("sSQA", h // 2, h // 2),
        Variant("xSQA", h // 4, h // 4),
    ]
    if with_stock:
        out.insert(2, Variant("GQA (stock sdpa)", h, h // 4, "sdpa"))
    return out


def make_config(
    v: Variant, hidden: int, num_heads: int, layers: int, vocab: int, max_pos: int
) -> LlamaConfig:
    base = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
    )
    cfg = sqa_config(base, "sqa", num_query_heads=v.q_heads, num_key_value_heads=v.kv_heads)
    cfg._attn_implementation = v.attn_implementation
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, timer: str, warmup: bool = True
) -> dict[str, float]:
    """Best-of-``repeats`` time of each function, the functions interleaved round-robin.

    Interleaving and taking the minimum keep the *ratios* meaningful on a shared, noisy machine: a burst of
    background load slows one round of every variant rather than all rounds of one variant. With
    ``timer="cpu"`` the process's CPU time is measured instead of wall time, which other processes on the
    machine barely affect.
    """
    clock = time.process_time if timer == "cpu" else time.perf_counter
    if warmup:  # allocations, lazy inits, kernel selection
        for fn in fns.values():
            fn()
        _sync(device)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            _sync(device)
            best[name] = min(best[name], clock() - start)
    return best


# ---------------------------------------------------------------------------------------------------- speed


def bench_layer(v: Variant, seq: int, args, device, dtype) -> tuple[Callable[[], None], Callable[[], None]]:
    cfg = make_config(v, args.layer_hidden, args.layer_heads, 1, 128, max(seq, 2048))
    attn = LlamaAttention(cfg, layer_idx=0).to(device=device, dtype=dtype)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    x = torch.randn(1, seq, cfg.hidden_size, device=device, dtype=dtype)
    pos = torch.arange(seq, device=device)[None]
    cos, sin = rope(x, pos)

    def fwd():
        with torch.no_grad():
            attn(x, position_embeddings=(cos, sin), attention_mask=None)

    xg = x.detach().requires_grad_(True)

    def fwd_bwd():
        out, _ = attn(xg, position_embeddings=(cos, sin), attention_mask=None)
        out.float().sum().backward()
        xg.grad = None
        attn.zero_grad(set_to_none=True)

    return fwd, fwd_bwd


def bench_model(v: Variant, seq: int, args, device, dtype) -> tuple[Callable[[], None], Callable[[], None]]:
    cfg = make_config(v, args.model_hidden, args.model_heads, args.model_layers, 512, max(seq, 2048))
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, 512, (1, seq), device=device)

    def fwd():
        model.eval()
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)

    def fwd_bwd():
        model.train()
        model(ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    return fwd, fwd_bwd


def speed_table(title: str, rows: dict[int, dict[str, float]], vs: list[Variant], num_heads: int) -> str:
    """One markdown table: time per variant, speed-up vs GQA / MHA, share of the theoretical H/H_q."""
    names = [v.name for v in vs]
    sqa_like = [v for v in vs if v.q_heads < num_heads]
    head = ["tokens"] + [f"{n} (s)" for n in names]
    head += [f"{v.name} vs GQA (theory {num_heads / v.q_heads:g}x)" for v in sqa_like]
    head += [f"{v.name} vs MHA" for v in sqa_like]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seq, t in rows.items():
        cells = [f"{seq:,}"] + [f"{t[n]:.4f}" for n in names]
        for v in sqa_like:
            ratio = t["GQA"] / t[v.name]
            cells.append(f"{ratio:.2f}x ({ratio / (num_heads / v.q_heads):.0%})")
        cells += [f"{t['MHA'] / t[v.name]:.2f}x" for v in sqa_like]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_speed(args, device: torch.device, dtype: torch.dtype) -> str:
    out = []
    for what, fn, seqs, heads, with_stock in (
        ("attention layer", bench_layer, args.layer_seqs, args.layer_heads, True),
        ("full model", bench_model, args.model_seqs, args.model_heads, False),
    ):
        vs = variants(heads, with_stock)
        fwd_rows: dict[int, dict[str, float]] = {}
        bwd_rows: dict[int, dict[str, float]] = {}
        for seq in seqs:
            closures = {v.name: fn(v, seq, args, device, dtype) for v in vs}
            warm = seq == seqs[0]  # later lengths reuse the warmed-up code paths
            fwd_rows[seq] = time_interleaved(
                {n: c[0] for n, c in closures.items()}, device, args.repeats, args.timer, warm
            )
            bwd_rows[seq] = time_interleaved(
                {n: c[1] for n, c in closures.items()}, device, args.repeats, args.timer, warm
            )
            del closures
            for v in vs:
                print(
                    f"[{what}] T={seq:>6} {v.name:<16} H_q={v.q_heads:>2} H_kv={v.kv_heads:>2} "
                    f"fwd {fwd_rows[seq][v.name]:.4f}s  fwd+bwd {bwd_rows[seq][v.name]:.4f}s",
                    flush=True,
                )
        if what == "attention layer":
            geo = f"hidden {args.layer_hidden}, H={heads}, head_dim {args.layer_hidden // heads}"
        else:
            geo = (
                f"{args.model_layers} layers, hidden {args.model_hidden}, H={heads}, "
                f"head_dim {args.model_hidden // heads}, vocab 512"
            )
        how = f"{args.timer} seconds, best of {args.repeats}"
        out.append(speed_table(f"{what} ({geo}) - forward, {how}", fwd_rows, vs, heads))
        out.append(speed_table(f"{what} ({geo}) - forward+backward, {how}", bwd_rows, vs, heads))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- quality

_NAMES = [
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "oscar",
]
_ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "mouse", "bear", "duck", "goat"]
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
_PLACES = ["the river", "the market", "the old mill", "the forest", "the school", "the harbour", "the hill"]
_VERBS = ["saw", "fed", "followed", "painted", "found", "chased", "helped", "called"]
_ITEMS = ["apples", "pears", "books", "coins", "stones", "letters", "shells"]


def synthetic_story(rng: random.Random) -> str:
    """A few sentences whose later half can only be predicted by looking back (names, counts, colours)."""
    who, other = rng.sample(_NAMES, 2)
    animal, color, place = rng.choice(_ANIMALS), rng.choice(_COLORS), rng.choice(_PLACES)
    count, item = rng.randint(2, 9), rng.choice(_ITEMS)
    verb = rng.choice(_VERBS)
    return (
        f"{who} had a {color} {animal} and {count} {item}. "
        f"one day {who} went to {place} with {other}. "
        f"there {other} {verb} the {color} {animal}. "
        f"{who} gave {other} {count} {item}, so {other} had {count} {item} too. "
        f"then {who} and {other} left {place}.\n"
    )


def corpus_text(n_paragraphs: int, seed: int) -> tuple[str, str]:
    """Text of the project's embedded synthetic corpus, or of the small story generator above without it."""
    try:
        from transformers_rxt.data import pretraining_texts
    except ImportError:
        rng = random.Random(seed)
        return "".join(synthetic_story(rng) for _ in range(n_paragraphs)), "built-in synthetic stories"
    text = "\n".join(pretraining_texts(n_paragraphs, seed=seed)) + "\n"
    return text, "transformers_rxt.data.pretraining_texts"


def corpus_tokens(n_paragraphs: int, seed: int) -> tuple[torch.Tensor, str]:
    """UTF-8 bytes of the corpus as token ids (byte-level vocabulary of 256)."""
    text, source = corpus_text(n_paragraphs, seed)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long), source


def batches(tokens: torch.Tensor, seq: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=g)
        yield torch.stack([tokens[s : s + seq] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model, tokens: torch.Tensor, seq: int) -> float:
    model.eval()
    n = (len(tokens) // seq) * seq
    chunks = tokens[:n].view(-1, seq)[:128]
    loss = model(chunks, labels=chunks).loss.item()
    model.train()
    return loss


def train(model, tokens, args, steps: int, seed: int, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    loss = float("nan")
    for x in batches(tokens, args.q_seq, args.q_batch, steps, seed):
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
    return loss


def run_quality(args) -> str:
    (train_tok, source), (eval_tok, _) = corpus_tokens(3000, seed=1), corpus_tokens(200, seed=2)
    heads = args.q_heads
    seeds = [args.seed + i for i in range(args.q_seeds)]
    evals: dict[str, list[float]] = {}
    finals: dict[str, list[float]] = {}
    cpu: dict[str, float] = {}
    params: dict[str, int] = {}
    trained = {}
    t0 = time.perf_counter()
    vs = variants(heads)
    for seed in seeds:
        for v in vs:
            cfg = make_config(v, args.q_hidden, heads, args.q_layers, 256, args.q_seq)
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
            start = time.process_time()
            final = train(model, train_tok, args, args.q_steps, seed, args.q_lr)
            cpu[v.name] = cpu.get(v.name, 0.0) + time.process_time() - start
            ev = eval_loss(model, eval_tok, args.q_seq)
            evals.setdefault(v.name, []).append(ev)
            finals.setdefault(v.name, []).append(final)
            params[v.name] = sum(p.numel() for p in model.parameters())
            if seed == seeds[0]:
                trained[v.name] = model
            print(f"[quality] seed {seed} {v.name:<5} eval loss {ev:.4f}", flush=True)
    mean = {name: statistics.fmean(vals) for name, vals in evals.items()}
    lines = [
        f"**From scratch** (byte-level {source}, {len(train_tok):,} training bytes, eval on "
        f"{min(len(eval_tok) // args.q_seq, 128) * args.q_seq:,} held-out bytes; {args.q_layers} layers, "
        f"hidden {args.q_hidden}, H={heads}; {args.q_steps} steps x {args.q_batch} x {args.q_seq} tokens, "
        f"AdamW lr {args.q_lr}; seeds {seeds}: init and batch order)",
        "",
        "| variant | H_q | H_kv | params | eval loss per seed | mean eval loss | mean - GQA "
        "| mean final train loss | train CPU s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in vs:
        per_seed = ", ".join(f"{x:.4f}" for x in evals[v.name])
        lines.append(
            f"| {v.name} | {v.q_heads} | {v.kv_heads} | {params[v.name]:,} | {per_seed} | {mean[v.name]:.4f} "
            f"| {mean[v.name] - mean['GQA']:+.4f} | {statistics.fmean(finals[v.name]):.4f} "
            f"| {cpu[v.name] / len(seeds):.0f} |"
        )
    scratch = {name: evals[name][0] for name in evals}

    # Conversion of the trained MHA model.
    base = trained["MHA"]
    base_eval = eval_loss(base, eval_tok, args.q_seq)
    lines += [
        "",
        f"**Conversion** of the trained MHA model above (seed {seeds[0]}, eval loss {base_eval:.4f}) with "
        "`convert_to_sqa`, "
        f"then {args.q_uptrain} up-training steps (lr {args.q_lr / 2:g}, new data order); the GQA conversion "
        "(mean-pooled K/V, as in GQA up-training) is the reference.",
        "",
        "| target | method | eval loss right after | jump | after up-training "
        f"| from-scratch eval loss of that variant (seed {seeds[0]}) |",
        "|---|---|---|---|---|---|",
    ]
    targets = [
        ("GQA", dict(num_query_heads=heads, num_key_value_heads=heads // 4)),
        ("SQA", dict(variant="sqa")),
        ("sSQA", dict(variant="ssqa")),
        ("xSQA", dict(variant="xsqa")),
    ]
    for name, kw in targets:
        for method in ("select", "pool"):
            if name == "GQA" and method == "select":
                continue
            model = copy.deepcopy(base)
            convert_to_sqa(model, method=method, **kw)
            jumped = eval_loss(model, eval_tok, args.q_seq)
            train(model, train_tok, args, args.q_uptrain, args.seed + 7, args.q_lr / 2)
            after = eval_loss(model, eval_tok, args.q_seq)
            lines.append(
                f"| {name} ({model.config.num_attention_heads}/{model.config.num_key_value_heads}) | "
                f"{method} | {jumped:.4f} | {jumped - base_eval:+.4f} | {after:.4f} | {scratch[name]:.4f} |"
            )
            print(f"[convert] {name} {method}: {jumped:.4f} -> {after:.4f}", flush=True)
    lines.append(f"\n(quality section took {time.perf_counter() - t0:.0f} s)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short sequences, few steps")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--quality", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--layer-seqs", type=int, nargs="+", default=None)
    p.add_argument("--model-seqs", type=int, nargs="+", default=None)
    p.add_argument("--layer-hidden", type=int, default=1024)
    p.add_argument("--layer-heads", type=int, default=16)
    p.add_argument("--model-hidden", type=int, default=512)
    p.add_argument("--model-heads", type=int, default=8)
    p.add_argument("--model-layers", type=int, default=2)
    p.add_argument("--q-hidden", type=int, default=128)
    p.add_argument("--q-heads", type=int, default=8)
    p.add_argument("--q-layers", type=int, default=4)
    p.add_argument("--q-seq", type=int, default=128)
    p.add_argument("--q-batch", type=int, default=16)
    p.add_argument("--q-steps", type=int, default=None)
    p.add_argument("--q-uptrain", type=int, default=None)
    p.add_argument("--q-lr", type=float, default=2e-3)
    p.add_argument(
        "--q-seeds", type=int, default=None, help="from-scratch runs per variant (default 3, quick 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 with --timer cpu)"
    )
    p.add_argument(
        "--timer",
        default="auto",
        choices=["auto", "cpu", "wall"],
        help="cpu: process CPU time (robust on a shared machine; CPU default), wall: wall clock (CUDA)",
    )
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = p.parse_args(argv)
    if not (args.speed or args.quality):
        args.speed = args.quality = True

    device = torch.device(args.device)
    if args.timer == "auto":
        args.timer = "wall" if device.type == "cuda" else "cpu"
    if args.threads is None and args.timer == "cpu" and device.type == "cpu":
        args.threads = 1  # CPU time of one thread is the most reproducible measure on a shared 2-core box
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    cuda = device.type == "cuda"
    if args.layer_seqs is None:
        args.layer_seqs = (
            ([32768, 65536, 131072] if cuda else [1024, 4096, 8192, 16384])
            if not args.quick
            else ([32768] if cuda else [1024, 4096])
        )
    if args.model_seqs is None:
        args.model_seqs = (
            ([32768, 65536, 131072] if cuda else [1024, 4096, 8192])
            if not args.quick
            else ([32768] if cuda else [1024, 2048])
        )
    if args.repeats is None:
        args.repeats = 5 if cuda else 2
    if args.q_steps is None:
        args.q_steps = 60 if args.quick else 300
    if args.q_seeds is None:
        args.q_seeds = 1 if args.quick else 3
    if args.q_uptrain is None:
        args.q_uptrain = 20 if args.quick else 80

    env = (
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", {torch.get_num_threads()} threads")
        + f", dtype {dtype}, timer {args.timer}"
    )
    sections = [f"Environment: {env}\n"]
    print(sections[0], flush=True)
    if args.speed:
        sections.append(run_speed(args, device, dtype))
    if args.quality:
        sections.append(run_quality(args))
    report = "\n".join(sections)
    print("\n" + report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
