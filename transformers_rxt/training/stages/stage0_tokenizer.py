"""Stage 0: train the RxT byte-level BPE tokenizer (special tokens [PAD]=0 ... [I]=10, chat template).

    python trainers/stage0_tokenizer.py --config trainers/configs/tiny/stage0.yaml

With ``dataset: synthetic`` it trains on the embedded corpus (pre-training text, SFT pairs and dialogues);
otherwise on the ``text_field`` column of a local file or Hub dataset. Writes a ``PreTrainedTokenizerFast``
directory (``load_rxt_tokenizer(output_dir)``). Runs on the main process only (nothing to distribute).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from .common import SYNTHETIC, DataArguments, cap, parse


@dataclass
class TokenizerArguments:
    output_dir: str = field(default="outputs/tiny/stage0", metadata={"help": "Where to save the tokenizer."})
    vocab_size: int = field(default=2048, metadata={"help": "Vocabulary size (incl. bytes and specials)."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair count for a merge."})
    model_max_length: int | None = field(default=None, metadata={"help": "Stored max length (optional)."})


def training_texts(data: DataArguments):
    """The texts to learn the vocabulary from."""
    if data.dataset == SYNTHETIC:
        from transformers_rxt.data import memory_dialogues, pretraining_texts, sft_pairs

        weights = data.fact_kind_weights
        texts = pretraining_texts(data.num_samples, seed=data.corpus_seed, kind_weights=weights)
        texts += [f"{p['query']} {p['answer']}"
                  for p in sft_pairs(data.num_samples // 2, seed=data.corpus_seed, kind_weights=weights)]
        for d in memory_dialogues(data.num_samples // 10, max_distance=data.max_distance, seed=data.corpus_seed,
                                  kind_weights=weights):
            texts += [d["query"], d["answer"]] + [f"{t['query']} {t['answer']}" for t in d["interactions"]]
        return texts
    from transformers_rxt.data import load_pretraining_dataset

    ds = load_pretraining_dataset(
        data.dataset, text_column=data.text_field, split=data.dataset_split, subset=data.dataset_subset
    )
    return cap(ds, data.num_samples)


def main(argv: list[str] | None = None) -> None:
    """Stage 0 with ``argv`` (default: the process's arguments), e.g. ``["--config", "stage0.yaml"]``."""
    args, data = parse(TokenizerArguments, DataArguments, argv=argv)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    if state.is_main_process:
        from transformers_rxt import train_rxt_tokenizer

        started = time.time()
        tokenizer = train_rxt_tokenizer(
            training_texts(data),
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            model_max_length=args.model_max_length,
        )
        tokenizer.save_pretrained(args.output_dir)
        wall = round(time.time() - started, 1)
        with open(os.path.join(args.output_dir, "stage_report.json"), "w") as f:
            json.dump({"stage": "stage0", "wall_time_s": wall, "vocab_size": len(tokenizer)}, f, indent=2)
        print(f"[stage0] tokenizer with {len(tokenizer)} tokens in {wall} s -> {args.output_dir}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
