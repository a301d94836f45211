"""Convert a reference (rxlm) checkpoint, converse with it, and watch the memory change.

    python examples/rxlm_checkpoint_demo.py [RXLM_CHECKPOINT_DIR]   # default: the parity fixture in ../shared

The fixture model has random weights (it exists to check numerical parity), so its answers are gibberish; what
this shows is the machinery: rxlm loading, remote-code loading, stateful generation with the memory update in
the background, and STM save/restore. For a model that has learnt something, run the main job
(`bash scripts/run_main.sh`) and `rxt chat outputs/main/hub`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import transformers_rxt  # noqa: F401  (registers the Auto classes)
from transformers_rxt import STMCache, load_rxt_tokenizer, tokenize_prompt
from transformers_rxt.conversion import convert_rxlm_checkpoint

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "rxlm-parity" / "rxt-alpha-tiny"


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE
    if not (src / "config.json").is_file():
        print(f"no rxlm checkpoint at {src}; pass a directory: python {sys.argv[0]} PATH")
        return 1
    out_dir = Path(tempfile.mkdtemp(prefix="rxt-demo-"))
    convert_rxlm_checkpoint(str(src), str(out_dir))
    print(f"converted {src} -> {out_dir}: {sorted(p.name for p in out_dir.iterdir())}")
    model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)
    tokenizer = load_rxt_tokenizer(str(out_dir))

    stm = model.init_memory(1, generator=torch.Generator().manual_seed(0))
    for query in ["Hello, who are you?", "My owl is called Leo.", "What is my owl called?"]:
        before = stm.memory.clone()
        prompt = tokenize_prompt(tokenizer, query, return_tensors="pt")
        start = time.perf_counter()
        out = model.generate(**prompt, stm=stm, max_new_tokens=12, do_sample=False)
        answered = time.perf_counter() - start
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        pending = stm.update_pending
        change = (stm.memory - before).norm().item()  # waits for the background update
        print(f"Q: {query}\nA: {answer!r}  ({answered * 1e3:.0f} ms; memory update pending after the answer: "
              f"{pending}; memory moved by {change:.2f})")
    path = out_dir / "conversation.safetensors"
    stm.save(path)
    restored = STMCache.load(path, model=model)
    print(f"saved and restored the conversation state: identical = {torch.equal(restored.memory, stm.memory)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
