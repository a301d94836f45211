"""Where `rxt serve` keeps conversations: one STM row per stored response, keyed by the response id.

Two backends with one interface (`STMStore`):

* `SQLiteSTMStore` (default): an embedded database file in WAL mode, one row per response with the owning
  model's signature (fingerprint included), dtype, shape and the memory's bytes. Each `put` is one committed
  transaction with `synchronous=FULL`, so a row that was written survives the server being killed.
* `RedisSTMStore`: one hash per response in a Redis server that several replicas share.

A row holds the memory *after* the response's interaction was written into it: continuing the conversation
(`previous_response_id`) reads that row. Rows of another model are refused (`ForeignMemoryError`), never fed
to the model. Eviction: rows older than `max_age_s`, and beyond `max_count` the oldest rows, are deleted after
every write; a request for an evicted id gets the same clear error as an unknown one.

The memory is serialised with safetensors (`safetensors.torch.save`), as `STMCache.save` does for files; the
signature, dtype and shape are also kept as plain columns/fields so that a foreign row is refused without
decoding it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

__all__ = ["ForeignMemoryError", "RedisSTMStore", "SQLiteSTMStore", "STMStore", "StoredMemory",
           "UnknownResponseError", "open_store"]


class UnknownResponseError(LookupError):
    """No stored memory under this response id (never stored, `store=false`, or evicted)."""


class ForeignMemoryError(ValueError):
    """The stored memory belongs to another model (or dtype) than the one this server runs."""


@dataclass(frozen=True)
class StoredMemory:
    """One conversation's memory as stored: a `[1, layers, slots, dim]` CPU tensor and its owner."""

    response_id: str
    memory: torch.Tensor
    signature: dict
    created: float


def _encode(memory: torch.Tensor) -> bytes:
    return save_tensors({"memory": memory.detach().contiguous().cpu()})


def _decode(data: bytes) -> torch.Tensor:
    return load_tensors(data)["memory"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class STMStore(ABC):
    """The interface both backends implement. Thread-safe."""

    def __init__(self, max_age_s: Optional[float] = None, max_count: Optional[int] = None):
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s={max_age_s}: give a positive number of seconds, or None to keep rows forever")
        if max_count is not None and max_count < 1:
            raise ValueError(f"max_count={max_count}: give at least 1, or None for no limit")
        self.max_age_s, self.max_count = max_age_s, max_count

    def put_many(self, items: Sequence[tuple[str, torch.Tensor]], signature: dict) -> None:
        """Store each `(response_id, memory [1, L, S, D])` of one model in one write, then evict."""
        if not items:
            return
        now = time.time()
        rows = [(rid, now, signature, _dtype_name(memory.dtype), list(memory.shape), _encode(memory))
                for rid, memory in items]
        self._write(rows)
        self.evict(now)

    def get(self, response_id: str, signature: dict, dtype: torch.dtype) -> StoredMemory:
        """The memory stored under `response_id`, checked against the model that will read it.

        Raises `UnknownResponseError` (unknown or evicted) or `ForeignMemoryError` (another model or dtype)."""
        row = self._read(response_id)
        expired = row is not None and self.max_age_s is not None and row["created"] < time.time() - self.max_age_s
        if row is None or expired:
            raise UnknownResponseError(
                f"no stored conversation memory for response id {response_id!r}: it is unknown, was created with "
                "store=false, or was evicted (see the server's --max-age/--max-stored). Start a new conversation "
                "without previous_response_id.")
        stored_signature = json.loads(row["signature"])
        if stored_signature != signature:
            raise ForeignMemoryError(
                f"response {response_id!r} holds the memory of another model ({stored_signature}); this server "
                f"runs {signature}. Continue it on a server with that model, or start a new conversation.")
        if row["dtype"] != _dtype_name(dtype):
            raise ForeignMemoryError(
                f"response {response_id!r} holds a {row['dtype']} memory but this server runs the model in "
                f"{_dtype_name(dtype)}: serve the model with the dtype the conversation started with.")
        memory = _decode(row["data"])
        if list(memory.shape) != json.loads(row["shape"]):
            raise ForeignMemoryError(f"response {response_id!r}: the stored bytes do not match the stored shape "
                                     f"{row['shape']} (a corrupted row); start a new conversation")
        return StoredMemory(response_id, memory, stored_signature, row["created"])

    @abstractmethod
    def _write(self, rows: list[tuple]) -> None:
        """Write `(id, created, signature, dtype, shape, data)` rows atomically."""

    @abstractmethod
    def _read(self, response_id: str) -> Optional[dict]:
        """The row as a dict with keys created, signature (JSON), dtype, shape (JSON), data; None if absent."""

    @abstractmethod
    def evict(self, now: Optional[float] = None) -> int:
        """Delete rows older than `max_age_s` and the oldest beyond `max_count`; returns how many went."""

    @abstractmethod
    def count(self) -> int:
        """How many rows are stored."""

    def close(self) -> None:
        """Release the connection."""


class SQLiteSTMStore(STMStore):
    """The embedded default: a SQLite database file in WAL mode (several processes may share it on one host)."""

    SCHEMA = ("CREATE TABLE IF NOT EXISTS stm (response_id TEXT PRIMARY KEY, created REAL NOT NULL, "
              "fingerprint TEXT NOT NULL, signature TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL, "
              "data BLOB NOT NULL)", "CREATE INDEX IF NOT EXISTS stm_created ON stm (created)")

    def __init__(self, path: str | Path, max_age_s: Optional[float] = None, max_count: Optional[int] = None):
        super().__init__(max_age_s, max_count)
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"the STM store's directory {self.path.parent} does not exist: create it or pass "
                             "another --store path")
        # One connection shared by the server's threads, behind a lock (sqlite3 objects are not thread-safe).
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives a killed process (and power loss)
        for statement in self.SCHEMA:
            self._db.execute(statement)

    def _write(self, rows: list[tuple]) -> None:
        values = [(rid, created, signature["fingerprint"], json.dumps(signature, sort_keys=True), dtype,
                   json.dumps(shape), data) for rid, created, signature, dtype, shape, data in rows]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO stm VALUES (?, ?, ?, ?, ?, ?, ?)", values)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, response_id: str) -> Optional[dict]:
        with self._lock:
            row = self._db.execute("SELECT created, signature, dtype, shape, data FROM stm WHERE response_id = ?",
                                   (response_id,)).fetchone()
        return None if row is None else dict(zip(("created", "signature", "dtype", "shape", "data"), row))

    def evict(self, now: Optional[float] = None) -> int:
        now = time.time() if now is None else now
        removed = 0
        with self._lock:
            if self.max_age_s is not None:
                removed += self._db.execute("DELETE FROM stm WHERE created < ?", (now - self.max_age_s,)).rowcount
            if self.max_count is not None:
                removed += self._db.execute(
                    "DELETE FROM stm WHERE response_id IN (SELECT response_id FROM stm ORDER BY created DESC, "
                    "rowid DESC LIMIT -1 OFFSET ?)", (self.max_count,)).rowcount
        return removed

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM stm").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisSTMStore(STMStore):
    """A Redis server shared by several replicas: one hash per response, a sorted set of ids by creation time."""

    def __init__(self, url: str, max_age_s: Optional[float] = None, max_count: Optional[int] = None,
                 prefix: str = "rxt:stm:"):
        super().__init__(max_age_s, max_count)
        try:
            import redis
        except ImportError as error:
            raise ImportError("a redis:// store needs the redis client: pip install 'transformers-rxt[serve]'") \
                from error
        self.prefix, self._index = prefix, f"{prefix}index"
        self._redis = redis.Redis.from_url(url)
        try:
            self._redis.ping()
        except redis.RedisError as error:
            raise ValueError(f"cannot reach the Redis store at {url}: {error}. Start redis-server or fix --store")\
                from error

    def _write(self, rows: list[tuple]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for rid, created, signature, dtype, shape, data in rows:
            key = self.prefix + rid
            pipe.hset(key, mapping={"created": repr(created), "fingerprint": signature["fingerprint"],
                                    "signature": json.dumps(signature, sort_keys=True), "dtype": dtype,
                                    "shape": json.dumps(shape), "data": data})
            if self.max_age_s is not None:
                pipe.expire(key, max(int(self.max_age_s + 0.999), 1))  # Redis drops the row itself when it expires
            pipe.zadd(self._index, {rid: created})
        pipe.execute()

    def _read(self, response_id: str) -> Optional[dict]:
        row = self._redis.hgetall(self.prefix + response_id)
        if not row:
            return None
        return {"created": float(row[b"created"]), "signature": row[b"signature"].decode(),
                "dtype": row[b"dtype"].decode(), "shape": row[b"shape"].decode(), "data": row[b"data"]}

    def evict(self, now: Optional[float] = None) -> int:
        now = time.time() if now is None else now
        gone: list[bytes] = []
        if self.max_age_s is not None:
            gone += self._redis.zrangebyscore(self._index, "-inf", now - self.max_age_s)
        if self.max_count is not None:
            excess = self._redis.zcard(self._index) - self.max_count
            if excess > 0:
                gone += [rid for rid, _ in self._redis.zpopmin(self._index, excess)]
        if gone:
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self._index, *gone)
            pipe.delete(*[self.prefix + rid.decode() for rid in gone])
            pipe.execute()
        return len(set(gone))

    def count(self) -> int:
        return int(self._redis.zcard(self._index))

    def close(self) -> None:
        self._redis.close()


def open_store(url: str, max_age_s: Optional[float] = None, max_count: Optional[int] = None) -> STMStore:
    """`sqlite:///path/to/file.db` (or a plain path) or `redis://host:port/db`."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisSTMStore(url, max_age_s, max_count)
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"--store {url!r}: write a SQLite store as sqlite:///relative/path.db or "
                             "sqlite:////absolute/path.db")
        return SQLiteSTMStore(path, max_age_s, max_count)
    if parsed.scheme:
        raise ValueError(f"--store {url!r}: unknown scheme {parsed.scheme!r}; use sqlite:///FILE or redis://HOST:PORT/DB")
    return SQLiteSTMStore(url, max_age_s, max_count)
