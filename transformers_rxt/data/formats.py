"""Dataset formats of the reference (rxlm) and their conversion to token ids.

Record formats (training.md §2.4, §3.5), all loadable from local json/jsonl/parquet/csv/txt files, a directory
of them, a ``save_to_disk`` folder, or a Hub id (through ``datasets.load_dataset``):

- **pre-training text** (stage 1): ``{"text": "..."}``.
- **SFT interactions** (stage 2): ``{"query": "...", "answer": "..."}``; RxT-Beta adds optional ``think``,
  ``tool_call``, ``tool_use`` (replaces ``query``) and ``internal``. Also accepted, and converted to those
  fields: the *combined* form, one text column holding ``[BOS][Q]query[A]answer[EOS]`` (markers, BOS/EOS
  optional), and chat ``messages`` lists (each user/assistant exchange becomes one record).
- **MRL curriculum episodes** (stages 3-5): ``{"query", "answer", "interactions": [{"query", "answer"},
  ...]}``; the reference's hybrid (Beta) SMAT form ``{"interactions": [...], "system"?: "..."}`` whose first
  element is the first interaction; or chat ``messages``. Extra columns (e.g. the synthetic corpus's
  ``probes``) are kept.

``tokenize_*_dataset`` turn normalised datasets into ids with :mod:`transformers_rxt.tokenization_rxt`
(markers concatenated as ids, no spaces around them; over-long rows raise unless ``truncation=True``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..extras import require_extra
from ..tokenization_rxt import (
    BOS_TOKEN,
    EOS_TOKEN,
    SYSTEM_PROMPT_TITLE,
    InputTooLongError,
    messages_to_interactions,
    parse_interaction_text,
    tokenize_interaction_records,
    tokenize_system_prompt,
)

__all__ = [
    "DataFormatError",
    "INTERACTION_FIELDS",
    "load_rxt_dataset",
    "load_pretraining_dataset",
    "load_sft_dataset",
    "load_mrl_dataset",
    "normalize_sft_dataset",
    "normalize_mrl_dataset",
    "episode_turns",
    "tokenize_pretraining_dataset",
    "tokenize_sft_dataset",
    "tokenize_mrl_dataset",
]

#: Fields of one interaction record (Alpha uses query/answer; RxT-Beta adds the other four).
INTERACTION_FIELDS: tuple[str, ...] = ("query", "answer", "think", "tool_call", "tool_use", "internal")
_BETA_FIELDS = ("think", "tool_call", "tool_use", "internal")

_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}



class DataFormatError(ValueError):
    """Training data that cannot be trained on as it is: the message names the file (or dataset), the 1-based
    row and what to change. Raised while loading or tokenizing, before any training step."""


# ------------------------------------------------------------------------------------------------------------
# Checks: bad records are refused up front, never trained on as something else
# ------------------------------------------------------------------------------------------------------------


def _check_json_file(path: Path) -> None:
    """Parse a local .json/.jsonl file before ``datasets`` does, so that a broken row is reported with the file
    and its 1-based row and line (pyarrow reports a 0-based row inside a traceback)."""
    import json

    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):  # one JSON array of records
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}, line {error.lineno}: not valid JSON ({error.msg} at column "
                                  f"{error.colno}); fix the file") from None
        for row, record in enumerate(rows, start=1):
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}, row {row}: expected a JSON object (a record), got "
                                      f"{type(record).__name__}; fix the row or remove it")
        return
    row = 0
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}, row {row} (line {line_number}): not valid JSON ({error.msg} at column "
                                  f"{error.colno}); fix the line or remove it") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}, row {row} (line {line_number}): expected a JSON object (a record), "
                                  f"got {type(record).__name__}; fix the line or remove it")


def _filled(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _interaction_problem(turn: Any) -> str | None:
    """What makes one interaction untrainable (None when it is fine): it needs a query (or RxT-Beta tool
    result) and an answer (or tool call); a missing answer would train on ``[BOS][Q]query[EOS]``."""
    if not isinstance(turn, Mapping):
        return f"expected an interaction object with 'query' and 'answer', got {type(turn).__name__}"
    if not (_filled(turn.get("query")) or _filled(turn.get("tool_use"))):
        return "has no query" if turn.get("query") is None else "has an empty query"
    if not (_filled(turn.get("answer")) or _filled(turn.get("tool_call"))):
        return "has no answer" if turn.get("answer") is None else "has an empty answer"
    return None


def _record_problem(record: Mapping[str, Any], episode: bool) -> str | None:
    """What makes a normalised SFT record (``episode=False``) or MRL episode untrainable, or None."""
    if not episode:
        return _interaction_problem(record)
    if record.get("interactions") is None:
        return ("has no 'interactions' list (an MRL episode is {query, answer, interactions: [{query, answer}, "
                "...]}; use [] for an episode of one interaction)")
    turns = [record, *record["interactions"]]
    for number, turn in enumerate(turns):
        problem = _interaction_problem(turn)
        if problem:
            where = "the first interaction" if number == 0 else f"interactions[{number - 1}]"
            return f"{where} {problem}"
    return None


def _raise_for_record(problem: str, where: str, episode: bool) -> None:
    kind = "episode" if episode else "record"
    raise DataFormatError(f"{where}: the {kind} {problem}. Every interaction needs a non-empty query and answer: "
                          f"fill it in or remove the row")


def _check_records(ds: Any, source: str, episode: bool) -> None:
    """Refuse a loaded (normalised) dataset with an untrainable row, naming ``source`` and the 1-based row.
    Streaming datasets are checked while they are tokenized instead (reading them here would load them)."""
    datasets = require_extra("datasets")

    if not isinstance(ds, datasets.Dataset):
        return
    columns = [c for c in (*INTERACTION_FIELDS, "interactions") if c in ds.column_names]
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            problem = _record_problem(dict(zip(columns, values)), episode)
            if problem:
                _raise_for_record(problem, f"{source}, row {row}", episode)


def _check_batch(batch: Mapping[str, list], indices: Sequence[int], episode: bool) -> None:
    """The tokenizers' check (data built in memory, or streamed): the row is the dataset's, 1-based."""
    keys = list(batch)
    for index, values in zip(indices, zip(*(batch[k] for k in keys))):
        problem = _record_problem(dict(zip(keys, values)), episode)
        if problem:
            _raise_for_record(problem, f"row {index + 1} of the dataset", episode)


def _source_name(path_or_id: str | os.PathLike, split: str | None) -> str:
    path = Path(os.fspath(path_or_id))
    return str(path) if path.exists() else f"{os.fspath(path_or_id)} (split {split!r})"


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------


def load_rxt_dataset(
    path_or_id: str | os.PathLike,
    *,
    split: str | None = "train",
    subset: str | None = None,
    data_files: Any = None,
    streaming: bool = False,
    **load_kwargs: Any,
):
    """Load records from a local file/folder or the Hub.

    - a file (``.json``, ``.jsonl``, ``.parquet``, ``.csv``, ``.txt``): loaded with the matching ``datasets``
      builder; its rows form the ``train`` split;
    - a folder written by ``Dataset.save_to_disk``: ``datasets.load_from_disk`` (then ``split`` selects from a
      ``DatasetDict``);
    - another folder, or a Hub id: ``datasets.load_dataset(path_or_id, subset, ...)`` (folders with
      ``train/``/``test/`` sub-folders or ``*-train.parquet`` names get their splits).

    ``split=None`` returns the whole ``DatasetDict``. ``streaming=True`` gives an ``IterableDataset``. Extra
    ``load_kwargs`` go to ``load_dataset`` (e.g. ``revision``, ``token``, ``cache_dir``).
    """
    datasets = require_extra("datasets")

    path = Path(os.fspath(path_or_id))
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"don't know how to read {path.name}: use a .json, .jsonl, .parquet, .csv or .txt file"
            )
        if builder == "json":
            _check_json_file(path)
        return datasets.load_dataset(
            builder, data_files={"train": str(path)}, split=split, streaming=streaming, **load_kwargs
        )
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict) and split is not None:
            if split not in ds:
                raise ValueError(f"{path} has no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming and isinstance(ds, datasets.Dataset) else ds
    name = str(path) if path.is_dir() else os.fspath(path_or_id)
    return datasets.load_dataset(
        name, subset, data_files=data_files, split=split, streaming=streaming, **load_kwargs
    )


def load_pretraining_dataset(
    path_or_id: str | os.PathLike,
    *,
    text_column: str = "text",
    split: str | None = "train",
    subset: str | None = None,
    streaming: bool = False,
    **load_kwargs: Any,
):
    """Pre-training text (``{"text": ...}`` records) with the text column renamed to ``text``."""
    ds = load_rxt_dataset(path_or_id, split=split, subset=subset, streaming=streaming, **load_kwargs)
    columns = _columns(ds)
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"no text column {text_column!r} in the data (columns: {columns}); pass text_column="
        )
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds


def load_sft_dataset(
    path_or_id: str | os.PathLike,
    *,
    query_field: str = "query",
    answer_field: str = "answer",
    text_field: str | None = None,
    messages_field: str = "messages",
    split: str | None = "train",
    subset: str | None = None,
    streaming: bool = False,
    **load_kwargs: Any,
):
    """SFT interactions, normalised to ``query``/``answer`` (+ Beta fields); see
    :func:`normalize_sft_dataset`.
    """
    ds = load_rxt_dataset(path_or_id, split=split, subset=subset, streaming=streaming, **load_kwargs)
    if messages_field in (_columns(ds) or []) and query_field not in (_columns(ds) or []):
        _check_conversations(ds, messages_field, _source_name(path_or_id, split))
    ds = normalize_sft_dataset(
        ds,
        query_field=query_field,
        answer_field=answer_field,
        text_field=text_field,
        messages_field=messages_field,
    )
    _check_records(ds, _source_name(path_or_id, split), episode=False)
    return ds


def _check_conversations(ds: Any, messages_field: str, source: str) -> None:
    """Chat conversations become several SFT rows, so they are checked (per conversation) before that."""
    datasets = require_extra("datasets")

    if not isinstance(ds, datasets.Dataset):
        return
    for row, messages in enumerate(ds[messages_field], start=1):
        for turn in messages_to_interactions(messages)[1]:
            problem = _interaction_problem(turn)
            if problem:
                raise DataFormatError(f"{source}, row {row}: an interaction of the conversation {problem} (a user "
                                      "message with no assistant reply, or an empty one): fill it in or remove "
                                      "the row")


def load_mrl_dataset(
    path_or_id: str | os.PathLike,
    *,
    subset: str | None = None,
    split: str | None = "train",
    query_field: str = "query",
    answer_field: str = "answer",
    interactions_field: str = "interactions",
    messages_field: str = "messages",
    streaming: bool = False,
    **load_kwargs: Any,
):
    """MRL curriculum episodes, normalised to ``query``/``answer``/``interactions`` (see
    :func:`normalize_mrl_dataset`). On the Hub the reference keeps one ``subset`` per curriculum stage."""
    ds = load_rxt_dataset(path_or_id, split=split, subset=subset, streaming=streaming, **load_kwargs)
    ds = normalize_mrl_dataset(
        ds,
        query_field=query_field,
        answer_field=answer_field,
        interactions_field=interactions_field,
        messages_field=messages_field,
    )
    _check_records(ds, _source_name(path_or_id, split), episode=True)
    return ds


# ------------------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------------------


def _columns(ds: Any) -> list[str] | None:
    cols = getattr(ds, "column_names", None)
    if isinstance(cols, dict):  # DatasetDict
        cols = next(iter(cols.values()), None)
    if cols is None and hasattr(ds, "take"):
        # A streaming dataset whose features are unknown until read: peek at the first row.
        first = next(iter(ds.take(1)), None)
        cols = list(first) if first is not None else None
    return list(cols) if cols is not None else None


def _map_splits(ds: Any, fn):
    """Apply ``fn`` to a Dataset/IterableDataset, or to every split of a DatasetDict."""
    datasets = require_extra("datasets")

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(ds)({k: fn(v) for k, v in ds.items()})
    return fn(ds)


def _drop_empty_beta_columns(ds: Any):
    datasets = require_extra("datasets")

    if not isinstance(ds, datasets.Dataset):
        return ds
    empty = [c for c in _BETA_FIELDS if c in ds.column_names and all(v is None for v in ds[c])]
    return ds.remove_columns(empty) if empty else ds


def normalize_sft_dataset(
    ds: Any,
    *,
    query_field: str = "query",
    answer_field: str = "answer",
    text_field: str | None = None,
    messages_field: str = "messages",
):
    """Bring SFT data of any accepted form to ``query``/``answer`` columns (+ present Beta fields).

    Forms, tried in this order: separate ``query_field``/``answer_field`` columns (Beta records may have
    ``tool_use`` instead of a query); a ``messages_field`` column of chat messages (each exchange becomes one
    row; system messages are dropped, since single interactions carry no memory); a combined text column
    (``text_field``, or the first of ``interaction``/``text`` present) with ``[Q]``/``[A]`` markers.
    Beta columns that are None in every row are dropped, except on streaming datasets (they stay, as None).
    """

    def one(d: Any):
        cols = _columns(d) or []
        if query_field in cols or "tool_use" in cols:
            renames = {}
            if query_field != "query" and query_field in cols:
                renames[query_field] = "query"
            if answer_field != "answer" and answer_field in cols:
                renames[answer_field] = "answer"
            return d.rename_columns(renames) if renames else d
        if messages_field in cols:

            def from_messages(batch: Mapping[str, list]) -> dict[str, list]:
                out: dict[str, list] = {k: [] for k in INTERACTION_FIELDS}
                for messages in batch[messages_field]:
                    _, interactions = messages_to_interactions(messages)
                    for it in interactions:
                        for k in INTERACTION_FIELDS:
                            out[k].append(it.get(k))
                return out

            d = d.map(from_messages, batched=True, remove_columns=cols)
            return _drop_empty_beta_columns(d)
        field = text_field or next((c for c in ("interaction", "text") if c in cols), None)
        if field is None or field not in cols:
            raise ValueError(
                f"unrecognised SFT format (columns: {cols}): expected {query_field!r}/{answer_field!r} "
                "columns, "
                f"a {messages_field!r} column, or a combined text column with [Q]/[A] markers (text_field=)"
            )

        def from_text(row: Mapping[str, Any]) -> dict[str, Any]:
            return parse_interaction_text(row[field])

        d = d.map(from_text, remove_columns=cols)
        return _drop_empty_beta_columns(d)

    return _map_splits(ds, one)


def normalize_mrl_dataset(
    ds: Any,
    *,
    query_field: str = "query",
    answer_field: str = "answer",
    interactions_field: str = "interactions",
    messages_field: str = "messages",
):
    """Bring MRL episodes to the reference's ``query``/``answer``/``interactions`` columns.

    Accepts the standard record; the hybrid SMAT record (only ``interactions`` [+ ``system``]: the first
    element becomes the top-level interaction, its Beta fields top-level columns); and chat ``messages``
    (system messages -> ``system``). Field renames apply to the top level and to every element of
    ``interactions``. Other columns are kept.
    """

    def rename_inner(items: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
        out = []
        for it in items or []:
            it = dict(it)
            if query_field != "query" and query_field in it:
                it["query"] = it.pop(query_field)
            if answer_field != "answer" and answer_field in it:
                it["answer"] = it.pop(answer_field)
            out.append(it)
        return out

    def one(d: Any):
        cols = _columns(d) or []
        if query_field in cols and interactions_field in cols:
            renames = {}
            if query_field != "query":
                renames[query_field] = "query"
            if answer_field != "answer" and answer_field in cols:
                renames[answer_field] = "answer"
            if interactions_field != "interactions":
                renames[interactions_field] = "interactions"
            if renames:
                d = d.rename_columns(renames)
            if query_field != "query" or answer_field != "answer":
                d = d.map(lambda row: {"interactions": rename_inner(row["interactions"])})
            return d
        if interactions_field in cols:

            def split_first(row: Mapping[str, Any]) -> dict[str, Any]:
                items = rename_inner(row[interactions_field])
                if not items:
                    raise ValueError("an episode has an empty interactions list")
                first = items[0]
                out = {k: first.get(k) for k in INTERACTION_FIELDS}
                out["interactions"] = items[1:]
                return out

            drop = [interactions_field] if interactions_field != "interactions" else []
            d = d.map(split_first, remove_columns=drop)
            return _drop_empty_beta_columns(d)
        if messages_field in cols:

            def from_messages(row: Mapping[str, Any]) -> dict[str, Any]:
                system, items = messages_to_interactions(row[messages_field])
                if not items:
                    raise ValueError("a conversation has no user/tool message")
                out = {k: items[0].get(k) for k in INTERACTION_FIELDS}
                out["interactions"] = items[1:]
                out["system"] = system
                return out

            d = d.map(from_messages, remove_columns=[messages_field])
            return _drop_empty_beta_columns(d)
        raise ValueError(
            f"unrecognised MRL format (columns: {cols}): expected {query_field!r}, {answer_field!r} and "
            f"{interactions_field!r} columns, an {interactions_field!r} column alone, or {messages_field!r}"
        )

    return _map_splits(ds, one)


def episode_turns(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The interactions of an MRL episode record, in order: the top-level one, then ``interactions``.

    Each turn is a dict with ``query`` and ``answer`` (None if absent) plus the Beta fields that are set.
    """

    def turn(x: Mapping[str, Any]) -> dict[str, Any]:
        out = {"query": x.get("query"), "answer": x.get("answer")}
        out.update({k: x[k] for k in _BETA_FIELDS if x.get(k) is not None})
        return out

    return [turn(record), *[turn(x) for x in record.get("interactions") or []]]


# ------------------------------------------------------------------------------------------------------------
# Tokenization
# ------------------------------------------------------------------------------------------------------------


def _marker(tokenizer: Any, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or tokenizer.convert_ids_to_tokens(i) != token:
        raise ValueError(f"the tokenizer has no {token} token")
    return i


def tokenize_pretraining_dataset(
    ds: Any,
    tokenizer: Any,
    max_length: int,
    *,
    text_column: str = "text",
    truncation: bool = False,
    remove_columns: bool = True,
    num_proc: int | None = None,
    batch_size: int = 1000,
):
    """Pre-training text -> ``input_ids`` = ``[BOS] text [EOS]`` (built explicitly, whatever post-processor
    the tokenizer has).

    Rows longer than ``max_length`` raise :class:`InputTooLongError`; with ``truncation=True`` they keep
    ``[BOS]`` and the first ``max_length - 1`` text tokens (no ``[EOS]``: the text did not end there). Empty
    texts are kept as ``[BOS][EOS]``.
    """
    bos, eos = _marker(tokenizer, BOS_TOKEN), _marker(tokenizer, EOS_TOKEN)

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[text_column]]
        out = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            seq = [bos, *ids, eos]
            if len(seq) > max_length:
                if not truncation:
                    raise InputTooLongError(
                        f"A text is {len(seq)} tokens long with [BOS]/[EOS], more than "
                        f"max_length={max_length}. "
                        "Raise max_length, split the texts, or pass truncation=True."
                    )
                seq = seq[:max_length]
            out.append(seq)
        return {"input_ids": out}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    remove = (_columns(ds) or []) if remove_columns else None
    return ds.map(encode, batched=True, batch_size=batch_size, remove_columns=remove, **kwargs)


def tokenize_sft_dataset(
    ds: Any,
    tokenizer: Any,
    max_length: int | None = None,
    *,
    truncation: bool = False,
    remove_columns: bool = True,
    num_proc: int | None = None,
    batch_size: int = 1000,
):
    """Normalised SFT records -> ``input_ids`` (``[BOS][Q]query[A]answer[EOS]``, Beta sections when present)
    and ``labels`` (answer side incl. its markers and ``[EOS]``; -100 on ``[BOS]`` and the query side)."""

    def encode(batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        _check_batch({k: batch[k] for k in INTERACTION_FIELDS if k in batch}, indices, episode=False)
        n = len(next(iter(batch.values())))
        records = [{k: batch[k][i] for k in INTERACTION_FIELDS if k in batch} for i in range(n)]
        ids, labels = tokenize_interaction_records(tokenizer, records, max_length, truncation=truncation)
        return {"input_ids": ids, "labels": labels}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    remove = (_columns(ds) or []) if remove_columns else None
    return ds.map(encode, batched=True, with_indices=True, batch_size=batch_size, remove_columns=remove, **kwargs)


def _tokenize_reviews(
    tokenizer: Any, rows: list[Mapping[str, Any]], num_turns: list[int], max_length: int | None, truncation: bool
) -> dict[str, list]:
    """Per episode, ``num_turns + 1`` review slots (ids and labels; empty lists where there is no review)."""
    flat = [r for row in rows for r in row.get("reviews") or []]
    ids, labels = tokenize_interaction_records(tokenizer, flat, max_length, truncation=truncation)
    out: dict[str, list] = {"review_input_ids": [], "review_labels": []}
    start = 0
    for row, n in zip(rows, num_turns):
        slot_ids: list[list[int]] = [[] for _ in range(n + 1)]
        slot_labels: list[list[int]] = [[] for _ in range(n + 1)]
        for review in row.get("reviews") or []:
            k = int(review["turn"])
            if not 1 <= k <= n:
                raise ValueError(f"a review's turn must be in 1..{n} (the episode has {n} turns), got {k}")
            if slot_ids[k]:
                raise ValueError(f"two reviews at turn {k}: an episode has at most one review per turn")
            slot_ids[k], slot_labels[k] = ids[start], labels[start]
            start += 1
        out["review_input_ids"].append(slot_ids)
        out["review_labels"].append(slot_labels)
    return out


def tokenize_mrl_dataset(
    ds: Any,
    tokenizer: Any,
    max_length: int | None = None,
    *,
    truncation: bool = False,
    system_style: str = "internal",
    system_title: str | None = SYSTEM_PROMPT_TITLE,
    remove_columns: bool = True,
    num_proc: int | None = None,
    batch_size: int = 200,
):
    """Normalised MRL episodes -> per-turn ids for :class:`~transformers_rxt.data.DataCollatorForRxTEpisodes`.

    Columns: ``turn_input_ids`` (one full interaction per turn), ``turn_labels`` (answer-side labels, as in
    :func:`tokenize_sft_dataset`), ``num_turns``; ``system_input_ids`` (empty when the row has none) if
    the data has a ``system`` column; and ``review_input_ids``/``review_labels`` if it has a ``reviews`` column
    (see :func:`~transformers_rxt.data.memory_dialogues`): ``num_turns + 1`` entries per episode, entry k the
    question asked of the memory before turn k (empty where there is none). ``max_length`` applies to each turn
    separately.
    """
    has_system = "system" in (_columns(ds) or [])
    has_reviews = "reviews" in (_columns(ds) or [])

    def encode(batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        _check_batch({k: batch[k] for k in (*INTERACTION_FIELDS, "interactions") if k in batch}, indices, True)
        n = len(next(iter(batch.values())))
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        # One tokenizer call per field for all turns of all episodes in the batch.
        episodes = [episode_turns(row) for row in rows]
        flat = [t for turns in episodes for t in turns]
        ids, labels = tokenize_interaction_records(tokenizer, flat, max_length, truncation=truncation)
        out: dict[str, list] = {"turn_input_ids": [], "turn_labels": [], "num_turns": []}
        start = 0
        for turns in episodes:
            out["turn_input_ids"].append(ids[start : start + len(turns)])
            out["turn_labels"].append(labels[start : start + len(turns)])
            out["num_turns"].append(len(turns))
            start += len(turns)
        if has_reviews:
            out.update(_tokenize_reviews(tokenizer, rows, out["num_turns"], max_length, truncation))
        if has_system:
            out["system_input_ids"] = [
                tokenize_system_prompt(
                    tokenizer,
                    row["system"],
                    max_length,
                    style=system_style,
                    title=system_title,
                    truncation=truncation,
                )["input_ids"]
                if row.get("system")
                else []
                for row in rows
            ]
        return out

    kwargs = {"num_proc": num_proc} if num_proc else {}
    remove = (_columns(ds) or []) if remove_columns else None
    return ds.map(encode, batched=True, with_indices=True, batch_size=batch_size, remove_columns=remove, **kwargs)
