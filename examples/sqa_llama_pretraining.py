"""Pre-train (or up-train) a tiny Llama with Sparse Query Attention, under `accelerate launch` or python.

Everything is local: the text is the package's embedded synthetic corpus (``transformers_rxt.data``, or short
stories generated here if that is missing), the tokenizer is byte-level (vocabulary 256), and the model is
built from a config. Two ways in:

* from scratch: ``--variant sqa|ssqa|xsqa`` builds an SQA Llama with ``sqa_config`` (``--variant gqa``/``mha``
  give the baselines on the same data);
* up-training: ``--convert-from DIR`` loads a pretrained MHA/GQA checkpoint and turns it into SQA geometry
  with ``convert_to_sqa`` (``--convert-method select|pool``) before training.

Examples::

    python examples/sqa_llama_pretraining.py --variant xsqa --max-steps 50
    accelerate launch --num_processes 1 examples/sqa_llama_pretraining.py --variant sqa
    # two processes on a CPU-only machine (gloo DDP); `--cpu --num_processes 2` would start only one
    accelerate launch --multi_gpu --num_processes 2 examples/sqa_llama_pretraining.py --variant ssqa
    python examples/sqa_llama_pretraining.py --variant mha --output-dir /tmp/mha
    python examples/sqa_llama_pretraining.py --convert-from /tmp/mha/final --variant xsqa --convert-method
    pool
"""

from __future__ import annotations

import argparse
import random

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from transformers_rxt.sqa import convert_to_sqa, register_sqa_attention, sqa_config, theoretical_speedup


register_sqa_attention()  # `import transformers_rxt` does this too; explicit here for readers

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
ANIMALS = ["cat", "dog", "fox", "owl", "horse", "rabbit", "mouse", "bear"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown"]
PLACES = ["the river", "the market", "the old mill", "the forest", "the school", "the hill"]
ITEMS = ["apples", "pears", "books", "coins", "stones", "letters"]


def story(rng: random.Random) -> str:
    """A short story whose second half repeats names, colours and counts from the first (needs attention)."""
    a, b = rng.sample(NAMES, 2)
    animal, color, place = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES)
    item, n = rng.choice(ITEMS), rng.randint(2, 9)
    return (
        f"{a} had a {color} {animal} and {n} {item}. one day {a} went to {place} with {b}. "
        f"there {b} saw the {color} {animal}. {a} gave {b} {n} {item}, so {b} had {n} {item} too.\n"
    )


def corpus(n: int, seed: int) -> str:
    """The project's embedded synthetic corpus when available, else the stories above."""
    try:
        from transformers_rxt.data import pretraining_texts
    except ImportError:
        rng = random.Random(seed)
        return "".join(story(rng) for _ in range(n))
    return "\n".join(pretraining_texts(n, seed=seed)) + "\n"


class ByteChunks(Dataset):
    """Fixed-length windows of UTF-8 bytes; ``labels`` = ``input_ids`` (the model shifts them)."""

    def __init__(self, text: str, seq_len: int):
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        n = len(data) // seq_len
        self.chunks = data[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def build_model(args) -> LlamaForCausalLM:
    if args.convert_from:
        model = AutoModelForCausalLM.from_pretrained(args.convert_from)
        if args.variant in ("mha", "gqa"):
            raise SystemExit("--convert-from needs an SQA --variant (sqa, ssqa or xsqa)")
        return convert_to_sqa(model, args.variant, method=args.convert_method)
    heads = args.heads
    base = LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=10,  # "\n" ends a story
        pad_token_id=0,
    )
    if args.variant == "mha":
        base._attn_implementation = "sqa"  # same kernel as the SQA runs, for a fair comparison
        config = base
    elif args.variant == "gqa":
        config = sqa_config(base, "sqa", num_query_heads=heads, num_key_value_heads=heads // 4)
    else:
        config = sqa_config(base, args.variant)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="sqa", choices=["sqa", "ssqa", "xsqa", "gqa", "mha"])
    p.add_argument(
        "--convert-from", default=None, help="pretrained MHA/GQA checkpoint to convert to --variant"
    )
    p.add_argument("--convert-method", default="select", choices=["select", "pool"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="sqa-llama-out")
    args = p.parse_args()

    model = build_model(args)
    cfg = model.config
    use_cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=not use_cuda,  # on a CPU-only box this makes a 2-process launch use gloo DDP
        bf16=use_cuda and torch.cuda.is_bf16_supported(),
        seed=args.seed,
        disable_tqdm=True,
    )
    eval_text = corpus(200, seed=2)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ByteChunks(corpus(3000, seed=1), args.seq_len),
        eval_dataset=ByteChunks(eval_text, args.seq_len),
    )
    if trainer.is_world_process_zero():
        print(
            f"{args.variant}: {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} key/value "
            "heads, "
            f"head_dim {cfg.head_dim}, attention FLOPs 1/{theoretical_speedup(cfg):g} of MHA, "
            f"attn_implementation={cfg._attn_implementation!r}, world size {training_args.world_size}"
        )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(f"{args.output_dir}/final")

    if trainer.is_world_process_zero():
        print(f"eval loss {metrics['eval_loss']:.4f}")
        # Reload the way a user would, and sample.
        loaded = AutoModelForCausalLM.from_pretrained(
            f"{args.output_dir}/final", attn_implementation="sqa"
        ).eval()
        prompt = torch.tensor([list(eval_text[:60].encode("utf-8"))])  # an unseen paragraph's start
        out = loaded.generate(prompt, max_new_tokens=60, do_sample=False, pad_token_id=0)
        print(repr(bytes(out[0].tolist()).decode("utf-8", errors="replace")))


if __name__ == "__main__":
    main()
