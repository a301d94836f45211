"""Sparse Query Attention (SQA) vs MHA/GQA/MQA: speed and quality.

    python benchmarks/bench_sqa.py --help      # = rxt bench sqa --help

A thin launcher for :func:`transformers_rxt.benchmarks.bench_sqa.main`, which holds the benchmark.
"""

from transformers_rxt.benchmarks.bench_sqa import main

if __name__ == "__main__":
    main()
