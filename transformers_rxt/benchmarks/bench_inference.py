"""Per-turn inference cost of RxT vs a stateless decoder that re-reads the conversation.

Model: shaped like RxT-Alpha-Mini with random weights (dim 256, 12 layers, 16 heads, SQA 8/8, MoE 16 experts
top-2 of width 512 + 1 shared expert, vocab 20000, STM 12 x 256 slots). Each turn is a 32-token query and
`--new-tokens` generated tokens (EOS suppressed so every turn has the same length).

* RxT reads only the new query; the memory update runs after the answer, in the background ("async") or
  inside `generate` ("sync").
* The baseline is the same decoder used statelessly: its prompt is the whole history so far plus the new
  query (memory cross-attention reads a fixed memory, so its per-token cost is the same as RxT's).

Printed: a per-turn table (time to first token, tokens/s, memory-update time, the wall time a user waits per
turn with async and sync updates), then the ratios turn-last / turn-2 and RxT vs baseline tokens/s, all from
one run. Run: `python benchmarks/bench_inference.py [--turns 20 --new-tokens 200]`.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from transformers_rxt import RxTConfig, RxTForConversationalGeneration


def mini_config(seq_len: int) -> RxTConfig:
    common = dict(num_layers=12, vocab_size=20000, embed_dim=256, att_heads=16, att_groups=8, att_query_groups=8,
                  seq_len=seq_len, stm_size=256)
    return RxTConfig(
        decoder_config=dict(common, ff_dim=512, use_moe=True, num_experts=16, moe_top_k=2, cross_att_groups=8,
                            cross_att_query_groups=8),
        encoder_config=dict(common, ff_dim=768),
        memory_attention_config=dict(num_layers=12, embed_dim=256, att_heads=16, att_groups=8, att_query_groups=8,
                                     interlayer_att_groups=8, interlayer_att_query_groups=8, stm_size=256,
                                     seq_len=seq_len),
    )


class TokenTimer:
    """A streamer that records when the first and the last generated tokens arrive."""

    def __init__(self):
        self.first = self.last = None
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.last = time.perf_counter()
        if self.first is None:
            self.first = self.last

    def end(self):
        pass


def query(turn: int, length: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(turn)
    body = torch.randint(11, vocab, (length - 3,), generator=g)
    return torch.cat([torch.tensor([2, 5]), body, torch.tensor([6])])[None]


def timed_generate(model, prompt, stm, new_tokens, **kwargs):
    streamer = TokenTimer()
    start = time.perf_counter()
    out = model.generate(prompt, stm=stm, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         streamer=streamer, **kwargs)
    end = time.perf_counter()
    return out, {"ttft": streamer.first - start, "tps": (new_tokens - 1) / max(streamer.last - streamer.first, 1e-9),
                 "wall": end - start, "after_last_token": end - streamer.last}


def run_interleaved(model, turns, query_len, new_tokens):
    """Turn t of every contender runs back to back, so that load drift on a shared machine hits all alike."""
    vocab = model.config.vocab_size
    stms = {mode: model.init_memory(1, generator=torch.Generator().manual_seed(0)) for mode in ("async", "sync")}
    baseline_stm = model.init_memory(1, generator=torch.Generator().manual_seed(0))
    history = torch.zeros(1, 0, dtype=torch.long)
    rows = {"async": [], "sync": [], "baseline": []}
    for t in range(turns):
        prompt = query(t, query_len, vocab)
        for mode in ("async", "sync"):
            _, row = timed_generate(model, prompt, stms[mode], new_tokens, memory_update=mode)
            row["update"] = row["after_last_token"]  # sync: the update ran inside generate, after the last token
            rows[mode].append(row)
        out, row = timed_generate(model, torch.cat([history, prompt], dim=1), baseline_stm, new_tokens,
                                  memory_update="none")
        history = out
        rows["baseline"].append(row)
    stms["async"].wait()
    return rows["async"], rows["sync"], rows["baseline"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--query-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:  # 1 is steadier on a shared machine: OpenMP spin-waits stall when cores are oversubscribed
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    history_len = args.turns * (args.query_len + args.new_tokens) + 8
    model = RxTForConversationalGeneration(mini_config(max(history_len, 1024))).eval()
    # Random weights would often emit [EOS]; every turn must have the same length for a fair table.
    model.generation_config.suppress_tokens = [model.config.eos_token_id]
    active = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"RxT-Alpha-Mini-shaped model: {active:.1f}M parameters, {torch.get_num_threads()} threads, "
          f"{args.turns} turns x ({args.query_len} query + {args.new_tokens} generated tokens)\n")

    timed_generate(model, query(99, args.query_len, 20000), model.init_memory(1), 8, memory_update="sync")  # warm-up
    rxt_async, rxt_sync, baseline = run_interleaved(model, args.turns, args.query_len, args.new_tokens)

    print("| turn | RxT TTFT ms | RxT tok/s | mem update ms | RxT turn s (async) | RxT turn s (sync) "
          "| baseline prompt | baseline TTFT ms | baseline tok/s | baseline turn s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in range(args.turns):
        a, s, b = rxt_async[t], rxt_sync[t], baseline[t]
        prompt_len = t * (args.query_len + args.new_tokens) + args.query_len
        print(f"| {t + 1} | {a['ttft'] * 1e3:.0f} | {a['tps']:.1f} | {s['update'] * 1e3:.0f} | {a['wall']:.2f} "
              f"| {s['wall']:.2f} | {prompt_len} | {b['ttft'] * 1e3:.0f} | {b['tps']:.1f} | {b['wall']:.2f} |")

    last = args.turns - 1
    second = min(1, last)
    rxt_tps = statistics.median(r["tps"] for r in rxt_async)
    base_tps = statistics.median(r["tps"] for r in baseline)
    print("\n| ratio | RxT (async) | baseline |")
    print("|---|---:|---:|")
    print(f"| TTFT turn {last + 1} / turn {second + 1} | {rxt_async[last]['ttft'] / rxt_async[second]['ttft']:.2f} "
          f"| {baseline[last]['ttft'] / baseline[second]['ttft']:.2f} |")
    print(f"| turn time {last + 1} / turn {second + 1} | {rxt_async[last]['wall'] / rxt_async[second]['wall']:.2f} "
          f"| {baseline[last]['wall'] / baseline[second]['wall']:.2f} |")
    print(f"| median tokens/s | {rxt_tps:.1f} | {base_tps:.1f} |")
    # No ratio to the reference's published interact() figure: that was another model on other threads.
    print(f"\nRxT tokens/s vs baseline: {rxt_tps / base_tps:.2f}x")
    upd = statistics.median(r["update"] for r in rxt_sync)
    print(f"memory update: median {upd * 1e3:.0f} ms per turn; with async updates the user's turn time is "
          f"{statistics.median(r['wall'] for r in rxt_sync) / statistics.median(r['wall'] for r in rxt_async):.2f}x "
          "shorter than with sync updates (the update overlaps the user's next query)")


if __name__ == "__main__":
    main()
