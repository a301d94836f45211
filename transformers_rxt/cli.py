"""The `rxt` commands. Their options and the entry point live in :mod:`transformers_rxt_cli` (argparse only, so
`--help` answers without importing torch); each function here runs one command with the parsed options."""

from __future__ import annotations

import argparse
import sys

from transformers_rxt_cli import build_parser, main

__all__ = ["build_parser", "main", "bench", "chat", "convert_rxlm", "eval_memory", "serve", "train"]


def convert_rxlm(args: argparse.Namespace) -> int:
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

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).set_decode_weight_layout()
    return model, load_rxt_tokenizer(path)


def _queries(script: str | None):
    """The chat's queries: the lines of ``script`` (echoed), or what is typed until an empty line or Ctrl-D."""
    if script:
        with open(script) as fh:
            for line in fh:
                if line.strip():
                    print(f"> {line.rstrip()}")
                    yield line.rstrip("\n")
        return
    print("Chat with the model; an empty line or Ctrl-D ends.")
    while True:
        try:
            query = input("> ")
        except EOFError:
            return
        if not query.strip():
            return
        yield query


def _stream_answer(model, streamer, **generate_kwargs) -> None:
    """Run ``generate`` in a worker thread and print its tokens as they arrive; the worker's error is raised
    here (the streamer is ended when the worker fails, so this never waits for tokens that will not come)."""
    import threading

    failure: list[BaseException] = []

    def work() -> None:
        try:
            model.generate(streamer=streamer, **generate_kwargs)
        except BaseException as error:  # noqa: BLE001 (re-raised in the caller's thread below)
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=work, name="rxt-chat-generate")
    worker.start()
    for text in streamer:
        print(text, end="", flush=True)
    worker.join()
    if failure:
        raise failure[0]


def chat(args: argparse.Namespace) -> int:
    """`rxt chat`: stream answers turn by turn; the memory update runs after each answer, in the background.

    A failing turn prints ``rxt chat: error: ...``: from the keyboard the chat goes on (the memory is as it was
    before that turn), with ``--script`` the command stops and returns 1."""
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
    sampling = {"do_sample": False} if args.greedy else {
        "do_sample": True, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    window = model.config.max_interaction_length
    for query in _queries(args.script):
        prompt = tokenize_prompt(tokenizer, query, return_tensors="pt")
        # By default an answer may use what the query leaves of the interaction window; generate refuses more.
        max_new_tokens = args.max_new_tokens or max(window - prompt["input_ids"].shape[1], 1)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        waited = time.perf_counter()
        if stm.update_pending:
            stm.wait()
            print(f"[waited {1e3 * (time.perf_counter() - waited):.0f} ms for the previous memory update]")
        try:
            _stream_answer(model, streamer, **prompt, stm=stm, max_new_tokens=max_new_tokens, **sampling)
        except (ValueError, RuntimeError) as error:
            print(f"\nrxt chat: error: {error}", file=sys.stderr, flush=True)
            if args.script:
                return 1
            continue
        started = time.perf_counter()
        print("\n[memory update running in the background]" if stm.update_pending else "")
        stm.wait()
        print(f"[memory updated ({1e3 * (time.perf_counter() - started):.0f} ms after the answer)]")
    if args.save_memory:
        stm.save(args.save_memory)
        print(f"[conversation memory saved to {args.save_memory}]")
    return 0


def _evaluate_memory(model_dir: str, dialogues: int, max_distance: int, seed: int, batch_size: int,
                     teacher_forcing: bool = False) -> dict:
    from .tokenization_rxt import load_rxt_tokenizer
    from .training import evaluate_heldout_retention, load_rxt_model

    result = evaluate_heldout_retention(load_rxt_model(model_dir).eval(), load_rxt_tokenizer(model_dir), dialogues,
                                        max_distance, seed=seed, batch_size=batch_size,
                                        teacher_forcing=teacher_forcing)
    result["model"] = str(model_dir)
    return result


def _read_retention(path) -> dict:
    """A saved retention result with its distances as ints again (JSON keeps object keys as strings)."""
    import json

    result = json.loads(path.read_text())
    for run in ("memory", "reset"):
        for key in ("per_distance", "counts"):
            result[run][key] = {int(d): v for d, v in result[run][key].items()}
    return result


def _print_retention(result: dict, stage4: dict | None = None, name: str = "final") -> None:
    """The retention table; with ``stage4`` (the same questions asked of the stage-4 model) one table of both
    models, the reset baseline and the change, instead of two tables that overlap."""
    from .training.evaluation import compare_retention, format_retention

    print("fact accuracy per distance (turns between the fact and the question), held-out dialogues;")
    print("'memory' carries the STM through the dialogue, 'reset' starts every turn from a fresh STM:")
    if stage4 is None:
        print(format_retention(result))
        return
    print(f"(the same questions before and after {name}: the stage-4 model, the {name} model, reset)")
    print(compare_retention(stage4, result, ("stage4", name)))


def eval_memory(args: argparse.Namespace) -> int:
    import json

    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    result = _evaluate_memory(args.model, args.dialogues, args.max_distance, args.seed, args.batch_size,
                              args.teacher_forcing)
    _print_retention(result)
    for example in result.get("examples", []):
        print(f"  e.g. d={example['distance']}: {example['fact']!r} ... {example['query']!r} -> "
              f"memory: {example['memory_answer']!r} | reset: {example['reset_answer']!r}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"[written to {args.output}]")
    return 0


def _stage_table(reports: list) -> str:
    lines = ["stage | wall s | steps | tokens/s | this run", "---|---:|---:|---:|---"]
    total = 0.0
    for r in reports:
        wall = float(r.get("wall_time_s") or 0.0)
        total += 0.0 if r["skipped"] else wall
        tps = r.get("train_tokens_per_second")
        lines.append(f"{r['stage']} | {wall:.1f} | {r.get('steps', '-')} | "
                     f"{f'{tps:,.0f}' if tps else '-'} | {'skipped (done before)' if r['skipped'] else 'ran'}")
    lines.append(f"total (stages run now) | {total:.1f} | | |")
    return "\n".join(lines)


def _print_plan(plan: list, launcher: str | None, threads: int) -> None:
    """`rxt train --dry-run`: each stage's equivalent command line (what runs in this process without --launcher
    or --cpu-processes)."""
    import shlex

    print("[rxt train] dry run: nothing is trained; the stages and their equivalent commands:")
    for run in plan:
        if run.complete:
            print(f"{run.title}: already complete in {run.output}, would be skipped")
        else:
            command = run.command(launcher if run.stage.number else None, threads)
            print(f"{run.title} -> {run.output}\n  {shlex.join(command)}")


def train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .curriculum import check_launch_options, final_stage_dir, plan_curriculum, run_curriculum

    extra = list(args.stage_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    check_launch_options(args.launcher, args.cpu_processes)  # before the dry run, which plans without launching
    if args.dry_run:
        _print_plan(plan_curriculum(args.preset, args.output, args.stages, algorithm=args.algorithm,
                                    extra_args=extra, cpu_processes=args.cpu_processes),
                    args.launcher, args.num_threads or 1)
        return 0
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    reports = run_curriculum(args.preset, args.output, args.stages, algorithm=args.algorithm,
                             launcher=args.launcher, extra_args=extra, cpu_processes=args.cpu_processes,
                             threads=args.num_threads or 1)
    output = Path(args.output).resolve()
    print("\n[rxt train] stages:")
    print(_stage_table(reports))
    try:
        final = final_stage_dir(output)
    except FileNotFoundError:  # only the tokenizer so far (--stages 0): nothing to evaluate or export yet
        print(f"\n[rxt train] {output} has no trained model yet: the retention check and the Hub-ready directory "
              "follow once stages 1-5 have run")
        return 0
    result = None
    if args.eval_dialogues:
        result_file = output / "memory_retention.json"
        previous = _read_retention(result_file) if result_file.is_file() else None
        wanted = {"count": args.eval_dialogues, "max_distance": args.eval_max_distance, "seed": 2, "split": "heldout"}
        fresh = any(not r["skipped"] for r in reports)
        if previous and not fresh and previous.get("model") == str(final) and previous.get("dialogues") == wanted:
            result = previous
        else:
            print(f"\n[rxt train] memory retention of {final.name} on {args.eval_dialogues} held-out dialogues ...")
            result = _evaluate_memory(str(final), args.eval_dialogues, args.eval_max_distance, 2, 64)
            result_file.write_text(json.dumps(result, indent=2))
        print(f"\n[rxt train] final model ({final.name}):")
        _print_retention(result, _stage4_retention(output, final, result), final.name)
    if not args.no_hub:
        hub_dir = output / "hub"
        _export_hub_ready(final, hub_dir, reports, result, args.preset)
        print(f"\n[rxt train] Hub-ready model directory (weights, config with auto_map, remote code, tokenizer, "
              f"RAML v1.0 card): {hub_dir}")
        print(f"  load: AutoModelForCausalLM.from_pretrained({str(hub_dir)!r}, trust_remote_code=True)")
        print(f"  chat: rxt chat {hub_dir}    publish: rxt push {hub_dir} --repo-id <you>/<name>")
    return 0


def _stage4_retention(output, final, result: dict) -> dict | None:
    """Stage 4's saved check, when it asked the final check's questions (so the two show stage 5's effect)."""
    stage4 = output / "stage4" / "memory_retention.json"
    if final.name == "stage4" or not stage4.is_file():
        return None
    before = _read_retention(stage4)
    return before if before.get("dialogues") == result["dialogues"] else None


def _export_hub_ready(final, hub_dir, reports: list, retention: dict | None, preset: str) -> None:
    from .curriculum import STAGES
    from .hub import save_hub_ready
    from .tokenization_rxt import load_rxt_tokenizer
    from .training import load_rxt_model

    names = {f"stage{s.number}": s.name for s in STAGES}
    records = [{"stage": names.get(str(r["stage"]).split("_")[0], str(r["stage"])),
                "dataset": "embedded synthetic memory corpus", "steps": r.get("steps"),
                "tokens": r.get("train_tokens")} for r in reports if str(r["stage"]) != "stage0"]
    eval_results = {"memory_retention": retention["memory"]["per_distance"]} if retention else None
    save_hub_ready(load_rxt_model(str(final)).eval(), hub_dir, load_rxt_tokenizer(str(final)), stages=records,
                   eval_results=eval_results, model_name=f"RxT {preset} (embedded synthetic corpus)")


def bench(args: argparse.Namespace) -> int:
    """`rxt bench NAME ...`: :func:`transformers_rxt.benchmarks.bench_<NAME>.main` with the remaining arguments."""
    import importlib

    benchmark = importlib.import_module(f"transformers_rxt.benchmarks.bench_{args.benchmark}")
    benchmark.main([a for a in args.bench_args if a != "--"])
    return 0


if __name__ == "__main__":
    sys.exit(main())


def serve(args: argparse.Namespace) -> int:
    """`rxt serve`: run the OpenAI-compatible stateful server until SIGINT/SIGTERM (then return 0)."""
    import contextlib
    import logging
    import os

    try:
        import uvicorn

        from .serving.app import ServeConfig, build_app
    except ImportError as error:
        raise SystemExit(f"rxt serve: error: {error.name} is missing: pip install 'transformers-rxt[serve]'")

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, so the process would end killed by the
        signal; for `rxt serve` they are the normal way to stop, and a clean stop exits with status 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(model=args.model, store=args.store, api_key=args.api_key or os.environ.get("RXT_API_KEY"),
                         model_name=args.model_name, max_batch_size=args.max_batch_size,
                         batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, max_age_s=args.max_age,
                         max_stored=args.max_stored)
    app = build_app(config)
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                          timeout_graceful_shutdown=5)).run()
    return 0
