"""Per-turn inference cost of RxT vs a stateless decoder that re-reads the conversation.

    python benchmarks/bench_inference.py --help      # = rxt bench inference --help

A thin launcher for :func:`transformers_rxt.benchmarks.bench_inference.main`, which holds the benchmark.
"""

from transformers_rxt.benchmarks.bench_inference import main

if __name__ == "__main__":
    main()
