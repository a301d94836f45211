"""Dynamic batching for `rxt serve`: requests of different conversations decode together in one `generate`.

One scheduler thread owns the model. It waits for a request, gathers the others that arrive within a short
window (up to `max_batch_size`, same sampling settings), writes each request's earlier turns into its memory
row, stacks the rows into one `STMCache`, left-pads the prompts and calls `model.generate` once, streaming each
row's tokens to its own request. The batch's memory update is the model's own background update
(`memory_update="async"`: one encoder + memory-attention pass over all rows); a committer thread waits for it
and stores every row under its new response id in one write, while the scheduler already decodes the next
batch. A failure reaches only the requests it concerns: a request whose history cannot be written fails alone,
a failed `generate` or store write fails its batch.

The queue is bounded (`QueueFullError` when full); `stop()` finishes the queued work and joins both threads.
Events reach a request through `Job.emit`, a callable the caller supplies (the server bridges it into its event
loop); they are, in order: ("token", id)*, ("answered", answer_ids, finish_reason), then ("committed",) once
the memory is stored (or at once when nothing is stored), or ("error", exception) at any point.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..cache_rxt import STMCache
from ..pipeline_rxt import write_history
from .store import STMStore

logger = logging.getLogger("transformers_rxt.serving")

__all__ = ["BatchScheduler", "Job", "QueueFullError", "Sampling"]


class QueueFullError(RuntimeError):
    """The request queue is full; the client should retry later (HTTP 503)."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings a batch shares (requests with other settings go into another batch); each request's
    answer length is its own (`Job.max_new_tokens`)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def generate_kwargs(self) -> dict:
        kwargs = {"do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kwargs


@dataclass
class Job:
    """One request: its prompt, the memory it starts from, what to write before answering, where to store after.

    `memory` is the stored `[1, L, S, D]` row of the conversation it continues, or None for a fresh memory (drawn
    from `seed` when given). `history` holds earlier interactions (token ids) written into it first. `store_as`
    is the response id to store the memory under after the interaction, or None to store nothing."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    emit: Callable[..., None]
    memory: Optional[torch.Tensor] = None
    seed: Optional[int] = None
    history: tuple = ()
    store_as: Optional[str] = None
    request_id: str = ""
    timings: dict = field(default_factory=dict)


class BatchScheduler:
    """The scheduler thread (decoding) and the committer thread (storing memories) of one server."""

    def __init__(self, model, store: STMStore, max_batch_size: int = 8, batch_wait_s: float = 0.005,
                 max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1 or batch_wait_s < 0:
            raise ValueError(f"max_batch_size={max_batch_size}, max_queue={max_queue}, batch_wait_s={batch_wait_s}: "
                             "the sizes must be >= 1 and the wait >= 0")
        self.model, self.store = model, store
        self.max_batch_size, self.batch_wait_s, self.max_queue = max_batch_size, batch_wait_s, max_queue
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._commits: "queue.Queue" = queue.Queue(maxsize=4)  # bounded: decoding waits if storing falls behind
        self.stats = {"batches": 0, "batched_requests": 0, "max_batch": 0, "generated_tokens": 0, "stored": 0}
        self._decoder = threading.Thread(target=self._decode_loop, name="rxt-serve-decode")
        self._committer = threading.Thread(target=self._commit_loop, name="rxt-serve-commit")
        self._decoder.start()
        self._committer.start()

    # ------------------------------------------------------------------ queue
    def submit(self, job: Job) -> None:
        """Queue a job; raises `QueueFullError` when `max_queue` jobs are waiting, RuntimeError after `stop()`."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are queued (--max-queue {self.max_queue}); "
                                     "retry shortly")
            job.timings["queued"] = time.perf_counter()
            self._pending.append(job)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def _next_batch(self) -> Optional[list[Job]]:
        """Block for a job, wait `batch_wait_s` for company, take up to `max_batch_size` with its settings."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._pending) < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            key = self._pending[0].sampling
            batch = [job for job in self._pending if job.sampling == key][:self.max_batch_size]
            for job in batch:
                self._pending.remove(job)
            return batch

    # ------------------------------------------------------------------ decoding
    def _decode_loop(self) -> None:
        with torch.inference_mode():
            while (batch := self._next_batch()) is not None:
                try:
                    self._run_batch(batch)
                except BaseException as error:  # noqa: BLE001 - reaches the batch's requests, the loop goes on
                    logger.exception("batch of %d failed", len(batch))
                    for job in batch:
                        job.emit("error", error)
        self._commits.put(None)

    def _start_memory(self, job: Job) -> STMCache:
        model = self.model
        if job.memory is None:
            generator = None if job.seed is None else torch.Generator(device=model.device).manual_seed(job.seed)
            stm = model.init_memory(1, generator=generator)
        else:
            stm = STMCache(job.memory.to(device=model.device), model.model_signature)
        return write_history(model, stm, job.history)

    def _run_batch(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        rows, ready = [], []
        for job in batch:
            job.timings["started"] = started
            try:
                rows.append(self._start_memory(job))
                ready.append(job)
            except Exception as error:  # noqa: BLE001 - this request's history was refused; the others go on
                job.emit("error", error)
        if not ready:
            return
        model = self.model
        stm = STMCache.cat(rows)
        width = max(len(job.prompt) for job in ready)
        pad = model.config.pad_token_id
        ids = torch.tensor([[pad] * (width - len(job.prompt)) + job.prompt for job in ready], device=model.device)
        mask = torch.tensor([[0] * (width - len(job.prompt)) + [1] * len(job.prompt) for job in ready],
                            device=model.device)
        stores = any(job.store_as for job in ready)
        ends = set(_eos_ids(model)) | {pad}
        budgets = [job.max_new_tokens for job in ready]
        streamer = _RowStreamer(ready, ends)
        output = model.generate(input_ids=ids, attention_mask=mask, stm=stm,
                                memory_update="async" if stores else "none", streamer=streamer, pad_token_id=pad,
                                max_new_tokens=max(budgets),
                                stopping_criteria=StoppingCriteriaList([_RowBudget(budgets, width)]),
                                **ready[0].sampling.generate_kwargs())
        decoded = time.perf_counter()
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(ready)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(ready))
        for row, job in enumerate(ready):
            answer = _answer(output[row, width:].tolist(), ends)
            finish = "length" if len(answer) >= job.max_new_tokens else "stop"
            self.stats["generated_tokens"] += len(answer)
            job.timings.update(decoded=decoded, batch_size=len(ready))
            job.emit("answered", answer, finish)
        if stores:
            self._commits.put((stm, ready))
        else:
            for job in ready:
                job.timings["committed"] = decoded
                job.emit("committed")

    # ------------------------------------------------------------------ storing
    def _commit_loop(self) -> None:
        while (item := self._commits.get()) is not None:
            stm, jobs = item
            try:
                memory = stm.memory  # waits for the batch's background memory update
                rows = [(job.store_as, memory[i:i + 1].clone()) for i, job in enumerate(jobs) if job.store_as]
                self.store.put_many(rows, self.model.model_signature)
                self.stats["stored"] += len(rows)
            except BaseException as error:  # noqa: BLE001 - the requests learn their memory was not stored
                logger.exception("storing the memories of %d requests failed", len(jobs))
                for job in jobs:
                    job.emit("error", error)
                continue
            committed = time.perf_counter()
            for job in jobs:
                job.timings["committed"] = committed
                job.emit("committed")

    def stop(self) -> None:
        """Finish what is queued, then end both threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._decoder.join()
        self._committer.join()


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _answer(generated: list[int], ends: set[int]) -> list[int]:
    """A row's answer: its tokens up to (without) the first EOS or pad id, the same cut as the model's
    `interactions_from_generation` makes for the memory update (generate fills finished rows with the pad id)."""
    for position, token in enumerate(generated):
        if token in ends:
            return generated[:position]
    return generated


class _RowBudget(StoppingCriteria):
    """Stop each row after its own number of new tokens (the batch runs to the largest)."""

    def __init__(self, budgets: list[int], prompt_width: int):
        self.budgets, self.prompt_width = torch.tensor(budgets), prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.prompt_width) >= self.budgets.to(input_ids.device)


class _RowStreamer:
    """A `generate` streamer that hands each row's new token to its job, until the row's EOS, pad or budget."""

    def __init__(self, jobs: list[Job], ends: set[int]):
        self.jobs, self.ends = jobs, ends
        self.sent = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.ends:
                self.done[row] = True
                continue
            self.jobs[row].emit("token", token)
            self.sent[row] += 1
            self.done[row] = self.sent[row] >= self.jobs[row].max_new_tokens

    def end(self) -> None:
        pass
