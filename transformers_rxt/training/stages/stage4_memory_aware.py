"""Stage 4: supervised memory-aware training (SMAT) on multi-turn episodes, then a memory-retention check.

    python trainers/stage4_memory_aware.py --config trainers/configs/tiny/stage4.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage4_memory_aware.py --config ...

Loads ``init_from`` (the stage-3 output), trains with the memory carried from turn to turn (and the
gradual-unfreeze schedule of the config), and writes the final HF model directory. With
``retention_dialogues > 0`` the main process then runs ``evaluate_memory_retention`` on held-out synthetic
dialogues and writes ``memory_retention.json`` next to the model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from .common import (
    SYNTHETIC,
    DataArguments,
    episode_datasets,
    load_tokenizer,
    parse,
    preparing_data,
    stage_report,
)


@dataclass
class CurriculumArguments:
    """An episode-length curriculum on the synthetic dialogues: phase i has ``curriculum_samples[i]``
    dialogues whose lengths are the comma-separated ``curriculum_turns[i]`` (equal shares, shuffled within the
    phase). Phases are concatenated in order; use ``train_sampling_strategy: sequential`` to train them in
    that order. Empty: ``num_samples`` dialogues of ``num_turns`` turns (as in stage 3)."""

    curriculum_turns: list[str] = field(default_factory=list, metadata={"help": "Per phase: e.g. '2' or '3,4,6'."})
    curriculum_samples: list[int] = field(default_factory=list, metadata={"help": "Dialogues per phase."})


def curriculum_dataset(curriculum: CurriculumArguments, data: DataArguments, tokenizer, reviews: bool = False):
    """Tokenized synthetic dialogues, phase after phase (short episodes first: dense distance-1 recall), with a
    review question per turn when ``reviews`` (for ``review_loss_weight``)."""
    import datasets

    from transformers_rxt.data import build_memory_dialogues, tokenize_mrl_dataset

    if len(curriculum.curriculum_turns) != len(curriculum.curriculum_samples):
        raise ValueError("curriculum_turns and curriculum_samples need one entry per phase")
    phases = []
    for i, (spec, n) in enumerate(zip(curriculum.curriculum_turns, curriculum.curriculum_samples)):
        lengths = [int(t) for t in str(spec).split(",")]
        parts = [
            build_memory_dialogues(n // len(lengths), min(t - 1, data.max_distance), data.corpus_seed + 97 * i + t,
                                   "train", num_turns=t, fact_rate=data.fact_rate, probe_rate=data.probe_rate,
                                   reviews=reviews, kind_weights=data.fact_kind_weights)
            for t in lengths
        ]
        phases.append(datasets.concatenate_datasets(parts).shuffle(seed=data.corpus_seed + i))
    return tokenize_mrl_dataset(datasets.concatenate_datasets(phases), tokenizer, data.max_length, truncation=True)


@dataclass
class ModelArguments:
    init_from: str = field(default="outputs/tiny/stage3", metadata={"help": "Previous stage's output."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer dir (default: init_from)."})
    retention_dialogues: int = field(default=0, metadata={"help": "Held-out dialogues to evaluate recall on."})
    retention_max_distance: int = field(default=8, metadata={"help": "Longest fact-question distance."})
    retention_batch_size: int = field(default=64, metadata={"help": "Dialogues per generation batch."})


def main(argv: list[str] | None = None) -> None:
    """Stage 4 with ``argv`` (default: the process's arguments), e.g. ``["--config", "stage4.yaml"]``."""
    from transformers_rxt.training import MemoryAwareConfig, MemoryAwareTrainer

    model_args, curriculum, data, args = parse(ModelArguments, CurriculumArguments, DataArguments, MemoryAwareConfig,
                                                argv=argv)
    started = time.time()
    tokenizer = load_tokenizer(model_args.tokenizer or model_args.init_from)
    with preparing_data(args, data):
        if curriculum.curriculum_turns and data.dataset == SYNTHETIC:
            train, evals = curriculum_dataset(curriculum, data, tokenizer, args.review_loss_weight > 0), None
        else:
            train, evals = episode_datasets(data, tokenizer)
    trainer = MemoryAwareTrainer(model_args.init_from, args, train_dataset=train, eval_dataset=evals,
                                 processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    stage_report(trainer, args.output_dir, "stage4", started)

    if model_args.retention_dialogues and trainer.is_world_process_zero():
        from transformers_rxt.training import evaluate_heldout_retention, format_retention

        eval_started = time.time()
        result = evaluate_heldout_retention(trainer.model.as_rxt(), tokenizer, model_args.retention_dialogues,
                                            model_args.retention_max_distance, seed=data.corpus_seed + 2,
                                            batch_size=model_args.retention_batch_size)
        result["eval_time_s"] = round(time.time() - eval_started, 1)
        result["model"] = os.path.abspath(args.output_dir)
        with open(os.path.join(args.output_dir, "memory_retention.json"), "w") as f:
            json.dump(result, f, indent=2)
        print("[stage4] memory retention on held-out dialogues (fact accuracy per distance):")
        print(format_retention(result))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
