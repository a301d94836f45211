"""`rxt serve`: a stateful OpenAI-compatible server where each conversation lives on the server as its STM.

Needs the `serve` extra (FastAPI, uvicorn, redis): `pip install 'transformers-rxt[serve]'`. The store and the
scheduler import without it; `build_app` (in `.app`) needs FastAPI.
"""

from .store import ForeignMemoryError, RedisSTMStore, SQLiteSTMStore, STMStore, UnknownResponseError, open_store

__all__ = ["ForeignMemoryError", "RedisSTMStore", "SQLiteSTMStore", "STMStore", "UnknownResponseError", "open_store"]
