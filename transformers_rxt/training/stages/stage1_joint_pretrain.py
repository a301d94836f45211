"""Stage 1: joint LM pre-training (encoder MLM + decoder AR reading the encoder's detached states).

    python trainers/stage1_joint_pretrain.py --config trainers/configs/tiny/stage1.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage1_joint_pretrain.py \
        --config trainers/configs/tiny/stage1.yaml          # (2 CPU processes with use_cpu: true)

Builds a fresh model from ``model_config`` (RxTConfig keyword arguments in YAML/JSON; vocabulary size and
special-token ids come from the stage-0 tokenizer), or continues from ``init_from``. Writes an HF model
directory (the MLM head's weights included, ``mlm_head.*``) and the tokenizer to ``output_dir``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .common import SYNTHETIC, DataArguments, cap, load_tokenizer, parse, preparing_data, stage_report


@dataclass
class ModelArguments:
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer dir (default: init_from)."})
    model_config: str | None = field(default=None, metadata={"help": "YAML/JSON file of RxTConfig kwargs."})
    init_from: str | None = field(default=None, metadata={"help": "Previous stage's output directory."})


def build_model(model_args: ModelArguments, tokenizer):
    """A fresh model from ``model_config``, or the directory ``init_from`` (the trainer loads it, MLM head
    included)."""
    from transformers_rxt import RxTConfig, RxTForConversationalGeneration, rxt_token_ids

    if model_args.init_from:
        return model_args.init_from
    if not model_args.model_config:
        raise ValueError("give model_config (a fresh model) or init_from (a previous stage's output)")
    import yaml

    with open(model_args.model_config) as f:
        kwargs = yaml.safe_load(f)
    vocab = len(tokenizer)
    for part in ("decoder_config", "encoder_config"):
        kwargs.setdefault(part, {})["vocab_size"] = vocab
    kwargs.update(rxt_token_ids(tokenizer))
    return RxTForConversationalGeneration(RxTConfig(**kwargs))


def joint_datasets(data: DataArguments, tokenizer, kind: str, seed: int):
    """Tokenized train/eval datasets: ``kind="text"`` (pre-training) or ``"sft"`` (interactions)."""
    from transformers_rxt.data import (
        build_pretraining_dataset,
        build_sft_dataset,
        load_pretraining_dataset,
        load_sft_dataset,
        tokenize_pretraining_dataset,
        tokenize_sft_dataset,
    )

    def tokenize(ds):
        if kind == "text":
            return tokenize_pretraining_dataset(ds, tokenizer, data.max_length, truncation=True)
        return tokenize_sft_dataset(ds, tokenizer, data.max_length, truncation=True)

    if data.dataset == SYNTHETIC:
        build = build_pretraining_dataset if kind == "text" else build_sft_dataset
        train = build(data.num_samples, seed=data.corpus_seed, kind_weights=data.fact_kind_weights)
        evals = build(data.eval_samples, seed=data.corpus_seed + 1) if data.eval_samples else None
    else:
        def load(split):
            if kind == "text":
                return load_pretraining_dataset(data.dataset, text_column=data.text_field, split=split,
                                                subset=data.dataset_subset)
            return load_sft_dataset(data.dataset, split=split, subset=data.dataset_subset)

        train = cap(load(data.dataset_split), data.num_samples)
        evals = cap(load(data.eval_split), data.eval_samples) if data.eval_split else None
    return tokenize(train), (tokenize(evals) if evals is not None else None)


def run(stage: str, kind: str, argv: list[str] | None = None) -> None:
    """Joint LM training on ``kind`` data (``"text"``: stage 1, ``"sft"``: stage 2), reported as ``stage``."""
    from transformers_rxt.training import JointLMConfig, JointLMTrainer

    model_args, data, args = parse(ModelArguments, DataArguments, JointLMConfig, argv=argv)
    started = time.time()
    tokenizer = load_tokenizer(model_args.tokenizer or model_args.init_from)
    model = build_model(model_args, tokenizer)
    with preparing_data(args, data):
        train, evals = joint_datasets(data, tokenizer, kind, args.seed)
    trainer = JointLMTrainer(model, args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    stage_report(trainer, args.output_dir, stage, started,
                 {"parameters": sum(p.numel() for p in trainer.model.as_rxt().parameters())})


def main(argv: list[str] | None = None) -> None:
    """Stage 1 with ``argv`` (default: the process's arguments), e.g. ``["--config", "stage1.yaml"]``."""
    run("stage1", "text", argv)


if __name__ == "__main__":
    main()
