"""Conversation state of a Reactive Transformer: the Short-Term Memory (STM).

The model holds no state. One `STMCache` holds the memory of one conversation (or of a batch of
conversations, one row each), laid out batch-first as `[batch, layers, slots, dim]` so that
`generate()` can expand it along dim 0 for beams and `num_return_sequences`.

A memory update may run in the background (see `RxTForConversationalGeneration.generate`). Every read of
`memory`, and the next `generate`, waits for it; a failed update is re-raised on the next read instead of
leaving a half-written or stale memory in place.

This file is copied next to the weights by `save_pretrained` (remote code): stdlib, torch and
safetensors only.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

STM_FORMAT_VERSION = 1


class MemoryUpdateError(RuntimeError):
    """A background memory update failed; the conversation's memory is no longer valid."""


class STMCache:
    """Short-Term Memory of one or more conversations.

    Args:
        memory (`torch.Tensor`): `[batch, layers, slots, dim]`.
        model_signature (`dict`, *optional*): the geometry of the model that produced it (layers, slots, dim,
            model type). Set by `init_memory`; checked by the model and by `load` so that a memory is never
            fed to a model it does not belong to.
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
        self._pending: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._done.set()
        self._error: Optional[BaseException] = None

    # ------------------------------------------------------------------ background updates
    def wait(self) -> "STMCache":
        """Block until a pending memory update has finished; re-raise its error if it failed."""
        self._done.wait()
        if self._error is not None:
            raise MemoryUpdateError(
                "the last memory update of this STMCache failed, so its memory is stale; "
                "restore a saved state or call `reset()` before continuing the conversation"
            ) from self._error
        return self

    @property
    def update_pending(self) -> bool:
        return not self._done.is_set()

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
        """Replace the memory with `compute(current_memory)`, now or on a background thread.

        Only one update can be pending: a new one first waits for the previous one (unless this call
        completes a `reserve()`).
        """
        if not reserved:
            self.reserve()
        if not background:
            try:
                self._set(compute(self._memory))
            except BaseException as error:
                self._error = error
                raise
            finally:
                self._done.set()
            return

        def work() -> None:
            try:
                self._set(compute(self._memory))
            except BaseException as error:  # noqa: BLE001 - re-raised on the caller's next read
                self._error = error
            finally:
                self._done.set()

        self._pending = threading.Thread(target=work, name="rxt-memory-update", daemon=True)
        self._pending.start()

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

    def select(self, rows: Union[int, Sequence[int], torch.Tensor]) -> "STMCache":
        """A new cache with the given conversations (rows), e.g. to drop finished conversations from a batch."""
        index = torch.as_tensor([rows] if isinstance(rows, int) else rows, dtype=torch.long, device=self.device)
        if index.numel() and (index.min() < -self.batch_size or index.max() >= self.batch_size):
            raise IndexError(f"row index out of range for an STMCache of batch {self.batch_size}: {index.tolist()}")
        return self._like(self.memory.index_select(0, index % max(self.batch_size, 1)).clone())

    def __getitem__(self, rows) -> "STMCache":
        if isinstance(rows, slice):
            rows = list(range(self.batch_size))[rows]
        return self.select(rows)

    @classmethod
    def cat(cls, caches: Iterable["STMCache"]) -> "STMCache":
        """Concatenate conversations from several caches of the same model into one batch."""
        caches = list(caches)
        if not caches:
            raise ValueError("STMCache.cat needs at least one cache")
        first = caches[0]
        for other in caches[1:]:
            if other.shape[1:] != first.shape[1:] or other.model_signature != first.model_signature:
                raise ValueError(
                    f"cannot concatenate STM caches of different models: {tuple(first.shape[1:])} "
                    f"{first.model_signature} vs {tuple(other.shape[1:])} {other.model_signature}"
                )
        return cls(torch.cat([c.memory for c in caches], dim=0), first.model_signature)

    def reset(self, rows: Optional[Union[int, Sequence[int]]] = None, init_type: str = "standard",
              generator: Optional[torch.Generator] = None) -> "STMCache":
        """Re-initialise all rows (or the given rows) in place, e.g. when a conversation ends; clears a failed update."""
        self._done.wait()
        self._error = None
        fresh = init_memory_tensor(self._memory.shape, init_type, dtype=self._memory.dtype,
                                   device=self._memory.device, generator=generator)
        if rows is None:
            self._memory.copy_(fresh)
        else:
            index = torch.as_tensor([rows] if isinstance(rows, int) else rows, device=self.device)
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
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "rxt-stm" or "memory" not in handle.keys():
                raise ValueError(f"{path} is not an STMCache file (saved with STMCache.save)")
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
