"""The benchmarks ``rxt bench`` runs, one module each with ``main(argv: list[str] | None = None)``:
:mod:`.bench_inference` (per-turn cost vs a stateless decoder), :mod:`.bench_tensorbleu` (TensorBLEU vs NLTK and
sacrebleu; the ``bench`` extra), :mod:`.bench_sqa` (SQA speed and quality) and :mod:`.bench_memory` (recall vs
plain transformers baselines). The repository's ``benchmarks/bench_<name>.py`` are thin launchers of the same
code; its measured results are ``benchmarks/RESULTS_*.md``. They print measurements; they are not tests.
"""
