"""`rxt serve`: per-turn latency and throughput, stateful (RxT memory on the server) vs stateless clients.

One `rxt serve` process on localhost serves a random-weight RxT (dim 128, 4 layers, STM 4 x 64 slots,
interaction window 256; EOS and pad suppressed so that every answer has exactly `--new-tokens` tokens). Then
`--conversations` client threads each hold a `--turns`-turn conversation, all at once, twice:

* stateful: `POST /v1/responses` with `previous_response_id`; each request carries only the new query, the
  server reads the conversation's stored STM, answers, writes the interaction into the memory and stores it;
* stateless: `POST /v1/chat/completions` with the whole history re-sent every turn (the server's own earlier
  answers included); the server writes every earlier turn into a fresh memory, then answers: the same model and
  decoder, served as stateless OpenAI servers serve (every turn re-reads the history).

Requests are bounded loops (turns x conversations, no retries). Printed: p50/p99 client-side latency per turn
number, the ratio turn-last / turn-2, and conversation-turns per second over the whole run and from turn 10 on.
Run: `python benchmarks/bench_serve.py [--conversations 4 --turns 20 --new-tokens 16]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the small red old fox cat dog bird ran walked to from the river hill house forest and found a stone "
         "friend story apple song light").split()


def build_model(path: Path, seed: int = 0) -> None:
    from transformers_rxt import RxTConfig, RxTForConversationalGeneration, train_rxt_tokenizer

    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(200)]
    tokenizer = train_rxt_tokenizer(texts, vocab_size=512)
    common = dict(num_layers=4, vocab_size=len(tokenizer), embed_dim=128, att_heads=8, att_groups=4,
                  att_query_groups=4, seq_len=256, stm_size=64)
    config = RxTConfig(
        decoder_config=dict(common, ff_dim=256, cross_att_groups=4, cross_att_query_groups=4),
        encoder_config=dict(common, ff_dim=256, skip_memory_cross_attention=True),
        memory_attention_config=dict(num_layers=4, embed_dim=128, att_heads=8, att_groups=4, att_query_groups=4,
                                     interlayer_att_groups=4, interlayer_att_query_groups=4, self_att_groups=4,
                                     self_att_query_groups=4, stm_size=64, seq_len=256))
    torch.manual_seed(seed)
    model = RxTForConversationalGeneration(config).eval()
    with torch.no_grad():  # every answer runs to --new-tokens: equal work per turn in both modes
        model.lm_head.bias[config.eos_token_id] = -1e4
        model.lm_head.bias[config.pad_token_id] = -1e4
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())


def query(conversation: int, turn: int) -> str:
    return " ".join(WORDS[(conversation * 5 + turn * 3 + k) % len(WORDS)] for k in range(12))


def run_mode(url: str, mode: str, conversations: int, turns: int, new_tokens: int) -> list[dict]:
    """Every conversation in its own thread, all started together; one record per turn."""
    records: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(conversations)

    def converse(c: int) -> None:
        previous, messages = None, []
        barrier.wait()
        for turn in range(1, turns + 1):
            text = query(c, turn)
            started = time.perf_counter()
            if mode == "stateful":
                body = {"input": text, "max_output_tokens": new_tokens, "seed": c}
                if previous:
                    body["previous_response_id"] = previous
                reply = post(url + "/v1/responses", body)
                previous = reply["id"]
                answer = reply["output"][0]["content"][0]["text"]
                tokens = reply["usage"]["output_tokens"]
            else:
                messages.append({"role": "user", "content": text})
                reply = post(url + "/v1/chat/completions", {"messages": messages, "max_tokens": new_tokens,
                                                            "seed": c})
                answer = reply["choices"][0]["message"]["content"]
                tokens = reply["usage"]["completion_tokens"]
                messages.append({"role": "assistant", "content": answer or "."})
            ended = time.perf_counter()
            assert tokens == new_tokens, f"{mode} turn {turn}: {tokens} tokens, expected {new_tokens}"
            with lock:
                records.append({"conversation": c, "turn": turn, "start": started, "end": ended})

    threads = [threading.Thread(target=converse, args=(c,)) for c in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(records) != conversations * turns:
        raise SystemExit(f"{mode}: only {len(records)} of {conversations * turns} turns completed (see the log)")
    return records


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def throughput(records: list[dict], from_turn: int = 1) -> float:
    chosen = [r for r in records if r["turn"] >= from_turn]
    return len(chosen) / (max(r["end"] for r in chosen) - min(r["start"] for r in chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=20, help="turns per conversation")
    parser.add_argument("--new-tokens", type=int, default=16, help="answer length (tokens) of every turn")
    parser.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model")
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads), "PYTHONPATH": str(REPO)}
        log = open(tmp / "serve.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "transformers_rxt_cli", "serve", str(tmp / "model"), "--port", str(port),
             "--store", str(tmp / "stm.sqlite3"), "--max-batch-size", str(args.conversations),
             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).read()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("rxt serve did not start:\n" + (tmp / "serve.log").read_text())
                    time.sleep(0.2)
            post(url + "/v1/responses", {"input": "warm up", "max_output_tokens": 4, "store": False})
            results = {mode: run_mode(url, mode, args.conversations, args.turns, args.new_tokens)
                       for mode in ("stateful", "stateless")}
            metrics = json.loads(urllib.request.urlopen(url + "/metrics").read())
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"rxt serve, {args.conversations} concurrent conversations x {args.turns} turns, {args.new_tokens} new "
          f"tokens per turn, server OMP_NUM_THREADS={args.server_threads}, batches up to {args.conversations}")
    print("| turn | stateful p50 (ms) | stateful p99 (ms) | stateless p50 (ms) | stateless p99 (ms) |")
    print("|---:|---:|---:|---:|---:|")
    by_turn = {mode: {t: [1e3 * (r["end"] - r["start"]) for r in records if r["turn"] == t]
                      for t in range(1, args.turns + 1)} for mode, records in results.items()}
    for turn in range(1, args.turns + 1):
        cells = [f"{quantile(by_turn[mode][turn], q):.0f}" for mode in ("stateful", "stateless") for q in (0.5, 0.99)]
        print(f"| {turn} | " + " | ".join(cells) + " |")
    print()
    print("| | stateful (/v1/responses) | stateless (/v1/chat/completions) |")
    print("|---|---:|---:|")
    last = args.turns
    ratio = {m: statistics.median(by_turn[m][last]) / statistics.median(by_turn[m][2]) for m in results}
    print(f"| median latency turn {last} / turn 2 | {ratio['stateful']:.2f} | {ratio['stateless']:.2f} |")
    for label, start in (("conversation-turns/s, all turns", 1), (f"conversation-turns/s, turns 10-{last}", 10)):
        if start <= last:
            print(f"| {label} | {throughput(results['stateful'], start):.2f} | "
                  f"{throughput(results['stateless'], start):.2f} |")
    print(f"\nscheduler: {metrics['scheduler']}")


if __name__ == "__main__":
    main()
