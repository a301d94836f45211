"""The `rxt` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _convert_rxlm(args: argparse.Namespace) -> int:
    import torch

    from .conversion import convert_rxlm_checkpoint

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = convert_rxlm_checkpoint(args.src, args.dst, dtype=dtype)
    variant = model.config.memory_attention_config["variant"]
    params = sum(p.numel() for p in model.parameters())
    print(f"converted {args.src} -> {args.dst}: {params:,} parameters, memory attention '{variant}'")
    print(f"load it with AutoModelForCausalLM.from_pretrained({args.dst!r}, trust_remote_code=True)")
    return 0


def _load_model_and_tokenizer(path: str):
    from transformers import AutoModelForCausalLM

    import transformers_rxt  # noqa: F401  (registers the Auto classes)
    from .tokenization_rxt import load_rxt_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    return model, load_rxt_tokenizer(path)


def _chat(args: argparse.Namespace) -> int:
    import threading
    import time

    import torch
    from transformers import TextIteratorStreamer

    from .tokenization_rxt import tokenize_prompt, tokenize_system_prompt

    model, tokenizer = _load_model_and_tokenizer(args.model)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    stm = model.init_memory(1)
    if args.system:
        system = tokenize_system_prompt(tokenizer, args.system, return_tensors="pt",
                                        style="internal" if model.config.internal_token_id is not None else "query")
        model.update_memory(system["input_ids"], system["attention_mask"], stm)
        print("[memory initialised from the system prompt]")
    if args.script:
        with open(args.script) as fh:
            queries = [line.rstrip("\n") for line in fh if line.strip()]
    else:
        print("Chat with the model; an empty line or Ctrl-D ends.")
        queries = None
    sampling = {"do_sample": False} if args.greedy else {
        "do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    turn = 0
    while True:
        if queries is not None:
            if turn >= len(queries):
                break
            query = queries[turn]
            print(f"> {query}")
        else:
            try:
                query = input("> ")
            except EOFError:
                break
            if not query.strip():
                break
        turn += 1
        prompt = tokenize_prompt(tokenizer, query, return_tensors="pt")
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        waited = time.perf_counter()
        if stm.update_pending:
            stm.wait()
            print(f"[waited {1e3 * (time.perf_counter() - waited):.0f} ms for the previous memory update]")
        worker = threading.Thread(target=model.generate, kwargs=dict(
            **prompt, stm=stm, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling))
        worker.start()
        for text in streamer:
            print(text, end="", flush=True)
        worker.join()
        started = time.perf_counter()
        print("\n[memory update running in the background]" if stm.update_pending else "")
        stm.wait()
        print(f"[memory updated ({1e3 * (time.perf_counter() - started):.0f} ms after the answer)]")
    if args.save_memory:
        stm.save(args.save_memory)
        print(f"[conversation memory saved to {args.save_memory}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rxt", description="Reactive Transformer (RxT) tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert-rxlm", help="convert an rxlm RxTAlpha/RxTBeta checkpoint into an HF model directory",
        description="Write an HF directory (weights, config with auto_map, modeling code, tokenizer) that loads "
                    "with AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True).")
    convert.add_argument("src", help="rxlm checkpoint directory or Hub repo id (config.json + model.safetensors)")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="cast the weights (default: keep float32)")
    convert.set_defaults(func=_convert_rxlm)

    chat = commands.add_parser("chat", help="chat with an RxT model (streams tokens, shows the memory updates)",
                               description="Each turn reads only the new query; the memory update runs after "
                                           "the answer, in the background.")
    chat.add_argument("model", help="HF model directory or Hub id (with its tokenizer)")
    chat.add_argument("--script", help="read the queries from FILE (one per line) instead of the keyboard")
    chat.add_argument("--system", help="a system prompt written into the memory before the first turn")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--top-k", type=int, default=50)
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--save-memory", help="save the conversation's STM to FILE at the end")
    chat.set_defaults(func=_chat)

    from .hub.push import add_push_parser

    add_push_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as error:
        print(f"rxt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
