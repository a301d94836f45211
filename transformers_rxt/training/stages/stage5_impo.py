"""Stage 5: memory reinforcement learning (IMPO) or memory-aware DPO (DMPO) on synthetic episodes.

    python trainers/stage5_impo.py --config trainers/configs/tiny/stage5.yaml
    python trainers/stage5_impo.py --config trainers/configs/tiny/stage5.yaml --algorithm dmpo
    accelerate launch --multi_gpu --num_processes 2 trainers/stage5_impo.py --config ...

Loads ``init_from`` (the stage-4 output). IMPO (a ``trl.GRPOTrainer``): rollouts of ``curriculum_steps``
follow-ups per episode, TensorBLEU/cosine (+ fact-recall) reward functions, TRL's clipped loss with a group
baseline. DMPO (a ``trl.DPOTrainer``): accepted = reference answers, rejected = a corrupted recall
(``make_dmpo_records``). With ``retention_dialogues > 0`` the main process measures, before and after
training, the fact accuracy per distance on held-out dialogues and (IMPO) the mean held-out rollout reward,
and writes ``stage5_eval.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, fields, make_dataclass

import torch

from .common import DataArguments, load_tokenizer, mrl_records, parse, preparing_data, stage_report


@dataclass
class ModelArguments:
    init_from: str = field(default="outputs/tiny/stage4", metadata={"help": "Previous stage's output."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer dir (default: init_from)."})
    algorithm: str = field(default="impo", metadata={"help": "'impo' or 'dmpo'."})
    retention_dialogues: int = field(default=0, metadata={"help": "Held-out dialogues to evaluate recall on."})
    retention_max_distance: int = field(default=4, metadata={"help": "Longest fact-question distance."})
    reward_eval_batches: int = field(default=8, metadata={"help": "Held-out batches for the reward evaluation."})
    num_threads: int = field(default=0, metadata={"help": "torch intra-op threads (0 = leave as is)."})
    fact_reward_weight: float = field(default=0.0, metadata={
        "help": "IMPO: weight of the fact-recall reward (synthetic corpus; 0 = TensorBLEU/cosine only)."})


def evaluate(trainer, model_args, data, tokenizer, heldout_tok):
    from transformers_rxt.training import evaluate_heldout_retention

    rxt = trainer.accelerator.unwrap_model(trainer.model).as_rxt()
    out = {}
    res = evaluate_heldout_retention(rxt, tokenizer, model_args.retention_dialogues,
                                     model_args.retention_max_distance, seed=data.corpus_seed + 2, batch_size=64)
    out["fact_accuracy"] = {"memory": res["memory"], "reset": res["reset"], "dialogues": res["dialogues"]}
    out["perplexity"] = res.get("perplexity")
    out["table"] = res["table"]
    if hasattr(trainer, "evaluate_rewards") and heldout_tok is not None:
        out["reward"] = trainer.evaluate_rewards(heldout_tok, max_batches=model_args.reward_eval_batches)
    return out


def print_check(algorithm: str, results: dict) -> None:
    """Stage 5's own before/after check: one table, headed by the dialogues it used (the short distances the
    stage trains on; `rxt train`'s final check covers longer ones), with the change's noise band."""
    from transformers_rxt.training import compare_retention

    before, after = (results[when]["fact_accuracy"] for when in ("before", "after"))
    print(f"[stage5 {algorithm}] held-out recall before and after this stage (memory carried):")
    print(compare_retention(before, after))
    rewards = [results[when].get("reward", {}).get("reward") for when in ("before", "after")]
    if None not in rewards:
        print(f"[stage5 {algorithm}] mean held-out rollout reward: {rewards[0]:.3f} -> {rewards[1]:.3f}")


def data_arguments_without(name: str) -> type:
    """``DataArguments`` without the field ``name`` (for a training config that declares the same option)."""
    kept = [(f.name, f.type, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
            for f in fields(DataArguments) if f.name != name]
    return make_dataclass("DataArguments", kept)


def algorithm_of(argv: list[str]) -> str:
    """The ``--algorithm`` in ``argv`` (``impo`` when absent): it picks the training arguments to parse."""
    import argparse

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--algorithm", default="impo")
    algorithm = first.parse_known_args(argv)[0].algorithm
    if algorithm not in ("impo", "dmpo"):
        raise ValueError(f"--algorithm {algorithm!r}: expected 'impo' or 'dmpo'")
    return algorithm


def main(argv: list[str] | None = None) -> None:
    """Stage 5 with ``argv`` (default: the process's arguments), e.g. ``["--config", "stage5.yaml"]``; add
    ``["--algorithm", "dmpo"]`` for DMPO."""
    import sys

    from transformers_rxt.training import load_rxt_model
    from transformers_rxt.training.dmpo import DMPOConfig, DMPOTrainer, make_dmpo_records, tokenize_dmpo_dataset
    from transformers_rxt.training.impo import IMPOConfig, IMPOTrainer, default_impo_rewards

    algorithm = algorithm_of(sys.argv[1:] if argv is None else list(argv))
    if algorithm == "dmpo":  # TRL's DPOConfig has its own --max_length (the longest sequence): one option for both
        model_args, data, args = parse(ModelArguments, data_arguments_without("max_length"), DMPOConfig, argv=argv)
        data.max_length = args.max_length
    else:
        model_args, data, args = parse(ModelArguments, DataArguments, IMPOConfig, argv=argv)
    if model_args.num_threads:
        torch.set_num_threads(model_args.num_threads)
    started = time.time()
    tokenizer = load_tokenizer(model_args.tokenizer or model_args.init_from)
    from transformers_rxt.data import tokenize_mrl_dataset

    turns = data.num_turns or (getattr(args, "curriculum_steps", 1) + 1)
    train_raw, heldout_raw = mrl_records(data, False, turns), mrl_records(data, True, turns)
    with preparing_data(args, data):
        if algorithm == "dmpo":
            train = tokenize_dmpo_dataset(make_dmpo_records(list(train_raw), seed=data.corpus_seed), tokenizer,
                                          data.max_length)
            heldout = None
            trainer = DMPOTrainer(model_args.init_from, args=args, train_dataset=train, processing_class=tokenizer)
        else:
            train = tokenize_mrl_dataset(train_raw, tokenizer, data.max_length, truncation=True)
            heldout = (tokenize_mrl_dataset(heldout_raw, tokenizer, data.max_length, truncation=True)
                       if heldout_raw is not None else None)
            model, reward_funcs = load_rxt_model(model_args.init_from), None  # None: TensorBLEU + cosine (TRL funcs)
            if model_args.fact_reward_weight:
                from transformers_rxt.data import fact_recall_reward

                reward_funcs, weights = default_impo_rewards(model.get_input_embeddings())
                reward_funcs, args.reward_weights = [*reward_funcs, fact_recall_reward], [
                    *weights, model_args.fact_reward_weight]
            trainer = IMPOTrainer(model, reward_funcs=reward_funcs, args=args, train_dataset=train,
                                  processing_class=tokenizer)
    results = {}
    if model_args.retention_dialogues and trainer.is_world_process_zero():
        results["before"] = evaluate(trainer, model_args, data, tokenizer, heldout)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    stage_report(trainer, args.output_dir, f"stage5_{algorithm}", started)
    if model_args.retention_dialogues and trainer.is_world_process_zero():
        results["after"] = evaluate(trainer, model_args, data, tokenizer, heldout)
        with open(os.path.join(args.output_dir, "stage5_eval.json"), "w") as f:
            json.dump(results, f, indent=2)
        print_check(algorithm, results)
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
