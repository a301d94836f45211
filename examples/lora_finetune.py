"""LoRA fine-tuning of an RxT decoder with PEFT, end to end on CPU in a few seconds.

What it shows:

1. anchored `target_modules`: LoRA goes on the decoder's self-attention and memory cross-attention only;
   the encoder and the memory attention (which write the Short-Term Memory) stay untouched;
2. a few training steps with a *fixed* STM (the memory is an input here; nothing writes to it);
3. saving the adapter, reloading it onto a fresh base model with `PeftModel.from_pretrained`;
4. `merge_and_unload()` back to a plain `RxTForConversationalGeneration`, with the same logits;
5. (optional) a Hub-ready directory of the merged model with its RAML v1.0 card.

Run:
    python examples/lora_finetune.py                       # tiny random model + tiny tokenizer
    python examples/lora_finetune.py --model DIR --out OUT # an existing RxT model directory (and its tokenizer)

Merged weights and adapters derived from an RxT model are covered by RAML v1.0, like the base model.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from transformers_rxt import (
    RxTConfig,
    RxTForConversationalGeneration,
    load_rxt_tokenizer,
    tokenize_interactions,
    train_rxt_tokenizer,
)
from transformers_rxt.hub import rxt_lora_target_modules, save_hub_ready

QUERIES = ["what did the fox find", "where did the cat go", "who helped the dog", "what colour was the boat"]
ANSWERS = ["the fox found a shiny stone", "the cat went to the old mill", "a kind girl helped the dog",
           "the boat was bright red"]


def tiny_model_and_tokenizer(seed: int = 0):
    """A random 2-layer RxT model and a byte-level BPE tokenizer trained on the example sentences."""
    tokenizer = train_rxt_tokenizer((QUERIES + ANSWERS) * 4, vocab_size=320)
    common = dict(num_layers=2, vocab_size=len(tokenizer), embed_dim=32, att_heads=4, seq_len=64, stm_size=8,
                  att_groups=2, att_query_groups=2)
    config = RxTConfig(
        decoder_config=dict(common, ff_dim=64, cross_att_groups=2, cross_att_query_groups=2),
        encoder_config=dict(common, ff_dim=64, skip_memory_cross_attention=True),
        memory_attention_config=dict(num_layers=2, embed_dim=32, att_heads=4, seq_len=64, stm_size=8, att_groups=2,
                                     att_query_groups=2, interlayer_att_groups=2, interlayer_att_query_groups=2),
    )
    torch.manual_seed(seed)
    return RxTForConversationalGeneration(config), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="RxT model directory (default: a tiny random model)")
    parser.add_argument("--out", help="where to write the adapter and the merged model (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    args = parser.parse_args()

    if args.model:
        base = RxTForConversationalGeneration.from_pretrained(args.model)
        tokenizer = load_rxt_tokenizer(args.model)
    else:
        base, tokenizer = tiny_model_and_tokenizer()
    base.eval()
    reference = copy.deepcopy(base)  # an untouched copy to reload the adapter onto
    out = Path(args.out or tempfile.mkdtemp(prefix="rxt-lora-"))

    # ------------------------------------------------------------------ 1. anchored LoRA targets
    targets = rxt_lora_target_modules(("decoder_self_attention", "decoder_cross_attention"))
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(base, lora)
    adapted = sorted({name.split(".lora_")[0].removeprefix("base_model.model.")
                      for name, _ in model.named_parameters() if ".lora_" in name})
    assert adapted and all(name.startswith("rxt.decoder.") for name in adapted), adapted
    print(f"LoRA on {len(adapted)} decoder projections, e.g. {adapted[0]} ... {adapted[-1]}")
    model.print_trainable_parameters()

    # ------------------------------------------------------------------ 2. train with a fixed STM
    batch = tokenize_interactions(tokenizer, QUERIES, ANSWERS, return_labels=True)
    stm = base.init_memory(len(QUERIES), generator=torch.Generator().manual_seed(0))
    memory_before = stm.memory.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step in range(args.steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], stm=stm,
                     labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}: loss {loss.item():.4f}")
    model.eval()
    assert torch.equal(stm.memory, memory_before), "the decoder forward never writes the memory"

    # ------------------------------------------------------------------ 3. save, reload
    with torch.no_grad():
        trained_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], stm=stm).logits
    model.save_pretrained(out / "adapter")
    reloaded = PeftModel.from_pretrained(reference, out / "adapter").eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   stm=stm).logits
    assert torch.equal(reloaded_logits, trained_logits)
    print(f"adapter saved to {out / 'adapter'} and reloaded: identical logits")

    # ------------------------------------------------------------------ 4. merge
    merged = reloaded.merge_and_unload()
    assert type(merged).__name__ == "RxTForConversationalGeneration"
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], stm=stm).logits
    diff = (merged_logits - trained_logits).abs().max().item()
    assert diff < 1e-5, diff
    print(f"merged into the base weights: max |logit difference| {diff:.2e}")

    # ------------------------------------------------------------------ 5. Hub-ready directory (RAML v1.0)
    save_hub_ready(merged, out / "merged", tokenizer, model_name="RxT LoRA example",
                   stages=[{"stage": "lora", "steps": args.steps, "description": "LoRA on decoder self- and memory "
                                                                               "cross-attention, merged"}])
    print(f"merged model with its RAML v1.0 card: {out / 'merged'}")


if __name__ == "__main__":
    main()
