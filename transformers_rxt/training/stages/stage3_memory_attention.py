"""Stage 3: self-supervised memory-attention pre-training on multi-turn episodes.

    python trainers/stage3_memory_attention.py --config trainers/configs/tiny/stage3.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage3_memory_attention.py --config ...

Loads ``init_from`` (the stage-2 output) and trains only the memory attention (weighted-mean labels,
negative cosine loss). Data: ``synthetic`` dialogues, or MRL episodes (``query``/``answer``/``interactions``)
from a local file or a Hub dataset (``dataset_subset`` = the curriculum subset, e.g. ``steps-6``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .common import DataArguments, episode_datasets, load_tokenizer, parse, preparing_data, stage_report


@dataclass
class ModelArguments:
    init_from: str = field(default="outputs/tiny/stage2", metadata={"help": "Previous stage's output."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer dir (default: init_from)."})


def main(argv: list[str] | None = None) -> None:
    """Stage 3 with ``argv`` (default: the process's arguments), e.g. ``["--config", "stage3.yaml"]``."""
    from transformers_rxt.training import MemoryAttentionConfig, MemoryAttentionTrainer

    model_args, data, args = parse(ModelArguments, DataArguments, MemoryAttentionConfig, argv=argv)
    started = time.time()
    tokenizer = load_tokenizer(model_args.tokenizer or model_args.init_from)
    with preparing_data(args, data):
        train, evals = episode_datasets(data, tokenizer)
    trainer = MemoryAttentionTrainer(model_args.init_from, args, train_dataset=train, eval_dataset=evals,
                                     processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    stage_report(trainer, args.output_dir, "stage3", started)


if __name__ == "__main__":
    main()
