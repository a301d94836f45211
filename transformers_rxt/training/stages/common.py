"""Helpers shared by the stage entry points (argument parsing, data sources, stage reports).

Every stage's ``main(argv)`` takes ``--config <preset>/stageN.yaml`` plus command-line overrides (``--max_steps
10``); ``rxt train`` calls it in this process, ``trainers/stageN_*.py`` (plain ``python`` or ``accelerate launch``)
and ``python -m transformers_rxt.training.stages.stageN_*`` call it with the process's arguments.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYNTHETIC = "synthetic"


@dataclass
class DataArguments:
    """Where a stage's data comes from.

    ``dataset="synthetic"`` uses the embedded memory corpus (no network); anything else is a local
    json/jsonl/parquet file or folder, or a Hub dataset id (``dataset_subset``/``dataset_split`` select).
    """

    dataset: str = field(default=SYNTHETIC, metadata={"help": "'synthetic', a local path or a Hub dataset id."})
    dataset_subset: str | None = field(default=None, metadata={"help": "Hub subset (config) name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (Hub data)."})
    text_field: str = field(default="text", metadata={"help": "Text column of pre-training data."})
    num_samples: int = field(default=20_000, metadata={"help": "Synthetic rows to build (or cap on loaded rows)."})
    eval_samples: int = field(default=0, metadata={"help": "Held-out rows for evaluation (0 = none)."})
    max_length: int = field(default=256, metadata={"help": "Longest row in tokens (longer rows are cut)."})
    corpus_seed: int = field(default=0, metadata={"help": "Seed of the synthetic corpus."})
    max_distance: int = field(default=8, metadata={"help": "Synthetic dialogues: longest fact-question distance."})
    num_turns: int | None = field(default=None, metadata={"help": "Synthetic dialogues: turns per episode."})
    fact_rate: float = field(default=0.45, metadata={"help": "Synthetic dialogues: share of fact turns."})
    probe_rate: float = field(default=0.7, metadata={"help": "Synthetic dialogues: share of facts asked later."})
    fact_kind_weights: dict | str | None = field(
        default=None, metadata={"help": "Synthetic training data: sampling weight of every fact kind (a dict, or its "
                                        "JSON), e.g. more ages and counts; None keeps the corpus's mix. Held-out "
                                        "evaluation always uses the corpus's mix."})

    def __post_init__(self) -> None:
        if isinstance(self.fact_kind_weights, str):
            self.fact_kind_weights = json.loads(self.fact_kind_weights)
        if self.fact_kind_weights is not None:
            from transformers_rxt.data.synthetic import check_kind_weights

            self.fact_kind_weights = check_kind_weights(self.fact_kind_weights)


def parse(*dataclass_types, argv: list[str] | None = None):
    """Parse ``argv`` (``--config file.yaml`` plus command-line overrides; default: the process's arguments) into
    the given dataclasses (TRL's parser), then seed python/numpy/torch from the training arguments' ``seed``:
    models and heads are built before the Trainer (which seeds only in its own ``__init__``), and their initial
    weights must not depend on what ran before."""
    from transformers import TrainingArguments, set_seed

    from transformers_rxt.extras import require_extra

    parsed = require_extra("trl").TrlParser(dataclass_types=list(dataclass_types)).parse_args_and_config(args=argv)
    seeds = [p.seed for p in parsed if isinstance(p, TrainingArguments)]
    if seeds:
        set_seed(seeds[0])
    return parsed


@contextmanager
def preparing_data(args: Any, data: DataArguments) -> Iterator[None]:
    """The context a stage builds and tokenizes its data in (``args``: its ``TrainingArguments``).

    - Data from files or the Hub is prepared by the main process first and read back from the ``datasets`` cache
      by the others (``main_process_first``). The synthetic corpus lives in memory and has no cache to share, so
      there every process builds its own copy at the same time instead of one after the other.
    - Everything allocated before (the imported libraries: about a million objects that are never garbage) is
      moved out of the garbage collector's view (``gc.freeze``): tokenizing allocates fast enough to start many
      full collections, and each of them walked all of those objects (stage 4's curriculum: 27 s -> 19 s).
    """
    gc.freeze()
    if data.dataset == SYNTHETIC:
        yield
        return
    with args.main_process_first(desc="tokenizing"):
        yield


def cap(ds, n: int | None):
    """The first ``n`` rows of a dataset (all when ``n`` is None/0 or larger than the dataset)."""
    if not n or not hasattr(ds, "__len__") or len(ds) <= n:
        return ds
    return ds.select(range(n))


def mrl_records(data: DataArguments, heldout: bool = False, num_turns: int | None = None):
    """Untokenized MRL episodes: synthetic dialogues (``heldout``: held-out facts, another seed) or the
    ``dataset_split`` / ``eval_split`` of a local or Hub MRL dataset (None when no eval split is set)."""
    from transformers_rxt.data import build_memory_dialogues, load_mrl_dataset

    if data.dataset == SYNTHETIC:
        n = data.eval_samples if heldout else data.num_samples
        if heldout and not n:
            return None
        return build_memory_dialogues(n, data.max_distance, data.corpus_seed + int(heldout),
                                      "heldout" if heldout else "train", fact_rate=data.fact_rate,
                                      probe_rate=data.probe_rate, num_turns=num_turns or data.num_turns,
                                      kind_weights=None if heldout else data.fact_kind_weights)
    split = data.eval_split if heldout else data.dataset_split
    if split is None:
        return None
    records = load_mrl_dataset(data.dataset, subset=data.dataset_subset, split=split)
    return cap(records, data.eval_samples if heldout else data.num_samples)


def episode_datasets(data: DataArguments, tokenizer, num_turns: int | None = None):
    """Tokenized train/eval episode datasets (``turn_input_ids``/``turn_labels``) of :func:`mrl_records`."""
    from transformers_rxt.data import tokenize_mrl_dataset

    train, evals = mrl_records(data, False, num_turns), mrl_records(data, True, num_turns)
    return tuple(tokenize_mrl_dataset(ds, tokenizer, data.max_length, truncation=True) if ds is not None else None
                 for ds in (train, evals))


def load_tokenizer(path: str):
    from transformers_rxt import load_rxt_tokenizer

    return load_rxt_tokenizer(path)


def stage_report(trainer: Any, output_dir: str, stage: str, started: float, extra: dict | None = None) -> dict:
    """Write ``stage_report.json`` (wall time, steps, tokens/s, last logged losses) and return it."""
    history = trainer.state.log_history
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    last = next((h for h in reversed(history) if "loss" in h), {})
    report = {
        "stage": stage,
        "wall_time_s": round(time.time() - started, 1),
        "train_runtime_s": summary.get("train_runtime"),
        "steps": trainer.state.global_step,
        "train_tokens": summary.get("train_tokens"),
        "train_tokens_per_second": summary.get("train_tokens_per_second"),
        "world_size": trainer.args.world_size,
        "torch_threads": torch.get_num_threads(),  # per process: with world_size, the CPU the stage could use
        "last_log": last,
        "first_log": next((h for h in history if "loss" in h), {}),
        **(extra or {}),
    }
    if trainer.is_world_process_zero():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(os.path.join(output_dir, "stage_report.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(f"[{stage}] done in {report['wall_time_s']} s, {report['steps']} steps, "
              f"{report['train_tokens_per_second']} tokens/s -> {output_dir}")
    return report
