"""Conversation state of a Reactive Transformer: the Short-Term Memory (STM).

The model holds no state. One `STMCache` holds the memory of one conversation (or of a batch of
conversations, one row each), laid out batch-first as `[batch, layers, slots, dim]` so that
`generate()` can expand it along dim 0 for beams and `num_return_sequences`.

A memory update may run in the background (see `RxTForConversationalGeneration.generate`). Every read of
`memory`, and the next `generate`, waits for it; a failed update is re-raised on the next read instead of
leaving a half-written or stale memory in place. On CPU the update runs on one long-lived worker thread per
process (a `ThreadPoolExecutor`, whose exit hook lets a pending update finish and then stops the worker, so the
interpreter exits cleanly); on CUDA it is queued on a side stream from the caller's thread.

This file is copied next to the weights by `save_pretrained` (remote code): stdlib, torch and
safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

# 2: the model signature carries the owning model's config fingerprint.
STM_FORMAT_VERSION = 2


class MemoryUpdateError(RuntimeError):
    """A background memory update failed; the conversation's memory is no longer valid."""


class TorchThreadContext:
    """The calling thread's torch settings, to be re-entered on a worker thread.

    Grad mode, inference mode and autocast are thread-local in torch, so a new thread starts without them
    (and would compute an update that differs from the synchronous one); the intra-op thread count is
    carried too, so that background work uses what the caller chose.
    """

    AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")

    def __init__(self):
        self.grad_enabled = torch.is_grad_enabled()
        self.inference_mode = torch.is_inference_mode_enabled()
        self.num_threads = torch.get_num_threads()
        self.autocast = {device_type: torch.get_autocast_dtype(device_type)
                         for device_type in self.AUTOCAST_DEVICE_TYPES if torch.is_autocast_enabled(device_type)}
        self.autocast_cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run the body with the captured settings (meant for a fresh worker thread)."""
        torch.set_num_threads(self.num_threads)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(self.inference_mode))
            stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            for device_type, dtype in self.autocast.items():
                stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=self.autocast_cache))
            yield


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start `target` on a non-daemon thread that runs in the caller's torch context.

    Non-daemon: the interpreter joins it before it finalises. A daemon thread would be stopped inside a
    torch op at exit, which aborts the process ("terminate called without an active exception").
    """
    context = TorchThreadContext()

    def run() -> None:
        with context.applied():
            target()

    thread = threading.Thread(target=run, name=name, daemon=False)
    thread.start()
    return thread


# The background updates' worker: one thread per process, started on first use and reused, because a fresh
# thread per update costs more than the update saves (a new thread also starts with cold allocator arenas).
_update_executor: Optional[ThreadPoolExecutor] = None
_update_executor_lock = threading.Lock()
UPDATE_THREAD_NAME = "rxt-memory-update"


def _forget_update_executor() -> None:
    """In a forked child: the parent's executor object is copied, its thread is not; start afresh on first use."""
    global _update_executor, _update_executor_lock
    _update_executor, _update_executor_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_update_executor)


def submit_update(target: Callable[[], None]) -> Future:
    """Run `target` on the process's memory-update worker, in the caller's torch context.

    Updates from all caches queue on that one worker, in submission order. Raises `RuntimeError` once the
    interpreter is shutting down (no new work is accepted then): the caller runs the update itself.
    """
    global _update_executor
    context = TorchThreadContext()

    def run() -> None:
        with context.applied():
            target()

    with _update_executor_lock:
        if _update_executor is None:
            _update_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=UPDATE_THREAD_NAME)
        return _update_executor.submit(run)


class STMCache:
    """Short-Term Memory of one or more conversations.

    Args:
        memory (`torch.Tensor`): `[batch, layers, slots, dim]`.
        model_signature (`dict`, *optional*): the model that owns it: geometry (layers, slots, dim, model
            type) and a fingerprint of its architecture config. Set by `init_memory`; checked by the model,
            by `load(model=)` and by `cat`, so that a memory is never fed to a model it does not belong to.
            A cache created bare, `STMCache(memory)`, has no owner yet: the first model that uses it
            accepts it (after checking its shape) and binds it to itself.
    """

    def __init__(self, memory: torch.Tensor, model_signature: Optional[dict] = None):
        if not isinstance(memory, torch.Tensor) or memory.dim() != 4:
            shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
            raise ValueError(
                f"STMCache expects a tensor [batch, layers, slots, dim], got {shape}. A reference (rxlm) STM is "
                "layer-first [layers, batch, slots, dim]: pass `memory.transpose(0, 1)`."
            )
        self._memory = memory
        self.model_signature = dict(model_signature) if model_signature else None
        self._lock = threading.Lock()
        self._done = threading.Event()  # cleared while an update is reserved or running on the host
        self._done.set()
        self._event: Optional["torch.cuda.Event"] = None  # a side-stream update still running on the GPU
        self._in_flight: Optional[Callable] = None  # keeps that update's inputs alive until it has run
        self._error: Optional[BaseException] = None

    # ------------------------------------------------------------------ background updates
    def _settle(self) -> None:
        """Block until no update is pending (host thread or GPU side stream), without raising."""
        self._done.wait()
        event = self._event
        if event is not None:
            event.synchronize()
            self._event = self._in_flight = None

    def wait(self) -> "STMCache":
        """Block until a pending memory update has finished; re-raise its error if it failed."""
        self._settle()
        if self._error is not None:
            raise MemoryUpdateError(
                "the last memory update of this STMCache failed, so its memory is stale; "
                "restore a saved state or call `reset()` before continuing the conversation"
            ) from self._error
        return self

    @property
    def update_pending(self) -> bool:
        event = self._event
        return not self._done.is_set() or (event is not None and not event.query())

    def reserve(self) -> None:
        """Mark an update as pending before it can be computed (e.g. while the answer is being generated).

        Reads of `memory` then wait until `run_update(..., reserved=True)` or `release()` finishes it, so a
        caller can never observe the memory from before an interaction whose update is on its way.
        """
        with self._lock:
            self.wait()
            self._done.clear()

    def release(self) -> None:
        """Cancel a reservation without changing the memory (the interaction did not complete)."""
        self._done.set()

    def run_update(self, compute: Callable[[torch.Tensor], torch.Tensor], background: bool = False,
                   reserved: bool = False) -> None:
        """Replace the memory with `compute(current_memory)`, now or in the background.

        In the background, a CUDA memory is updated on a side stream queued from this thread (`wait()`
        synchronises with it); any other memory on the process's update worker (`submit_update`), in this
        thread's torch context (autocast, inference and grad mode, thread count). Its error is re-raised by the next
        `wait()` or read. Only one update can be pending: a new one first waits for the previous one
        (unless this call completes a `reserve()`).
        """
        if not reserved:
            self.reserve()
        if background and self._memory.is_cuda:
            self._finish(lambda: self._queue_on_side_stream(compute))
        elif background:
            try:
                submit_update(lambda: self._finish(lambda: self._set(compute(self._memory)), reraise=False))
            except RuntimeError:  # no worker (the interpreter is shutting down): finish it here
                self._finish(lambda: self._set(compute(self._memory)))
        else:
            self._finish(lambda: self._set(compute(self._memory)))

    def _finish(self, update: Callable[[], None], reraise: bool = True) -> None:
        """Run `update`, record its failure on the cache, and end the pending state."""
        try:
            update()
        except BaseException as error:  # noqa: BLE001 - kept for the next wait(); re-raised here when asked
            self._error = error
            if reraise:
                raise
        finally:
            self._done.set()

    def _queue_on_side_stream(self, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        device = self._memory.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the answer's kernels come first
        with torch.cuda.stream(stream):
            self._set(compute(self._memory))
            self._event = stream.record_event()
        # The caller may drop the interaction tensors at once; holding `compute` (and with it them) until the
        # event has passed keeps the allocator from handing their memory to other kernels meanwhile.
        self._in_flight = compute

    def _set(self, new_memory: torch.Tensor) -> None:
        if new_memory.shape != self._memory.shape:
            raise ValueError(f"memory update changed the STM shape {tuple(self._memory.shape)} -> {tuple(new_memory.shape)}")
        # In place, so that views the caller holds (and CUDA graphs) see the new state.
        self._memory.copy_(new_memory)

    # ------------------------------------------------------------------ tensor access
    @property
    def memory(self) -> torch.Tensor:
        """The memory tensor `[batch, layers, slots, dim]` (waits for a pending update)."""
        self.wait()
        return self._memory

    @memory.setter
    def memory(self, value: torch.Tensor) -> None:
        self.wait()
        if value.shape != self._memory.shape:
            raise ValueError(f"new memory shape {tuple(value.shape)} differs from the STM shape {tuple(self._memory.shape)}")
        self._memory = value

    @property
    def shape(self) -> torch.Size:
        return self._memory.shape

    @property
    def batch_size(self) -> int:
        return self._memory.shape[0]

    @property
    def num_layers(self) -> int:
        return self._memory.shape[1]

    @property
    def num_slots(self) -> int:
        return self._memory.shape[2]

    @property
    def dim(self) -> int:
        return self._memory.shape[3]

    @property
    def device(self) -> torch.device:
        return self._memory.device

    @property
    def dtype(self) -> torch.dtype:
        return self._memory.dtype

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        state = "update pending" if self.update_pending else "ready"
        return (f"STMCache(batch={self.batch_size}, layers={self.num_layers}, slots={self.num_slots}, "
                f"dim={self.dim}, dtype={self.dtype}, device={self.device}, {state})")

    # ------------------------------------------------------------------ copies and moves
    def _like(self, memory: torch.Tensor) -> "STMCache":
        return STMCache(memory, self.model_signature)

    def to(self, *args, **kwargs) -> "STMCache":
        """Move/cast like `Tensor.to`; returns a new `STMCache` (or self if nothing changes)."""
        moved = self.memory.to(*args, **kwargs)
        return self if moved is self._memory else self._like(moved)

    def clone(self) -> "STMCache":
        return self._like(self.memory.clone())

    def detach(self) -> "STMCache":
        """A cache sharing storage but cut from the autograd graph (e.g. between training turns)."""
        return self._like(self.memory.detach())

    def _row_index(self, rows) -> torch.Tensor:
        """`rows` as a long index: an int, a sequence or tensor of ints, or a boolean mask of length batch."""
        if isinstance(rows, bool):
            raise TypeError(f"a single bool ({rows}) is not a row index: pass a boolean mask with one entry per row "
                            f"({self.batch_size}) or integer row indices")
        index = torch.as_tensor([rows] if isinstance(rows, int) else rows, device=self.device)
        if index.numel() == 0:
            return index.to(torch.long).reshape(0)
        if index.dtype == torch.bool:
            if index.shape != (self.batch_size,):
                raise IndexError(f"a boolean row mask needs one entry per conversation: got shape {tuple(index.shape)} "
                                 f"for an STMCache of batch {self.batch_size}")
            return index.nonzero().reshape(-1)
        if index.is_floating_point() or index.is_complex() or index.dim() > 1:
            raise TypeError(f"rows must be integer indices or a boolean mask, got a {index.dtype} tensor of shape "
                            f"{tuple(index.shape)}: convert it with .long() (or .bool() for a mask) if that is meant")
        index = index.to(torch.long).reshape(-1)
        if index.min() < -self.batch_size or index.max() >= self.batch_size:
            raise IndexError(f"row index out of range for an STMCache of batch {self.batch_size}: {index.tolist()}")
        return index % self.batch_size

    def select(self, rows: Union[int, Sequence[int], Sequence[bool], torch.Tensor]) -> "STMCache":
        """A new cache with the given conversations (rows), e.g. `stm.select(~finished)` to drop finished ones.

        `rows` is an int, integer indices (a sequence or tensor), or a boolean mask with one entry per row.
        """
        return self._like(self.memory.index_select(0, self._row_index(rows)).clone())

    def __getitem__(self, rows) -> "STMCache":
        if isinstance(rows, slice):
            rows = list(range(self.batch_size))[rows]
        return self.select(rows)

    @classmethod
    def cat(cls, caches: Iterable["STMCache"]) -> "STMCache":
        """Concatenate conversations from several caches of the same model into one batch.

        Caches bound to different models (see `model_signature`) are refused; unbound caches join any.
        """
        caches = list(caches)
        if not caches:
            raise ValueError("STMCache.cat needs at least one cache")
        geometry = caches[0].shape[1:]
        owners = [c.model_signature for c in caches if c.model_signature]
        for other in caches:
            if other.shape[1:] != geometry or (other.model_signature and other.model_signature != owners[0]):
                raise ValueError(
                    f"cannot concatenate STM caches of different models: {tuple(geometry)} {owners[0] if owners else None} "
                    f"vs {tuple(other.shape[1:])} {other.model_signature}"
                )
        return cls(torch.cat([c.memory for c in caches], dim=0), owners[0] if owners else None)

    def reset(self, rows: Optional[Union[int, Sequence[int], Sequence[bool], torch.Tensor]] = None,
              init_type: str = "standard", generator: Optional[torch.Generator] = None) -> "STMCache":
        """Re-initialise all rows (or the given rows, as for `select`) in place, e.g. when a conversation ends;
        clears a failed update."""
        self._settle()
        self._error = None
        fresh = init_memory_tensor(self._memory.shape, init_type, dtype=self._memory.dtype,
                                   device=self._memory.device, generator=generator)
        if rows is None:
            self._memory.copy_(fresh)
        else:
            index = self._row_index(rows)
            self._memory[index] = fresh[index]
        return self

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, Path]) -> None:
        """Save to a safetensors file, with the model signature so that `load` can refuse a mismatched model."""
        from safetensors.torch import save_file

        metadata = {"format": "rxt-stm", "version": str(STM_FORMAT_VERSION),
                    "model_signature": json.dumps(self.model_signature or {}, sort_keys=True)}
        save_file({"memory": self.memory.detach().contiguous().cpu()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: Union[str, Path], model=None, device=None) -> "STMCache":
        """Load a cache saved with `save`. With `model`, check that it belongs to that model and move it there."""
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except SafetensorError as error:
            raise ValueError(f"{path} is not an STMCache file (saved with STMCache.save): {error}") from error
        with handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "rxt-stm" or "memory" not in handle.keys():
                raise ValueError(f"{path} is not an STMCache file (saved with STMCache.save)")
            version = metadata.get("version")
            if version != str(STM_FORMAT_VERSION):
                raise ValueError(
                    f"{path} is an STMCache file of format version {version!r}; this transformers-rxt reads version "
                    f"{STM_FORMAT_VERSION} only. Save it again with this version, or, if you know which model it "
                    "belongs to, wrap its tensor yourself: STMCache(safetensors.torch.load_file(path)['memory'])."
                )
            memory = handle.get_tensor("memory")
        signature = json.loads(metadata.get("model_signature") or "{}") or None
        cache = cls(memory, signature)
        if model is not None:
            model.check_stm(cache)
            cache = cache.to(device=model.device if device is None else device, dtype=model.dtype)
        elif device is not None:
            cache = cache.to(device)
        return cache


def init_memory_tensor(shape, init_type: str = "standard", dtype=torch.float32, device=None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh memory tensor, initialised like the reference's STM init types."""
    if init_type == "standard":
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    if init_type == "normal":
        return torch.randn(shape, dtype=dtype, device=device, generator=generator) * 0.02
    if init_type == "uniform":
        return torch.rand(shape, dtype=dtype, device=device, generator=generator) * 0.02
    if init_type == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if init_type == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    raise ValueError(f"unknown STM init type {init_type!r}; expected standard, normal, uniform, ones or zeros")
