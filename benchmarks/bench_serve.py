"""`rxt serve`: per-turn latency and throughput, stateful (RxT memory on the server) vs stateless clients.

One `rxt serve` process on localhost serves a random-weight RxT (dim 128, 4 layers, STM 4 x 64 slots,
interaction window 256; EOS and pad suppressed so that every answer has exactly `--new-tokens` tokens). Then
`--conversations` conversations of `--turns` turns run in two modes, interleaved turn by turn (turn t of every
stateful conversation, sent together, one client thread each; then turn t of every stateless one; then t + 1):

* stateful: `POST /v1/responses` with `previous_response_id`; each request carries only the new query, the
  server reads the conversation's stored STM, answers, writes the interaction into the memory and stores it;
* stateless: `POST /v1/chat/completions` with the whole history re-sent every turn (the server's own earlier
  answers included); the server writes every earlier turn into a fresh memory, then answers: the same model and
  decoder, served as stateless OpenAI servers serve (every turn re-reads the history).

Requests are bounded loops (turns x conversations x 2 requests, no retries). Printed: p50/p99 client-side latency
per turn number, the ratio turn-last / turn-2 of the medians, and conversation-turns per second of each mode's own
time (the sum of its turns' spans), over the whole run and from turn 10 on.
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


class Conversation:
    """One client conversation in one mode: what it sends each turn and what it keeps between turns."""

    def __init__(self, url: str, mode: str, index: int, new_tokens: int):
        self.url, self.mode, self.index, self.new_tokens = url, mode, index, new_tokens
        self.previous, self.messages = None, []

    def turn(self, turn: int, advance: bool = True) -> dict:
        """Send turn `turn`; with `advance=False` it is a repeat (the same request again, the state unchanged)."""
        text = query(self.index, turn)
        started = time.perf_counter()
        if self.mode == "stateful":  # only the new query; the server holds the rest as the STM
            body = {"input": text, "max_output_tokens": self.new_tokens, "seed": self.index}
            if self.previous:
                body["previous_response_id"] = self.previous
            reply = post(self.url + "/v1/responses", body)
            self.previous = reply["id"] if advance else self.previous
            tokens = reply["usage"]["output_tokens"]
        else:  # the whole history again, the server's own earlier answers included
            messages = self.messages + [{"role": "user", "content": text}]
            reply = post(self.url + "/v1/chat/completions", {"messages": messages, "max_tokens": self.new_tokens,
                                                             "seed": self.index})
            tokens = reply["usage"]["completion_tokens"]
            if advance:
                answer = reply["choices"][0]["message"]["content"] or "."
                self.messages = messages + [{"role": "assistant", "content": answer}]
        ended = time.perf_counter()
        assert tokens == self.new_tokens, f"{self.mode} turn {turn}: {tokens} tokens, expected {self.new_tokens}"
        return {"turn": turn, "start": started, "end": ended}


def run(url: str, conversations: int, turns: int, new_tokens: int, repeats: int) -> dict[str, list[dict]]:
    """Turn by turn, the two modes interleaved (so that load from other jobs falls on both alike): the N
    conversations of a mode send their turn-t request together (one thread each) and the round ends when all
    have their answers. Each turn is sent `repeats` times per mode (stateful, stateless, stateful, ...; the same
    request again, from the same state), the last one carries the conversation on. One record per request;
    bounded: turns x repeats x conversations x 2 requests, no retries."""
    clients = {mode: [Conversation(url, mode, c, new_tokens) for c in range(conversations)]
               for mode in ("stateful", "stateless")}
    records: dict[str, list[dict]] = {mode: [] for mode in clients}
    for turn, repeat in ((t, r) for t in range(1, turns + 1) for r in range(repeats)):
        advance = repeat == repeats - 1
        for mode, group in clients.items():
            results: list = [None] * conversations
            threads = [threading.Thread(target=lambda c=c: results.__setitem__(c, group[c].turn(turn, advance)))
                       for c in range(conversations)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if any(result is None for result in results):
                raise SystemExit(f"{mode} turn {turn}: a request failed (see above)")
            records[mode] += [dict(result, round=(turn, repeat)) for result in results]
    return records


def quantile(values: list[float], q: float) -> float:
    """The median for q=0.5; otherwise the nearest-rank quantile (p99 of a few samples is their maximum)."""
    if q == 0.5:
        return statistics.median(values)
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def throughput(records: list[dict], from_turn: int = 1) -> float:
    """Conversation-turns per second of the mode's own time: each round's span (first request sent to last answer
    received), summed over the rounds of the turns from `from_turn` on."""
    rounds: dict = {}
    for r in records:
        if r["turn"] >= from_turn:
            rounds.setdefault(r["round"], []).append(r)
    spans = [max(r["end"] for r in group) - min(r["start"] for r in group) for group in rounds.values()]
    return sum(len(group) for group in rounds.values()) / sum(spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=4, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=20, help="turns per conversation")
    parser.add_argument("--new-tokens", type=int, default=16, help="answer length (tokens) of every turn")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each turn is sent per mode (the same request from the same state); the "
                             "latencies of all repeats form the turn's p50/p99")
    parser.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="the server's --batch-wait-ms (how long a batch waits for more requests to join)")
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
             "--batch-wait-ms", str(args.batch_wait_ms),
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
            results = run(url, args.conversations, args.turns, args.new_tokens, args.repeats)
            metrics = json.loads(urllib.request.urlopen(url + "/metrics").read())
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"rxt serve, {args.conversations} concurrent conversations x {args.turns} turns, {args.new_tokens} new "
          f"tokens per turn, each turn sent {args.repeats}x per mode, server OMP_NUM_THREADS={args.server_threads}, batches up to {args.conversations}, "
          f"--batch-wait-ms {args.batch_wait_ms:g}")
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
    stats = metrics["scheduler"]
    print(f"\nscheduler (both runs): {stats['batches']} batches, {stats['batched_requests']} requests, mean batch "
          f"{stats['batched_requests'] / stats['batches']:.2f}, largest {stats['max_batch']}")


if __name__ == "__main__":
    main()
