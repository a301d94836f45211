"""`rxt serve` (issue 17), on localhost: conversations continued by `previous_response_id` match the same turns
through `generate` in-process (answers and stored STM), streaming agrees with non-streaming, dynamic batching keeps
conversations apart, a SIGKILLed server continues every stored conversation, two servers share one Redis, and bad
requests get clear 4xx errors. The model is a tiny random RxT saved to a temporary directory."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from rxt_factories import story_tokenizer, tiny_model
from transformers_rxt.pipeline_rxt import write_history
from transformers_rxt.serving import SQLiteSTMStore, open_store
from transformers_rxt.serving.store import ForeignMemoryError, UnknownResponseError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
KEY = "test-key"
TURNS = ["the cat ran", "to the hill", "and found a stone"]


# ============================================================================================== fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model = tiny_model(seed=1, vocab=VOCAB)
    with torch.no_grad():  # answers with some text to compare, and never the pad id (generate's filler)
        model.lm_head.bias[model.config.eos_token_id] -= 3.0
        model.lm_head.bias[model.config.pad_token_id] -= 30.0
    path = tmp_path_factory.mktemp("serve-model")
    model.save_pretrained(path)
    story_tokenizer(VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """The saved model and tokenizer, loaded in-process as the server loads them."""
    from transformers import AutoModelForCausalLM

    from transformers_rxt import load_rxt_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    return model, load_rxt_tokenizer(model_dir)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """An `rxt serve` subprocess on a free localhost port."""

    def __init__(self, model_dir, store: str, *extra: str, api_key: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("RXT_API_KEY", None)
        args = [sys.executable, "-m", "transformers_rxt_cli", "serve", str(model_dir), "--port", str(self.port),
                "--store", store, "--model-name", "serve-model", "--batch-wait-ms", "50", *extra]
        args += ["--api-key", api_key] if api_key else []
        self.log = Path(model_dir).parent / f"serve-{self.port}.log"
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"rxt serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"rxt serve did not answer /health in {timeout} s:\n{self.log.read_text()}")

    def request(self, path: str, body=None, *, key: str | None = "default", raw: bytes | None = None):
        """(status, parsed JSON or SSE events) of one request."""
        key = self.api_key if key == "default" else key
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as reply:
                text = reply.read().decode()
                kind = reply.headers.get("content-type", "")
                return reply.status, _parse_sse(text) if kind.startswith("text/event-stream") else json.loads(text)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read().decode())

    def respond(self, text: str, previous: str | None = None, **fields):
        body = {"model": "serve-model", "input": text, "max_output_tokens": 8, **fields}
        if previous is not None:
            body["previous_response_id"] = previous
        status, reply = self.request("/v1/responses", body)
        assert status == 200, reply
        if fields.get("stream"):
            deltas = "".join(e["delta"] for e in reply if e["type"] == "response.output_text.delta")
            assert [e["sequence_number"] for e in reply] == list(range(len(reply)))
            assert reply[0]["type"] == "response.created" and reply[-1]["type"] == "response.completed"
            final = reply[-1]["response"]
            assert _output_text(final) == deltas  # the deltas add up to the completed text
            return final
        return reply

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.log_file.close()
        return code


def _parse_sse(text: str) -> list:
    events = []
    for block in text.strip().split("\n\n"):
        data = [line[len("data: "):] for line in block.splitlines() if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            events.append(json.loads(data[0]))
        elif data:
            events.append("[DONE]")
    return events


def _output_text(response: dict) -> str:
    return "".join(part["text"] for item in response["output"] for part in item["content"])


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One SQLite-backed server with an API key for most tests; checked to shut down cleanly (rc 0)."""
    store = tmp_path_factory.mktemp("serve-store") / "stm.sqlite3"
    srv = Server(model_dir, str(store), api_key=KEY).wait_ready()
    srv.store_path = store
    yield srv
    assert srv.stop() == 0, srv.log.read_text()
    assert "stopped" in srv.log.read_text()


# ============================================================================================== reference
@torch.no_grad()
def in_process(reference, turns, seed, max_new_tokens=8, stm=None, history=()):
    """The same conversation through the model's own API: (answers, STM after each turn)."""
    model, tokenizer = reference
    if stm is None:
        stm = model.init_memory(1, generator=torch.Generator().manual_seed(seed))
        write_history(model, stm, history)
    answers, memories = [], []
    for text in turns:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        out = model.generate(**prompt, stm=stm, do_sample=False, max_new_tokens=max_new_tokens, memory_update="sync")
        answers.append(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))
        memories.append(stm.memory.clone())
    return answers, memories, stm


def stored(path, response_id, reference):
    store = SQLiteSTMStore(path)
    try:
        return store.get(response_id, reference[0].model_signature, reference[0].dtype).memory
    finally:
        store.close()


def converse(srv, turns, seed, **fields):
    """Run `turns` as one conversation chained by previous_response_id: (answers, response ids)."""
    answers, ids, previous = [], [], None
    for index, text in enumerate(turns):
        reply = srv.respond(text, previous, **({"seed": seed} if index == 0 else {}), **fields)
        answers.append(_output_text(reply))
        ids.append(reply["id"])
        previous = reply["id"]
    return answers, ids


# ============================================================================================== behaviour
def test_a_conversation_continued_by_response_id_matches_generate_in_process(server, reference):
    answers, ids = converse(server, TURNS, seed=7)
    expected, memories, _ = in_process(reference, TURNS, seed=7)
    assert answers == expected and any(expected)
    for response_id, memory in zip(ids, memories):
        assert torch.equal(stored(server.store_path, response_id, reference), memory)


def test_streaming_and_non_streaming_agree(server, reference):
    plain, plain_ids = converse(server, TURNS[:2], seed=11)
    streamed, streamed_ids = converse(server, TURNS[:2], seed=11, stream=True)
    assert streamed == plain == in_process(reference, TURNS[:2], seed=11)[0]
    for a, b in zip(plain_ids, streamed_ids):
        assert torch.equal(stored(server.store_path, a, reference), stored(server.store_path, b, reference))


def test_store_false_answers_without_storing(server, reference):
    reply = server.respond(TURNS[0], seed=5, store=False)
    assert _output_text(reply) == in_process(reference, TURNS[:1], seed=5)[0][0]
    status, error = server.request("/v1/responses", {"input": "again", "previous_response_id": reply["id"]})
    assert status == 404 and error["error"]["code"] == "response_not_found"


def test_chat_completions_write_the_history_into_a_fresh_memory(server, reference):
    model, tokenizer = reference
    messages = [{"role": "system", "content": "the red fox"}, {"role": "user", "content": "the cat ran"},
                {"role": "assistant", "content": "to the hill"}, {"role": "user", "content": "and found a stone"}]
    history = [tokenizer.apply_chat_template(turn, tokenize=True, return_dict=True)["input_ids"]
               for turn in ([messages[0]], messages[1:3])]
    expected = in_process(reference, [messages[-1]["content"]], seed=3, history=history)[0][0]
    body = {"model": "serve-model", "messages": messages, "max_tokens": 8, "seed": 3}
    status, reply = server.request("/v1/chat/completions", body)
    assert status == 200 and reply["choices"][0]["message"]["content"] == expected
    assert reply["usage"]["completion_tokens"] > 0
    status, chunks = server.request("/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and chunks[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == expected
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_conversations_decode_in_one_batch_and_stay_apart(server, reference):
    seeds = [21, 22, 23, 24]
    results = {}

    def run(seed):
        results[seed] = converse(server, [f"the {seed} fox", "ran to the river"], seed=seed)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    status, metrics = server.request("/metrics")
    assert status == 200 and metrics["scheduler"]["max_batch"] > 1  # requests did share a batch
    for seed in seeds:
        expected, memories, _ = in_process(reference, [f"the {seed} fox", "ran to the river"], seed=seed)
        assert results[seed][0] == expected
        for response_id, memory in zip(results[seed][1], memories):
            # decoded in a left-padded batch: the same tokens, memories equal to float rounding
            torch.testing.assert_close(stored(server.store_path, response_id, reference), memory,
                                       rtol=1e-5, atol=1e-5)


def test_bad_requests_get_clear_4xx_errors(server, reference, model_dir):
    status, error = server.request("/v1/responses", {"input": "hi", "previous_response_id": "resp_unknown"})
    assert status == 404 and "resp_unknown" in error["error"]["message"]
    status, error = server.request("/v1/responses", raw=b'{"input": "hi",')
    assert status == 400 and "not valid JSON" in error["error"]["message"]
    status, error = server.request("/v1/responses", {"input": "the cat " * 40})
    assert status == 400 and error["error"]["code"] == "input_too_long"
    status, error = server.request("/v1/responses", {"input": "hi", "max_output_tokens": 500})
    assert status == 400 and error["error"]["code"] == "max_tokens_too_large"
    status, error = server.request("/v1/responses", {"input": "hi", "tools": []})
    assert status == 400 and "tools" in error["error"]["message"]
    status, error = server.request("/v1/responses", {"input": "hi", "model": "gpt-4o"})
    assert status == 404 and "serve-model" in error["error"]["message"]
    status, error = server.request("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]})
    assert status == 400 and "user" in error["error"]["message"]
    for key in ("wrong", None):
        status, error = server.request("/v1/models", key=key)
        assert status == 401 and "Bearer" in error["error"]["message"]
    status, models = server.request("/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["serve-model"]
    # a memory stored by another model is refused, never decoded from
    store = SQLiteSTMStore(server.store_path)
    other = dict(reference[0].model_signature, fingerprint="0" * 16)
    store.put_many([("resp_foreign", torch.zeros(1, 2, 8, 32))], other)
    store.close()
    status, error = server.request("/v1/responses", {"input": "hi", "previous_response_id": "resp_foreign"})
    assert status == 409 and "another model" in error["error"]["message"]
    status, metrics = server.request("/metrics")
    assert metrics["statuses"]["404"] >= 2 and metrics["statuses"]["401"] >= 2


def test_a_sigkilled_server_continues_every_stored_conversation_and_a_full_queue_is_a_503(model_dir, reference,
                                                                                           tmp_path):
    store = str(tmp_path / "stm.sqlite3")
    first = Server(model_dir, store, "--max-queue", "1").wait_ready()
    seeds = [31, 32, 33]
    started = {seed: converse(first, TURNS[:2], seed=seed) for seed in seeds}
    # a burst beyond the bounded queue: the excess gets a 503 before any stream starts, the rest are answered
    barrier, statuses = threading.Barrier(8), []

    def burst(index):
        barrier.wait()
        statuses.append(first.request("/v1/responses", {"input": f"the fox {index}", "max_output_tokens": 8,
                                                        "store": False, "stream": True}))

    threads = [threading.Thread(target=burst, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy = [reply for status, reply in statuses if status == 503]
    assert busy and all("--max-queue 1" in reply["error"]["message"] for reply in busy)
    assert all(reply[-1]["type"] == "response.completed" for status, reply in statuses if status == 200)
    first.stop(signal.SIGKILL)
    second = Server(model_dir, store).wait_ready()
    try:
        for seed in seeds:
            reply = second.respond(TURNS[2], started[seed][1][-1])
            expected, memories, _ = in_process(reference, TURNS, seed=seed)
            assert started[seed][0] + [_output_text(reply)] == expected
            assert torch.equal(stored(store, reply["id"], reference), memories[-1])
    finally:
        assert second.stop() == 0


def test_two_servers_sharing_one_redis_serve_a_conversation_alternately(model_dir, reference, tmp_path):
    redis_server = shutil.which("redis-server")
    assert redis_server, "redis-server is not installed: apt-get install -y redis-server (scripts/run_tests.sh does this)"
    port = _free_port()
    redis_proc = subprocess.Popen([redis_server, "--port", str(port), "--save", "", "--appendonly", "no",
                                   "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                open_store(url).close()
                break
            except ValueError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        servers = [Server(model_dir, url), Server(model_dir, url)]
        for srv in servers:
            srv.wait_ready()
        previous, answers = None, []
        for index, text in enumerate(TURNS):
            reply = servers[index % 2].respond(text, previous, **({"seed": 41} if index == 0 else {}))
            answers.append(_output_text(reply))
            previous = reply["id"]
        expected, memories, _ = in_process(reference, TURNS, seed=41)
        assert answers == expected
        store = open_store(url)
        assert torch.equal(store.get(previous, reference[0].model_signature, reference[0].dtype).memory,
                           memories[-1])
        store.close()
        for srv in servers:
            assert srv.stop() == 0
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)


# ============================================================================================== the store
def test_the_store_evicts_by_count_and_age_and_refuses_foreign_memories(tmp_path, reference):
    signature = reference[0].model_signature
    store = SQLiteSTMStore(tmp_path / "s.db", max_count=2)
    for index in range(3):
        store.put_many([(f"r{index}", torch.full((1, 2, 8, 32), float(index)))], signature)
    assert store.count() == 2
    with pytest.raises(UnknownResponseError, match="evicted"):
        store.get("r0", signature, torch.float32)
    assert torch.equal(store.get("r2", signature, torch.float32).memory, torch.full((1, 2, 8, 32), 2.0))
    with pytest.raises(ForeignMemoryError, match="bfloat16"):
        store.get("r2", signature, torch.bfloat16)
    with pytest.raises(ForeignMemoryError, match="another model"):
        store.get("r2", dict(signature, slots=4), torch.float32)
    store.close()
    aged = SQLiteSTMStore(tmp_path / "s.db", max_age_s=0.2)
    time.sleep(0.3)
    with pytest.raises(UnknownResponseError):
        aged.get("r2", signature, torch.float32)
    aged.put_many([("r3", torch.zeros(1, 2, 8, 32))], signature)
    assert aged.count() == 1  # the expired rows were deleted by the write
    aged.close()
    with pytest.raises(ValueError, match="unknown scheme"):
        open_store("postgres://x/y")
