"""The `rxt` command line: its options, and the dispatch to the commands in :mod:`transformers_rxt.cli`.

This package sits beside ``transformers_rxt`` on purpose: importing ``transformers_rxt`` imports torch and
transformers (it registers the Auto classes), which takes seconds. Here only ``argparse`` is imported, so
``rxt --help`` and every ``rxt <command> --help`` answer at once; a command's own module is imported only when
the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

__all__ = ["add_push_parser", "build_parser", "main"]


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: ...)`` to an option's help unless the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings or action.required:
            return text
        if action.default is None:
            return text  # the text must say what "not given" means; tests/test_cli.py checks that it does
        shown = "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


def _command(target: str) -> Callable[[argparse.Namespace], int]:
    """A command that imports ``module:function`` only when it runs."""
    module, name = target.split(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = run.__name__ = name
    return run


def _add_command(commands: Any, name: str, target: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
    parser.set_defaults(func=_command(target))
    return parser


def _add_convert_parser(commands: Any) -> None:
    convert = _add_command(
        commands, "convert-rxlm", "transformers_rxt.cli:convert_rxlm",
        help="convert an rxlm RxTAlpha/RxTBeta checkpoint into an HF model directory",
        description="Write an HF directory (weights, config with auto_map, modeling code, tokenizer) that loads "
                    "with AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True).")
    convert.add_argument("src", help="rxlm checkpoint directory or Hub repo id (config.json + model.safetensors)")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="cast the weights (default: keep the checkpoint's float32)")


def _add_chat_parser(commands: Any) -> None:
    chat = _add_command(
        commands, "chat", "transformers_rxt.cli:chat",
        help="chat with an RxT model (streams tokens, shows the memory updates)",
        description="Each turn reads only the new query; the memory update runs after the answer, in the "
                    "background. A turn that fails (e.g. a query too long for the interaction window) prints "
                    "the error; from the keyboard the chat goes on, with --script the command exits with status 1.")
    chat.add_argument("model", help="HF model directory or Hub id (with its tokenizer)")
    chat.add_argument("--script", metavar="FILE",
                      help="read the queries from FILE, one per line (default: read them from the keyboard)")
    chat.add_argument("--system", help="a system prompt written into the memory before the first turn "
                                       "(default: none, the memory starts as initialised)")
    chat.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                      help="longest answer in tokens (default: what is left of the model's interaction window "
                           "after the query; more than that is an error, nothing is cut)")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    chat.add_argument("--top-k", type=int, default=50, help="sample from the K most likely tokens (0 = all)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: the smallest set of tokens "
                                                               "whose probabilities add up to P")
    chat.add_argument("--seed", type=int, default=None,
                      help="seed the initial memory and the sampling, for the same transcript every run "
                           "(default: unseeded)")
    chat.add_argument("--save-memory", metavar="FILE",
                      help="save the conversation's STM to FILE at the end (default: not saved)")


def _add_train_parser(commands: Any) -> None:
    train = _add_command(
        commands, "train", "transformers_rxt.cli:train",
        help="run the training curriculum (stages 0-5) of a preset, resumably",
        description="Runs the stages of a preset (transformers_rxt.training.stages) one after another in this "
                    "process (each stage starting from the previous stage's output under --output), then measures memory retention on held-out "
                    "dialogues and writes a Hub-ready directory (--output/hub). Completed stages are skipped and "
                    "an interrupted stage resumes from its last complete checkpoint, so re-running the same "
                    "command continues where it stopped. Arguments after -- go to every training stage "
                    "(stages 1-5), e.g. -- --report_to tensorboard.")
    train.add_argument("--preset", default="tiny",
                       help="a shipped preset, transformers_rxt/presets/<preset> (= trainers/configs/<preset> in "
                            "the checkout): tiny (CPU, embedded corpus), micro (a smoke run), mini (the "
                            "reference's Mini size, GPU + Hub datasets); or a folder of stage YAMLs")
    train.add_argument("--output", required=True, help="output directory (stage0 ... stage5, hub)")
    train.add_argument("--stages", default=None,
                       help="e.g. 0-5 or 4,5 (default: every stage the preset has)")
    train.add_argument("--algorithm", choices=["impo", "dmpo"], default="impo", help="stage 5 algorithm")
    train.add_argument("--launcher", default=None,
                       help="run stages 1-5 as '<LAUNCHER> -m transformers_rxt.training.stages.<stage> ...', "
                            "e.g. 'accelerate launch --num_processes 2' (default: in this process)")
    train.add_argument("--cpu-processes", type=int, default=1,
                       help="run stages 1-4 as N data-parallel CPU processes (gloo DDP through accelerate launch, "
                            "--num-threads threads each), each with 1/N of the stage's batch, so the global batch "
                            "and the recipe stay the preset's; N must divide those batches (default 1: in this "
                            "process)")
    train.add_argument("--dry-run", action="store_true",
                       help="print what each stage would do (its command line, or 'complete') and exit")
    train.add_argument("--eval-dialogues", type=int, default=512,
                       help="held-out dialogues for the final retention check (0 = skip)")
    train.add_argument("--eval-max-distance", type=int, default=8, help="longest fact-question distance checked")
    train.add_argument("--no-hub", action="store_true", help="do not write the Hub-ready directory")
    train.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    train.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- then arguments for every training stage")


def _add_eval_memory_parser(commands: Any) -> None:
    evaluate = _add_command(
        commands, "eval-memory", "transformers_rxt.cli:eval_memory",
        help="fact accuracy per distance with the memory carried vs reset",
        description="Runs held-out dialogues of the embedded synthetic corpus through the model, writing its own "
                    "answers into the memory, and scores the recall questions per distance; the same dialogues "
                    "with the memory reset before every turn are the stateless baseline.")
    evaluate.add_argument("model", help="RxT model directory or Hub id (with its tokenizer)")
    evaluate.add_argument("--dialogues", type=int, default=512, help="held-out dialogues")
    evaluate.add_argument("--max-distance", type=int, default=8, help="longest fact-question distance")
    evaluate.add_argument("--seed", type=int, default=2, help="corpus seed (2 = the one the trainers use)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="dialogues generated together")
    evaluate.add_argument("--teacher-forcing", action="store_true",
                          help="write the reference answers into memory instead of the model's own")
    evaluate.add_argument("--output", metavar="FILE",
                          help="also write the full result as JSON to FILE (default: print only)")
    evaluate.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def _add_serve_parser(commands: Any) -> None:
    serve = _add_command(
        commands, "serve", "transformers_rxt.cli:serve",
        help="serve an RxT model over an OpenAI-compatible HTTP API, each conversation kept as its memory",
        description="POST /v1/responses continues a conversation from its stored memory (previous_response_id) "
                    "and answers only the new input; POST /v1/chat/completions writes a whole history into a fresh "
                    "memory (stateless clients); GET /v1/models, /health, /metrics. Needs the serve extra: "
                    "pip install 'transformers-rxt[serve]'.")
    serve.add_argument("model", help="RxT model directory or Hub id (with its tokenizer)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--store", default="rxt-stm.sqlite3",
                       help="where conversation memories are stored: a SQLite file (a path or sqlite:///PATH) or a "
                            "shared Redis server (redis://HOST:PORT/DB)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1/* (default: the RXT_API_KEY environment "
                            "variable; none: open)")
    serve.add_argument("--model-name", default=None,
                       help="the model id clients send and /v1/models lists (default: the model directory's name)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together in one batch")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="how long the scheduler waits for more requests to join a batch")
    serve.add_argument("--max-queue", type=int, default=64, help="queued requests before new ones get a 503")
    serve.add_argument("--max-age", type=float, default=None, metavar="SECONDS",
                       help="evict stored memories older than this (default: keep them)")
    serve.add_argument("--max-stored", type=int, default=None, metavar="N",
                       help="keep at most N stored memories, evicting the oldest (default: no limit)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="log level of the server's request log")


def _add_bench_parser(commands: Any) -> None:
    bench = _add_command(
        commands, "bench", "transformers_rxt.cli:bench",
        help="run a benchmark script (inference, tensorbleu, sqa, memory); its --help lists the options",
        description="Runs transformers_rxt.benchmarks.bench_<name> (also benchmarks/bench_<name>.py in the "
                    "checkout), which prints side-by-side ratios from one run.")
    bench.add_argument("benchmark", choices=["inference", "tensorbleu", "sqa", "memory"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options for the benchmark script")


def add_push_parser(commands: Any) -> argparse.ArgumentParser:
    """Register `rxt push DIR --repo-id ID ...` (runs :func:`transformers_rxt.hub.push._push_command`)."""
    push = _add_command(
        commands, "push", "transformers_rxt.hub.push:_push_command",
        help="upload an RxT model directory to the Hub as a gated RAML v1.0 repository",
        description="Create (or update) a gated repository, then upload the model's own files: weights, config "
                    "(auto_map), modelling code, tokenizer, the RAML v1.0 model card and licence pointer. Anything "
                    "else in MODEL_DIR (trainer state, optimizer states, checkpoint-*, other files) is listed and "
                    "left out.")
    push.add_argument("model_dir", help="directory written by save_pretrained or a trainer")
    push.add_argument("--repo-id", required=True, help="target repository, e.g. my-org/RxT-Alpha-Tiny")
    push.add_argument("--tokenizer", help="tokenizer directory to upload (default: tokenizer files in MODEL_DIR)")
    push.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    push.add_argument("--gated", choices=["auto", "manual", "keep"], default="auto",
                      help="gating mode: 'auto' approves access on accepting the licence, 'manual' lets you review "
                           "each request, 'keep' keeps the mode of an existing gated repository (refused for a new "
                           "or ungated one). Repositories are always gated")
    push.add_argument("--token", help="Hub write token (default: HF_TOKEN or the stored login)")
    push.add_argument("--commit-message", default="Upload RxT model (RAML v1.0)", help="the Hub commit message")
    push.add_argument("--dataset", action="append", default=None,
                      help="Hub dataset id, repeatable (default: none named on the card)")
    push.add_argument("--language", action="append", default=None,
                      help="ISO language code, repeatable (default: en)")
    push.add_argument("--base-model", help="Hub id of the model this one was trained from (default: none)")
    push.add_argument("--stages", help="JSON file with a list of training stage records "
                                       "(default: the records MODEL_DIR holds, if any)")
    push.add_argument("--eval-results", help="JSON file with evaluation results (default: none on the card)")
    # Only for tests and private Hub mirrors (HF_ENDPOINT is the usual way), so hidden from --help.
    push.add_argument("--endpoint", help=argparse.SUPPRESS, default=None)
    return push


def build_parser() -> argparse.ArgumentParser:
    """The `rxt` parser with every command (imports nothing but argparse)."""
    parser = argparse.ArgumentParser(prog="rxt", description="Reactive Transformer (RxT) tools.",
                                     formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_convert_parser(commands)
    _add_chat_parser(commands)
    _add_train_parser(commands)
    _add_eval_memory_parser(commands)
    _add_bench_parser(commands)
    _add_serve_parser(commands)
    add_push_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `rxt`; bad input and failed stages print ``rxt <command>: error: ...`` and return 2."""
    args = build_parser().parse_args(argv)
    from transformers_rxt.curriculum import CurriculumError

    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, CurriculumError) as error:
        print(f"rxt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
