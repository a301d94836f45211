"""Decode speed and memory-update time of RxT vs the reference (rxlm 0.3.80 `interact()`), same weights.

    python -m venv /tmp/rxlm_venv && /tmp/rxlm_venv/bin/pip install torch==2.13.0 "transformers>=4.51,<5" \\
        "huggingface-hub>=0.33.5,<0.34" "tokenizers>=0.21,<0.22" numpy safetensors
    /tmp/rxlm_venv/bin/pip install --no-deps rxlm==0.3.80     # never a dependency of this package
    python benchmarks/bench_decode.py --rxlm-python /tmp/rxlm_venv/bin/python [--before /tmp/rxt_before]

1. The reference builds an RxT-Alpha-Mini-shaped RxTAlpha (seed 0; dim 256, 12 layers, 16 heads, SQA 8/8,
   MoE 16 experts top-2 + 1 shared expert, vocab 20000, 256 STM slots, self-interlayer memory attention) and
   saves it (the [EOS] logit pushed down so that every turn decodes the same number of tokens); `rxt
   convert-rxlm` turns that directory into ours.
2. Worker processes (the reference in its own environment, ours, and optionally ours at an older commit via
   `--before`, a source tree put first on PYTHONPATH) wait on stdin; the driver asks them in turn, alternating
   the order every round, so that load drift on a shared machine hits all alike. Medians over the rounds.
   * decode tokens/s, batch 1: a 32-token query, `--new-tokens` tokens; the time from the first to the last
     generated token. Reference: `interact(temperature=1.0, top_k=1)` (greedy); ours: `generate(do_sample=False)`.
   * memory update: reference: the time between the -1 and -2 markers of `interact()` (encoder + memory
     attention on query + answer, under its `no_grad`); ours: the update `generate(memory_update="sync")` runs
     after the answer (under its `no_grad`), from the streamer's `end()` to `generate`'s return, on the same 97
     tokens. Also printed for ours: a direct `update_memory(...)` call outside `no_grad` (what tables before
     2026-11-30 21:00 UTC reported as ours), which also records the autograd graph: it is differentiable.
   * sync vs async turns (ours only): `--turns` back-to-back turns of `generate` on one conversation, the
     batch-1 prompt and `--new-tokens` tokens each, with `memory_update="sync"` and with `"async"` (the update
     runs in the background and the next turn's `generate` waits for it before reading the memory), then
     `stm.wait()`; per-turn wall and CPU ms. The two modes alternate which goes first from call to call. With
     nothing between the turns an async turn cannot be cheaper than a sync one: it measures what handing the
     update to the background costs.
   * batch-16 throughput: 16 queries, `--batch-tokens` new tokens each, memory update excluded. Reference:
     `batch_interact` up to its -1 marker; ours: `generate(memory_update="none")`. Tokens/s = 16 x new / wall.
   * the same two figures in CPU time (`time.process_time()` of the worker: the decode tokens per CPU second,
     the update's CPU ms): on a shared, loaded CPU a worker also waits for a core, which wall time counts and CPU
     time does not; with 1 thread, CPU time is the work each implementation does.
   * a check that the weights are the same: the first generated token of every contender is printed (the
     reference's later steps use positions one too far, so only the first is comparable).
   * `--floor` (instead of the above): a batch-1 decode step split into its dense matmuls (`aten::mm`/`addmm`/
     `bmm`, self time under `torch.profiler`) and everything else, per step as the difference between decoding
     `--new-tokens` and half as many (prompt and setup cancel out); rxlm up to its -1 marker, ours with
     `memory_update="none"`. Both sides run the same matmuls on the same weights, so the last column, the base's
     step time over ours' matmul time, is the most any change outside the matmul kernels can give.
   * `--parts` (instead of the above): the memory update's parts in CPU ms, each a median of `--repeats` calls
     in one process (the encoder; the memory attention; the whole update, under no_grad; ours also with autograd
     on), on the same query + [A] + `--new-tokens` answer tokens and the same starting memory for all.
   * `--compile`: one more contender, `ours-compiled`: ours with `generate(cache_implementation="static",
     compile_config=...)`, transformers' `torch.compile` (inductor, `fullgraph=True`) of the decode step. Each
     new shape is compiled by an untimed warm-up call first (its seconds are printed); its answer must be
     token for token the eager one. Its memory update is ours (not compiled); its batch column is eager too.
   * Ours loads the weights with `from_pretrained` and stores its Linear weights column-major
     (`model.set_decode_weight_layout()`, as `rxt chat` and `rxt serve` do: the same values, a faster single-row
     matmul on CPU); `--row-major`: one more contender, `ours-row-major`, with the row-major weights as loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

QUERY_LEN = 32  # [BOS][Q] + 30 tokens; [A] is appended by interact() / is part of our prompt
EOS, BOS, Q, A, PAD = 3, 2, 5, 6, 0


def rxlm_configs(seq_len: int) -> dict:
    common = dict(num_layers=12, vocab_size=20000, embed_dim=256, att_heads=16, att_groups=8, att_query_groups=8,
                  seq_len=seq_len, stm_size=256, use_flash_attention=False, use_gated=True, ff_activation="silu",
                  ff_dropout=0.0, att_dropout=0.0, use_rms_norm=True, self_att_type="sqa", cross_att_type="sqa")
    return dict(
        decoder_config=dict(common, ff_dim=512, use_moe=True, num_experts=16, moe_top_k=2, num_shared_experts=1,
                            cross_att_groups=8, cross_att_query_groups=8, use_head_norm=True,
                            head_norm_type="layer_norm"),
        encoder_config=dict(common, ff_dim=768, skip_memory_cross_attention=True),
        memory_attention_config=dict(num_layers=12, embed_dim=256, att_heads=16, seq_len=seq_len, stm_size=256,
                                     use_flash_attention=False, att_dropout=0.0, att_groups=8, att_type="sqa",
                                     att_query_groups=8, interlayer_att_dropout=0.0, interlayer_att_groups=8,
                                     interlayer_att_type="sqa", interlayer_att_query_groups=8,
                                     norm_type="classic-rms", use_gated_residual=True, residual_per_slot_gate=True,
                                     residual_gate_type="linear", residual_gate_slot_status_type="mean",
                                     use_tanh_residual_gate=False, residual_gate_init=3.0),
        tokenizer_config=dict(bos_token_id=BOS, eos_token_id=EOS, query_token_id=Q, answer_token_id=A,
                              pad_token_id=PAD),
        memory_attention_variant="interlayer",
    )


def shared_stm(model_path: str):
    """The fixed initial memory both sides start every run from, [layers, batch, slots, dim] (rxlm's layout)."""
    import torch

    return torch.load(os.path.join(os.path.dirname(model_path), "stm.pt"))


def query_ids(batch: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    body = torch.randint(13, 20000, (batch, QUERY_LEN - 2), generator=g)
    return torch.cat([torch.tensor([[BOS, Q]]).expand(batch, 2), body], dim=1)


def stamp() -> tuple[float, float, int]:
    """Wall time, CPU time and minor page faults so far (memory the allocator took from the system again)."""
    import resource

    return time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interaction_ids(new_tokens: int):
    """A full interaction as both sides' memory update reads it: the query, [A], `new_tokens` answer tokens."""
    import torch

    answer = torch.randint(13, 20000, (1, new_tokens), generator=torch.Generator().manual_seed(1))
    return torch.cat([query_ids(1), torch.tensor([[A]]), answer], dim=1)


def cpu_ms(fn, repeats: int) -> float:
    """Median CPU ms of `fn()` over `repeats` calls, after two untimed ones."""
    return cpu_ms_and_faults(fn, repeats)[0]


def cpu_ms_and_faults(fn, repeats: int) -> tuple[float, float]:
    """Median CPU ms and median minor page faults (memory the allocator had to take from the system again) of
    `fn()` over `repeats` calls, after two untimed ones."""
    import resource

    for _ in range(2):
        fn()
    times, faults = [], []
    for _ in range(repeats):
        start, start_faults = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        times.append(1e3 * (time.process_time() - start))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    return statistics.median(times), statistics.median(faults)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def floor_per_token(decode, new_tokens: int, profiled_tokens: int = 16) -> dict:
    """`--floor`: the wall ms and the matmul ms of one decode step, each as the difference between decoding n and
    n // 2 tokens (so the prompt's forward and any setup cancel out), medians of 3 calls. Wall ms: n =
    `new_tokens`, without the profiler (its per-op bookkeeping would inflate the small ops). Matmul ms: the self
    time of the dense matmul kernels (`MATMUL_OPS`) under `torch.profiler`, n = `profiled_tokens` (the profiler's
    event lists grow with every op: long profiled runs take minutes and gigabytes)."""
    from torch.profiler import ProfilerActivity, profile

    def wall(n):
        start = time.perf_counter()
        decode(n)
        return 1e3 * (time.perf_counter() - start)

    def matmul(n):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(n)
        return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e3

    def per_step(measure, n):
        return (statistics.median(measure(n) for _ in range(3))
                - statistics.median(measure(n // 2) for _ in range(3))) / (n - n // 2)

    for n in sorted({new_tokens, new_tokens // 2, profiled_tokens, profiled_tokens // 2}):
        decode(n)  # warm-up of every length (a compiled step compiles once per static-cache size)
    return {"step_ms": per_step(wall, new_tokens), "matmul_ms": per_step(matmul, profiled_tokens)}


def decode_step_weight_bytes(model) -> int:
    """Bytes of weights a batch-1 decode step has to read: the decoder's (the routed experts' share top_k /
    num_experts; not the memory cross-attention's key/value projections, computed once per turn) and the LM
    head. Both implementations run these matmuls on the same weights."""
    total = model.lm_head.weight.nbytes + (model.lm_head.bias.nbytes if model.lm_head.bias is not None else 0)
    for module_name, module in model.rxt.decoder.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if ".memory_cross_attention.k_proj" in module_name or ".memory_cross_attention.v_proj" in module_name:
                continue
            routed = name in ("w1", "w2", "b1", "b2")  # RxTMoeFeedForward's stacked experts
            total += param.nbytes * module.top_k // module.num_experts if routed else param.nbytes
    return total


GEMV_MB = 256  # far larger than this box's 32 MB L3 cache


def gemv_bandwidth(mb: int = GEMV_MB) -> float:
    """GB/s of a single-row matmul on a weight far larger than the caches (median of 5): the speed at which a
    batch-1 decode step can stream weights from memory on this machine, with this many threads."""
    import torch

    weight = torch.randn(mb * 2**20 // (4 * 4096), 4096)
    x = torch.randn(1, weight.shape[0])
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x @ weight
        times.append(time.perf_counter() - start)
    return weight.nbytes / statistics.median(times[1:]) / 1e9


# ------------------------------------------------------------------------------------------------ reference side


def rxlm_build(path: str, seq_len: int) -> None:
    import torch
    from rxlm.rxt.models import RxTAlpha

    torch.manual_seed(0)
    model = RxTAlpha(**rxlm_configs(seq_len)).eval()
    with torch.no_grad():
        model.decoder.model.head.bias[EOS] = -1e4  # never stop early: every run decodes the same tokens
        # Equal-valued copies of what share_components() ties, so that both loaders see the same values.
        model.decoder.model.embedding.weight.copy_(model.encoder.model.embedding.weight)
    model.save_pretrained(path)


class RxlmWorker:
    def __init__(self, path: str):
        import torch
        from torch import nn
        from rxlm.rxt.models import RxTAlpha

        self.torch = torch
        model = RxTAlpha.from_pretrained(path).eval()
        model.share_components()
        # The reference's interact()/batch_interact() do not run as released; numerically neutral shims (the
        # same ones the parity fixtures list): an empty stateless-layer list, split_kv_head taking a 4th
        # argument, and the two attributes batch_interact() reads.
        if model.decoder.model.stateless_layers is None:
            model.decoder.model.stateless_layers = nn.ModuleList()
        for layer in model.decoder.model.layers:
            attn = layer.memory_cross_attention
            split = attn.split_kv_head
            attn.split_kv_head = lambda projected, b, t, d=None, _split=split: _split(projected, b, t)
        model.device = torch.device("cpu")
        model.end_token_id = model.eos_token_id
        self.model = model
        self.stm = shared_stm(path)

    def decode(self, new_tokens: int) -> dict:
        torch, model = self.torch, self.model
        if model.batch_size != 1:
            model.set_batch_mode(False)
        model.load_stm_state(self.stm[:, :1].clone())
        ids = query_ids(1)
        stamps, update, tokens = [], {}, []
        for token in model.interact(ids, torch.ones_like(ids), temperature=1.0, top_k=1,
                                    max_seq_len=QUERY_LEN + 1 + new_tokens):
            now = stamp()
            if token == -1:
                update["start"] = now
            elif token == -2:
                update["end"] = now
            else:
                stamps.append(now)
                tokens.append(token)
        assert len(stamps) == new_tokens, len(stamps)
        return {"tps": (new_tokens - 1) / (stamps[-1][0] - stamps[0][0]),
                "tps_cpu": (new_tokens - 1) / (stamps[-1][1] - stamps[0][1]),
                "update_ms": 1e3 * (update["end"][0] - update["start"][0]),
                "update_faults": update["end"][2] - update["start"][2],
                "update_cpu_ms": 1e3 * (update["end"][1] - update["start"][1]), "first": tokens[0]}

    def parts(self, new_tokens: int, repeats: int) -> dict:
        """CPU ms of the update's parts (`--parts`), under no_grad as in `interact()`."""
        from rxlm.rxt.models import RxTForwardAction

        torch, model = self.torch, self.model
        if model.batch_size != 1:
            model.set_batch_mode(False)
        ids = interaction_ids(new_tokens)
        mask = torch.ones_like(ids)

        def memory_attention():
            model.load_stm_state(self.stm[:, :1].clone())
            model.memory_attention(encoded, attention_mask=mask)

        def update():
            model.load_stm_state(self.stm[:, :1].clone())
            model.forward(ids, attention_mask=mask, action=RxTForwardAction.UPDATE)

        with torch.no_grad():
            _, encoded = model.encoder(ids, attention_mask=mask)
            update_ms, update_faults = cpu_ms_and_faults(update, repeats)
            return {"encoder": cpu_ms(lambda: model.encoder(ids, attention_mask=mask), repeats),
                    "memory_attention": cpu_ms(memory_attention, repeats), "update": update_ms,
                    "update_faults": update_faults}

    def floor(self, new_tokens: int) -> dict:
        """`--floor`: interact() up to its -1 marker (the answer only; the memory update is not run)."""
        torch, model = self.torch, self.model
        if model.batch_size != 1:
            model.set_batch_mode(False)
        ids = query_ids(1)

        def decode(n):
            model.load_stm_state(self.stm[:, :1].clone())
            for token in model.interact(ids, torch.ones_like(ids), temperature=1.0, top_k=1,
                                        max_seq_len=QUERY_LEN + 1 + n):
                if token == -1:
                    break

        return floor_per_token(decode, new_tokens)

    def batch(self, batch: int, new_tokens: int) -> dict:
        torch, model = self.torch, self.model
        if model.batch_size != batch:
            model.set_batch_mode(True, batch)
        model.load_stm_state(self.stm[:, :batch].clone())
        ids = torch.cat([query_ids(batch), torch.zeros(batch, new_tokens + 1, dtype=torch.long)], dim=1)
        mask = (ids != 0).long()
        start = time.perf_counter()
        steps = 0
        for row in model.batch_interact(ids, mask, temperature=1.0, top_k=1,
                                        max_seq_len=QUERY_LEN + 1 + new_tokens):
            if int(row[0]) == -1:
                break
            steps += 1
        wall = time.perf_counter() - start
        return {"tokens_per_s": batch * steps / wall, "steps": steps}


# ------------------------------------------------------------------------------------------------ our side


class OursWorker:
    def __init__(self, path: str, compiled: bool = False, row_major: bool = False):
        import torch
        import transformers_rxt
        from transformers_rxt import RxTForConversationalGeneration

        self.torch = torch
        self.source = os.path.dirname(transformers_rxt.__file__)
        self.model = RxTForConversationalGeneration.from_pretrained(path).eval()
        if not row_major and hasattr(self.model, "set_decode_weight_layout"):  # --before trees may predate it
            self.model.set_decode_weight_layout()  # what `rxt chat` and `rxt serve` run
        self.stm = shared_stm(path)
        self.decode_kwargs, self.warmed_up = {}, set()
        if compiled:
            from transformers import CompileConfig

            config = CompileConfig(fullgraph=True, mode="default")  # "reduce-overhead" means CUDA graphs
            config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
            self.decode_kwargs = dict(cache_implementation="static", compile_config=config)

    def _stm(self, batch: int):
        from transformers_rxt import STMCache

        return STMCache(self.stm[:, :batch].transpose(0, 1).contiguous(), self.model.model_signature)

    def decode(self, new_tokens: int) -> dict:
        torch, model = self.torch, self.model
        prompt = torch.cat([query_ids(1), torch.tensor([[A]])], dim=1)
        stamps = []

        class Streamer:
            seen_prompt = False
            ended = None

            def put(self, value):
                if self.seen_prompt:
                    stamps.append((time.perf_counter(), time.process_time()))
                self.seen_prompt = True

            def end(self):  # after the last token, before generate's memory update: rxlm's -1 marker
                self.ended = stamp()

        # No min_new_tokens: the [EOS] logit is pushed down in the weights (see rxlm_build), so every answer has
        # `new_tokens` tokens anyway (asserted below), and transformers' min-length processors would add two
        # vocabulary-sized passes per step that rxlm's interact() does not run.
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, **self.decode_kwargs)
        compile_s = None
        if self.decode_kwargs and new_tokens not in self.warmed_up:  # compiles for this static-cache size
            start = time.perf_counter()
            model.generate(prompt, stm=self._stm(1), memory_update="none", **kwargs)
            compile_s = time.perf_counter() - start
            self.warmed_up.add(new_tokens)
        stm, streamer = self._stm(1), Streamer()
        # The memory update timed as in rxlm's interact(): the one generate runs after the answer ("sync": in this
        # call, under generate's no_grad), from the streamer's end() to generate's return.
        out = model.generate(prompt, stm=stm, streamer=streamer, memory_update="sync", **kwargs)
        done = stamp()
        assert len(stamps) == new_tokens, len(stamps)
        written, _ = model.interactions_from_generation(out, prompt.shape[1])
        assert written.shape[1] == QUERY_LEN + 1 + new_tokens, written.shape  # the same 97 tokens as rxlm's update
        # The direct call `update_memory(...)` outside no_grad (what the tables before 2026-11-30 21:00 UTC timed):
        # differentiable by design, so it also records the autograd graph.
        start, start_cpu = time.perf_counter(), time.process_time()
        model.update_memory(input_ids=written, stm=self._stm(1))
        direct, direct_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        return {"tps": (new_tokens - 1) / (stamps[-1][0] - stamps[0][0]),
                "update_ms": 1e3 * (done[0] - streamer.ended[0]),
                "tps_cpu": (new_tokens - 1) / (stamps[-1][1] - stamps[0][1]),
                "update_cpu_ms": 1e3 * (done[1] - streamer.ended[1]), "update_faults": done[2] - streamer.ended[2],
                "direct_update_ms": 1e3 * direct, "direct_update_cpu_ms": 1e3 * direct_cpu,
                "first": int(out[0, QUERY_LEN + 1]), "answer": out[0, QUERY_LEN + 1:].tolist(),
                "compile_s": compile_s}

    def turns(self, new_tokens: int, turns: int) -> dict:
        """Per-turn wall and CPU ms of `turns` back-to-back turns, memory_update "sync" and "async" (see above)."""
        torch, model = self.torch, self.model
        prompt = torch.cat([query_ids(1), torch.tensor([[A]])], dim=1)
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, **self.decode_kwargs)
        self.turn_calls = getattr(self, "turn_calls", 0) + 1
        result = {}
        for mode in ("sync", "async") if self.turn_calls % 2 else ("async", "sync"):
            stm = self._stm(1)
            model.generate(prompt, stm=stm, memory_update=mode, **kwargs)  # untimed first turn
            stm.wait()
            start = stamp()
            for _ in range(turns):
                model.generate(prompt, stm=stm, memory_update=mode, **kwargs)
            stm.wait()
            end = stamp()
            result[f"{mode}_ms"] = 1e3 * (end[0] - start[0]) / turns
            result[f"{mode}_cpu_ms"] = 1e3 * (end[1] - start[1]) / turns
        return result

    def parts(self, new_tokens: int, repeats: int) -> dict:
        """CPU ms of the update's parts (`--parts`), under no_grad as in `generate`; the whole `update_memory`
        also with autograd on."""
        torch, model = self.torch, self.model
        ids = interaction_ids(new_tokens)
        mask = torch.ones_like(ids)
        memory = self._stm(1).memory

        def update():
            model.update_memory(ids, mask, self._stm(1))

        with torch.no_grad():
            encoded, _ = model.encode(ids, mask)
            update_ms, update_faults = cpu_ms_and_faults(update, repeats)
            result = {"encoder": cpu_ms(lambda: model.encode(ids, mask), repeats),
                      "memory_attention": cpu_ms(lambda: model.memory_attention(memory, encoded, mask), repeats),
                      "update": update_ms, "update_faults": update_faults}
        result["update_autograd"] = cpu_ms(update, repeats)
        return result

    def floor(self, new_tokens: int) -> dict:
        """`--floor`: generate the answer only (memory_update="none"); also the bytes of weights one decode step
        reads and this worker's single-row matmul (GEMV) bandwidth."""
        torch, model = self.torch, self.model
        prompt = torch.cat([query_ids(1), torch.tensor([[A]])], dim=1)

        def decode(n):
            model.generate(prompt, stm=self._stm(1), memory_update="none", max_new_tokens=n, do_sample=False,
                           **self.decode_kwargs)

        return {**floor_per_token(decode, new_tokens), "weight_mb": decode_step_weight_bytes(model) / 1e6,
                "gemv_gbs": gemv_bandwidth()}

    def batch(self, batch: int, new_tokens: int) -> dict:
        torch, model = self.torch, self.model
        prompt = torch.cat([query_ids(batch), torch.full((batch, 1), A)], dim=1)
        stm = self._stm(batch)
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), stm=stm, max_new_tokens=new_tokens,
                             do_sample=False, memory_update="none")
        wall = time.perf_counter() - start
        assert out.shape[1] == prompt.shape[1] + new_tokens and not (out[:, prompt.shape[1]:] == EOS).any()
        return {"tokens_per_s": batch * new_tokens / wall, "steps": new_tokens}


def serve(kind: str, path: str, threads: int) -> None:
    """Worker loop: one JSON command per stdin line, one JSON answer per stdout line."""
    import torch

    torch.set_num_threads(threads)
    protocol = os.fdopen(os.dup(1), "w")  # answers only; anything the libraries print goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = (RxlmWorker(path) if kind == "rxlm"
              else OursWorker(path, compiled=kind == "ours-compiled", row_major=kind == "ours-row-major"))
    print(json.dumps({"ready": True, "source": getattr(worker, "source", None)}), file=protocol, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        result = getattr(worker, cmd.pop("op"))(**cmd)
        print(json.dumps(result), file=protocol, flush=True)


# ------------------------------------------------------------------------------------------------ driver


class Client:
    def __init__(self, name: str, python: str, kind: str, path: str, threads: int, pythonpath: str | None = None):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if pythonpath:
            env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
        self.name = name
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--serve", kind, path, str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (see its stderr above)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def alternate(clients: list[Client], rounds: int, **cmd) -> dict[str, list[dict]]:
    results = {c.name: [] for c in clients}
    for r in range(rounds):
        for c in clients if r % 2 == 0 else clients[::-1]:
            results[c.name].append(c.ask(**cmd))
    return results


def med(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def print_parts(parts: dict[str, list[dict]], threads: int, base: str) -> None:
    """The `--parts` table: medians over the rounds of each round's median CPU ms."""
    columns = ("encoder", "memory_attention", "update", "update_faults", "update_autograd")
    print(f"\n| threads | implementation | encoder CPU ms | memory attention CPU ms | update CPU ms "
          f"| update minor page faults | update with autograd CPU ms | update speed vs {base} (CPU) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in parts.items():
        cells = [f"{med(rows, key):.1f}" if key in rows[0] else "-" for key in columns]
        ratio = med(parts[base], "update") / med(rows, "update")
        print(f"| {threads} | {name} | {' | '.join(cells)} | {ratio:.2f}x |", flush=True)


def print_floor(floor: dict[str, list[dict]], threads: int, base: str) -> None:
    """The `--floor` table: per decode step, wall ms and the dense matmuls' ms (medians over the rounds), and the
    decode speed vs `base` that an implementation reaches if everything but those matmuls took no time."""
    print(f"\n| threads | implementation | decode step ms | matmul ms | other ms | matmul share "
          f"| decode vs {base} | with matmuls only: vs {base} |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    base_step = med(floor[base], "step_ms")
    for name, rows in floor.items():
        step, mm = med(rows, "step_ms"), med(rows, "matmul_ms")
        print(f"| {threads} | {name} | {step:.2f} | {mm:.2f} | {step - mm:.2f} | {mm / step:.0%} "
              f"| {base_step / step:.2f}x | {base_step / mm:.2f}x |", flush=True)
    ours = floor["ours"]
    weight_mb, gbs = med(ours, "weight_mb"), med(ours, "gemv_gbs")
    print(f"\nA decode step reads {weight_mb:.1f} MB of weights (fp32); a single-row matmul streams {gbs:.1f} GB/s "
          f"here ({threads} thread(s), a {GEMV_MB} MB weight): no fp32 implementation's step can take less than "
          f"{weight_mb / gbs:.2f} ms, {base_step / (weight_mb / gbs):.2f}x the speed of {base}'s "
          f"{base_step:.2f} ms.", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rxlm-python", help="python of an environment with rxlm 0.3.80 (see above)")
    parser.add_argument("--before", help="a source tree of ours at another commit (e.g. git archive), measured too")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=2,
                        help="back-to-back turns per mode for the sync vs async table (ours only; 0: skip it)")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours with a static cache + torch.compile of the decode step")
    parser.add_argument("--row-major", action="store_true",
                        help="one more contender: ours with the row-major Linear weights transformers loads")
    parser.add_argument("--parts", action="store_true",
                        help="only time the memory update's parts (encoder, memory attention, whole update; CPU ms, "
                             "in-process medians of --repeats calls per round) on a query + [A] + --new-tokens")
    parser.add_argument("--repeats", type=int, default=20, help="calls per round for --parts")
    parser.add_argument("--floor", action="store_true",
                        help="only split a batch-1 decode step into its dense matmuls (torch.profiler) and the rest, "
                             "for every contender: how fast a decode step can get without faster matmuls")
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "PATH", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, path, threads = args.serve
        serve(kind, path, int(threads))
        return
    if not args.rxlm_python and not args.before:
        parser.error("nothing to compare against: pass --rxlm-python and/or --before")

    here = os.path.dirname(os.path.abspath(__file__))
    work = tempfile.mkdtemp(prefix="bench_decode_")
    seq_len = QUERY_LEN + 1 + max(args.new_tokens, args.batch_tokens) + 8
    ours_dir, rxlm_dir = os.path.join(work, "ours"), os.path.join(work, "rxlm")
    if args.rxlm_python:
        build = f"import sys; sys.path.insert(0, {here!r}); import bench_decode as b; b.rxlm_build({rxlm_dir!r}, {seq_len})"
        subprocess.run([args.rxlm_python, "-c", build], check=True)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "rxt"), "convert-rxlm", rxlm_dir, ours_dir], check=True)
    else:  # ours vs ours-before only: our own Mini-shaped model
        import torch
        from transformers_rxt import RxTForConversationalGeneration
        from transformers_rxt.benchmarks.bench_inference import mini_config

        torch.manual_seed(0)
        RxTForConversationalGeneration(mini_config(seq_len)).save_pretrained(ours_dir)

    import torch

    torch.save(torch.randn(12, args.batch, 256, 256, generator=torch.Generator().manual_seed(0)),
               os.path.join(work, "stm.pt"))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"{args.rounds} alternating rounds, {args.new_tokens} new tokens (batch 1), "
          f"{args.batch} x {args.batch_tokens} (batch)\n", flush=True)
    table, cpu_table, direct_table, turn_table = [], [], [], []
    base = "rxlm" if args.rxlm_python else "ours-before"
    for threads in args.threads:
        clients = [Client("ours", sys.executable, "ours", ours_dir, threads)]
        if args.before:
            clients.append(Client("ours-before", sys.executable, "ours", ours_dir, threads, pythonpath=args.before))
            assert clients[-1].hello["source"].startswith(os.path.abspath(args.before)), clients[-1].hello
        if args.compile:
            clients.append(Client("ours-compiled", sys.executable, "ours-compiled", ours_dir, threads))
        if args.row_major:
            clients.append(Client("ours-row-major", sys.executable, "ours-row-major", ours_dir, threads))
        if args.rxlm_python:
            clients.append(Client("rxlm", args.rxlm_python, "rxlm", rxlm_dir, threads))
        if args.parts:
            parts = alternate(clients, args.rounds, op="parts", new_tokens=args.new_tokens, repeats=args.repeats)
            for c in clients:
                c.close()
            print_parts(parts, threads, base)
            continue
        if args.floor:
            floor = alternate(clients, args.rounds, op="floor", new_tokens=args.new_tokens)
            for c in clients:
                c.close()
            print_floor(floor, threads, base)
            continue
        decode = alternate(clients, args.rounds, op="decode", new_tokens=args.new_tokens)
        batch = alternate(clients, max(3, args.rounds // 2), op="batch", batch=args.batch,
                          new_tokens=args.batch_tokens)
        ours = [c for c in clients if c.name.startswith("ours")]
        turns = alternate(ours, args.rounds, op="turns", new_tokens=args.new_tokens, turns=args.turns) if args.turns else {}
        for c in clients:
            c.close()
        for name, rows in turns.items():
            turn_table.append((threads, name, *(med(rows, f"{mode}_{unit}") for unit in ("ms", "cpu_ms")
                                                for mode in ("sync", "async"))))
        firsts = {name: rows[0]["first"] for name, rows in decode.items()}
        print(f"threads {threads}: first generated token (same weights => same token): {firsts}", flush=True)
        if args.compile:
            same = all(row["answer"] == decode["ours"][0]["answer"] for row in decode["ours-compiled"])
            warm_up = [row["compile_s"] for row in decode["ours-compiled"] if row["compile_s"] is not None]
            print(f"threads {threads}: ours-compiled: answers token for token the eager ones: {same}; "
                  f"compile (warm-up generate) {warm_up[0]:.0f} s", flush=True)
        if args.row_major:
            same = all(row["answer"] == decode["ours"][0]["answer"] for row in decode["ours-row-major"])
            print(f"threads {threads}: ours-row-major: answers token for token ours': {same}", flush=True)
        for name in decode:
            table.append((threads, name, med(decode[name], "tps"), med(decode[name], "update_ms"),
                          med(batch[name], "tokens_per_s"), med(decode[name], "tps") / med(decode[base], "tps"),
                          med(decode[base], "update_ms") / med(decode[name], "update_ms"),
                          med(batch[name], "tokens_per_s") / med(batch[base], "tokens_per_s")))
            cpu_table.append((threads, name, med(decode[name], "tps_cpu"), med(decode[name], "update_cpu_ms"),
                              med(decode[name], "tps_cpu") / med(decode[base], "tps_cpu"),
                              med(decode[base], "update_cpu_ms") / med(decode[name], "update_cpu_ms")))
            direct = ("direct_update_ms", "direct_update_cpu_ms")
            direct_table.append((threads, name, med(decode[name], "update_faults"),
                                 *(f"{med(decode[name], key):.1f}" if key in decode[name][0] else "-"
                                   for key in direct)))
        print(f"threads {threads} done: {json.dumps(table[-len(decode):])}", flush=True)  # in case a later one dies
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    if args.parts or args.floor:
        return
    print(f"| threads | implementation | decode tok/s (batch 1) | memory update ms | batch-{args.batch} tok/s "
          f"| decode vs {base} | update speed vs {base} | batch vs {base} |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for threads, name, tps, upd, btps, r1, r2, r3 in table:
        print(f"| {threads} | {name} | {tps:.1f} | {upd:.1f} | {btps:.1f} | {r1:.2f}x | {r2:.2f}x | {r3:.2f}x |")
    print(f"\nCPU time (process_time of each worker):\n\n| threads | implementation | decode tok per CPU s "
          f"| memory update CPU ms | decode vs {base} (CPU) | update vs {base} (CPU) |")
    print("|---:|---|---:|---:|---:|---:|")
    for threads, name, tps, upd, r1, r2 in cpu_table:
        print(f"| {threads} | {name} | {tps:.1f} | {upd:.1f} | {r1:.2f}x | {r2:.2f}x |")
    print("\nMinor page faults during the memory update above (median), and ours' `update_memory(...)` called directly "
          "with autograd on (records the graph; not what generate runs):\n\n| threads | implementation "
          "| update minor page faults | direct update ms | direct update CPU ms |\n|---:|---|---:|---:|---:|")
    for threads, name, faults, upd, upd_cpu in direct_table:
        print(f"| {threads} | {name} | {faults:.0f} | {upd} | {upd_cpu} |")
    if turn_table:
        print(f"\nSync vs async memory update, {args.turns} back-to-back turns of {args.new_tokens} new tokens (per turn, "
              "medians over the rounds):\n\n| threads | implementation | sync turn ms | async turn ms | async / sync "
              "| sync turn CPU ms | async turn CPU ms | async / sync (CPU) |\n|---:|---|---:|---:|---:|---:|---:|---:|")
        for threads, name, sync, asyn, sync_cpu, async_cpu in turn_table:
            print(f"| {threads} | {name} | {sync:.1f} | {asyn:.1f} | {asyn / sync:.3f} | {sync_cpu:.1f} "
                  f"| {async_cpu:.1f} | {async_cpu / sync_cpu:.3f} |")


if __name__ == "__main__":
    main()
