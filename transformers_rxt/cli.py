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


def _print_retention(result: dict) -> None:
    from .training.evaluation import format_retention

    print("fact accuracy per distance (turns between the fact and the question), held-out dialogues;")
    print("'memory' carries the STM through the dialogue, 'reset' starts every turn from a fresh STM:")
    print(format_retention(result))


def _eval_memory(args: argparse.Namespace) -> int:
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


def _train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .curriculum import final_stage_dir, run_curriculum

    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    extra = list(args.stage_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    reports = run_curriculum(args.preset, args.output, args.stages, algorithm=args.algorithm,
                             launcher=args.launcher, extra_args=extra, trainers_dir=args.trainers_dir)
    output = Path(args.output).resolve()
    final = final_stage_dir(output)
    print("\n[rxt train] stages:")
    print(_stage_table(reports))
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
        _print_retention(result)
        _print_stage_comparison(output, final, result)
    if not args.no_hub:
        hub_dir = output / "hub"
        _export_hub_ready(final, hub_dir, reports, result, args.preset)
        print(f"\n[rxt train] Hub-ready model directory (weights, config with auto_map, remote code, tokenizer, "
              f"RAML v1.0 card): {hub_dir}")
        print(f"  load: AutoModelForCausalLM.from_pretrained({str(hub_dir)!r}, trust_remote_code=True)")
        print(f"  chat: rxt chat {hub_dir}    publish: rxt push {hub_dir} --repo-id <you>/<name>")
    return 0


def _print_stage_comparison(output, final, result: dict) -> None:
    """Stage 4 vs the final model on the same dialogues, when stage 4 measured them (the stage-5 effect)."""
    from .data.synthetic import format_accuracy_table

    stage4 = output / "stage4" / "memory_retention.json"
    if final.name == "stage4" or not stage4.is_file():
        return
    before = _read_retention(stage4)
    if before.get("dialogues") != result["dialogues"]:
        return
    print(f"\n[rxt train] the same dialogues before and after {final.name} (memory carried), and the reset baseline:")
    print(format_accuracy_table({"stage4": before["memory"], final.name: result["memory"], "reset": result["reset"]}))


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


def _bench(args: argparse.Namespace) -> int:
    import runpy

    from .curriculum import find_source_dir

    script = find_source_dir("benchmarks", f"bench_{args.benchmark}.py") / f"bench_{args.benchmark}.py"
    saved = sys.argv[:]
    sys.argv = [str(script), *[a for a in args.bench_args if a != "--"]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
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
    chat.add_argument("--seed", type=int, default=None,
                      help="seed the initial memory and the sampling (the same transcript every run)")
    chat.add_argument("--save-memory", help="save the conversation's STM to FILE at the end")
    chat.set_defaults(func=_chat)


    train = commands.add_parser(
        "train", help="run the training curriculum (stages 0-5) of a preset, resumably",
        description="Runs the trainers/ stage scripts of a preset one after another (each stage starting from "
                    "the previous stage's output under --output), then measures memory retention on held-out "
                    "dialogues and writes a Hub-ready directory (--output/hub). Completed stages are skipped and "
                    "an interrupted stage resumes from its last checkpoint, so re-running the same command "
                    "continues where it stopped. Arguments after -- go to every training stage (stages 1-5), "
                    "e.g. -- --report_to tensorboard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", default="tiny",
                       help="trainers/configs/<preset> (tiny: CPU, embedded corpus; micro: a 1-minute smoke run; "
                            "mini: the reference's Mini size, GPU + Hub datasets) or a folder of stage YAMLs")
    train.add_argument("--output", required=True, help="output directory (stage0 ... stage5, hub)")
    train.add_argument("--stages", default=None, help="e.g. 0-5 or 4,5; when omitted, every stage the preset has")
    train.add_argument("--algorithm", choices=["impo", "dmpo"], default="impo", help="stage 5 algorithm")
    train.add_argument("--launcher", default=None,
                       help="run stages 1-5 under this command, e.g. 'accelerate launch --num_processes 2' "
                            "(default: in this process)")
    train.add_argument("--trainers-dir", default=None, help="the trainers/ folder (default: this checkout's)")
    train.add_argument("--eval-dialogues", type=int, default=512,
                       help="held-out dialogues for the final retention check (0 = skip)")
    train.add_argument("--eval-max-distance", type=int, default=8, help="longest fact-question distance checked")
    train.add_argument("--no-hub", action="store_true", help="do not write the Hub-ready directory")
    train.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    train.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- then arguments for every training stage")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "eval-memory", help="fact accuracy per distance with the memory carried vs reset",
        description="Runs held-out dialogues of the embedded synthetic corpus through the model, writing its own "
                    "answers into the memory, and scores the recall questions per distance; the same dialogues "
                    "with the memory reset before every turn are the stateless baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    evaluate.add_argument("model", help="RxT model directory or Hub id (with its tokenizer)")
    evaluate.add_argument("--dialogues", type=int, default=512, help="held-out dialogues")
    evaluate.add_argument("--max-distance", type=int, default=8, help="longest fact-question distance")
    evaluate.add_argument("--seed", type=int, default=2, help="corpus seed (2 = the one the trainers use)")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--teacher-forcing", action="store_true",
                          help="write the reference answers into memory instead of the model's own")
    evaluate.add_argument("--output", help="also write the full result as JSON to this file")
    evaluate.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    evaluate.set_defaults(func=_eval_memory)

    bench = commands.add_parser(
        "bench", help="run a benchmark script (inference, tensorbleu, sqa, memory); its --help lists the options",
        description="Runs benchmarks/bench_<name>.py, which prints side-by-side ratios from one run.")
    bench.add_argument("benchmark", choices=["inference", "tensorbleu", "sqa", "memory"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options for the benchmark script")
    bench.set_defaults(func=_bench)

    from .hub.push import add_push_parser

    add_push_parser(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .curriculum import CurriculumError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, CurriculumError) as error:
        print(f"rxt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
