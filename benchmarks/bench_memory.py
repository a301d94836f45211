"""Memory recall of an RxT model vs plain transformers baselines on the synthetic dialogues.

    python benchmarks/bench_memory.py --help      # = rxt bench memory --help

A thin launcher for :func:`transformers_rxt.benchmarks.bench_memory.main`, which holds the benchmark.
"""

from transformers_rxt.benchmarks.bench_memory import main

if __name__ == "__main__":
    main()
