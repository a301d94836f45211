"""TensorBLEU vs NLTK and sacrebleu sentence-level loops: time, speed-up and peak memory.

    python benchmarks/bench_tensorbleu.py --help      # = rxt bench tensorbleu --help

A thin launcher for :func:`transformers_rxt.benchmarks.bench_tensorbleu.main`, which holds the benchmark.
"""

from transformers_rxt.benchmarks.bench_tensorbleu import main

if __name__ == "__main__":
    main()
