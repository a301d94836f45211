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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"rxt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
