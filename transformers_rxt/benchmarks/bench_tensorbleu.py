"""TensorBLEU vs NLTK and sacrebleu sentence-level loops: time, speed-up and peak memory, in one run.

    python benchmarks/bench_tensorbleu.py            # batch 32/128/512 x length 256/1024, vocab 32000
    python benchmarks/bench_tensorbleu.py --quick    # a small subset, for CI / a smoke check
    python benchmarks/bench_tensorbleu.py --overlap 0.7   # references copy 70% of the candidate tokens

Every row times the three implementations on the same batch, so the ratios are side by side (this box is
noisy: compare ratios, not absolute times). Baselines score one sentence at a time, like a reward loop:
* NLTK: ``sentence_bleu(refs, hyp, smoothing_function=SmoothingFunction().method1)`` on id lists, including
  the ``tensor.tolist()`` conversion;
* sacrebleu: ``BLEU(tokenize="none", smooth_method="floor", smooth_value=0.1, effective_order=False)
  .sentence_score`` on ids joined into strings (the same scores as NLTK method1), including the conversion;
* TensorBLEU: ``tensor_sentence_bleu(cand, ref, smoothing="method1")`` on the tensors (CPU, and CUDA when
  available, synchronised).
Peak memory: tracemalloc for the Python baselines, torch's allocator events (CPU) or max_memory_allocated
(CUDA) for TensorBLEU. Each TensorBLEU result is also checked against NLTK (max abs difference).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
import tracemalloc
import warnings

import torch

from transformers_rxt.extras import require_extra
from transformers_rxt.metrics import tensor_sentence_bleu
from transformers_rxt.metrics import tensorbleu as _tb

# the baselines it measures against (the `bench` extra)
sentence_bleu = require_extra("nltk.translate.bleu_score").sentence_bleu
SmoothingFunction = require_extra("nltk.translate.bleu_score").SmoothingFunction
BLEU = require_extra("sacrebleu.metrics").BLEU


def timed(fn, repeats: int, sync=None, warmup: bool = True) -> tuple[float, object]:
    """Median wall time of `repeats` calls (after one warm-up call unless told not to) and the last result."""
    if warmup:
        fn()
        if sync:
            sync()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def python_peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def torch_cpu_peak_bytes(fn) -> int:
    """Peak bytes held by torch CPU tensors during `fn`, from the profiler's allocator events."""
    from torch.autograd import DeviceType

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CPU and e.nbytes()
    ]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def make_batch(
    batch: int, length: int, vocab: int, overlap: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cand = torch.randint(1, vocab, (batch, length), generator=gen)
    ref = torch.randint(1, vocab, (batch, length), generator=gen)
    if overlap > 0:
        ref = torch.where(torch.rand(batch, length, generator=gen) < overlap, cand, ref)
    return cand, ref


def nltk_loop(cand: torch.Tensor, ref: torch.Tensor) -> list[float]:
    smooth = SmoothingFunction().method1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [sentence_bleu([r], c, smoothing_function=smooth) for c, r in zip(cand.tolist(), ref.tolist())]


def sacrebleu_loop(cand: torch.Tensor, ref: torch.Tensor) -> list[float]:
    metric = BLEU(tokenize="none", smooth_method="floor", smooth_value=0.1, effective_order=False)
    hyps = [" ".join(map(str, row)) for row in cand.tolist()]
    refs = [" ".join(map(str, row)) for row in ref.tolist()]
    return [metric.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)]


logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # it warns once per sentence about effective_order


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 32/128 x length 256 only")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--overlap", type=float, default=0.0, help="fraction of reference tokens copied from the candidate"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every implementation (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: like the single-threaded baselines, and immune to OpenMP "
        "spin-waits when other jobs share the CPU; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--strategy", choices=["auto", "sparse", "dense"], default=None, help="force a CPU strategy"
    )
    parser.add_argument("--no-sacrebleu", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.lengths = [32, 128], [256]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.strategy:
        _tb._STRATEGY_OVERRIDE = args.strategy
    cuda = torch.cuda.is_available()

    print(
        f"TensorBLEU benchmark: vocab {args.vocab}, overlap {args.overlap}, smoothing method1, BLEU-4; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
        f"{platform.processor() or platform.machine()}"
        + (f", GPU {torch.cuda.get_device_name()}" if cuda else ", no GPU")
        + f"; python {platform.python_version()}\n"
    )
    header = ["len", "batch", "NLTK loop", "sacrebleu loop", "TensorBLEU CPU", "x NLTK", "x sacrebleu"]
    if cuda:
        header += ["TensorBLEU GPU", "GPU x NLTK"]
    header += ["peak mem NLTK", "peak mem sacrebleu", "peak mem TensorBLEU CPU"] + (
        ["peak mem GPU"] if cuda else []
    )
    header += ["max abs diff vs NLTK"]
    rows, memory = [], []
    for length in args.lengths:
        for batch in args.batches:
            cand, ref = make_batch(batch, length, args.vocab, args.overlap, seed=batch * 7919 + length)
            t_nltk, want = timed(lambda: nltk_loop(cand, ref), args.repeats, warmup=False)
            mem_nltk = python_peak_bytes(lambda: nltk_loop(cand, ref))
            if args.no_sacrebleu:
                t_sacre, mem_sacre = float("nan"), 0
            else:
                t_sacre, _ = timed(lambda: sacrebleu_loop(cand, ref), args.repeats, warmup=False)
                mem_sacre = python_peak_bytes(lambda: sacrebleu_loop(cand, ref))
            t_ours, got = timed(lambda: tensor_sentence_bleu(cand, ref, smoothing="method1"), args.repeats)
            mem_ours = torch_cpu_peak_bytes(lambda: tensor_sentence_bleu(cand, ref, smoothing="method1"))
            exact = tensor_sentence_bleu(cand, ref, smoothing="method1", dtype=torch.float64)
            diff = (exact - torch.tensor(want, dtype=torch.float64)).abs().max().item()
            row = [
                str(length),
                str(batch),
                fmt_time(t_nltk),
                fmt_time(t_sacre),
                fmt_time(t_ours),
                f"{t_nltk / t_ours:.1f}x",
                f"{t_sacre / t_ours:.1f}x",
            ]
            if cuda:
                cand_gpu, ref_gpu = cand.cuda(), ref.cuda()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t_gpu, _ = timed(
                    lambda: tensor_sentence_bleu(cand_gpu, ref_gpu, smoothing="method1"),
                    max(args.repeats, 5),
                    sync=torch.cuda.synchronize,
                )
                mem_gpu = torch.cuda.max_memory_allocated() - base
                row += [fmt_time(t_gpu), f"{t_nltk / t_gpu:.1f}x"]
            row += [fmt_bytes(mem_nltk), fmt_bytes(mem_sacre), fmt_bytes(mem_ours)]
            if cuda:
                row += [fmt_bytes(mem_gpu)]
            row += [f"{diff:.1e}"]
            rows.append(row)
            memory.append((length, batch, mem_ours))
            print(" | ".join(row), file=sys.stderr, flush=True)  # progress

    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")

    print(
        "\nTensorBLEU CPU peak memory per token position (candidate + reference tokens): "
        "flat = linear in B x L\n"
    )
    print("| len | batch | peak | bytes / token |")
    print("|---|---|---|---|")
    for length, batch, peak in memory:
        print(f"| {length} | {batch} | {fmt_bytes(peak)} | {peak / (2 * batch * length):.0f} |")


if __name__ == "__main__":
    main()
