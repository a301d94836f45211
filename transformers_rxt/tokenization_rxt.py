"""Tokenization for the Reactive Transformer: special tokens, stage-0 tokenizer training, the chat template
and the interaction helpers.

An RxT conversation is a sequence of *interactions*. Each one is tokenized on its own, with no spaces around
the markers (Alpha, and the subset of Beta every tokenizer here supports)::

    [BOS][Q]query[A]answer[EOS]
    [BOS]([I]internal)?([Q]query | [U]tool result)([T]think)?([A]answer)?([C]tool call)?[EOS]     (RxT-Beta)

The decoder only ever reads the *prompt* of the current interaction (``[BOS][Q]query[A]``, what
``add_generation_prompt=True`` renders); the full interaction is what the memory update encodes afterwards.
Earlier turns reach the decoder only through the short-term memory, never as tokens.

Every helper builds the ids by concatenating the marker ids with ``tokenizer(text, add_special_tokens=False)``
ids. For byte-level BPE this is exactly what tokenizing the rendered string gives (added tokens split the text
first), so helpers, the chat template and the reference's string-based code agree id for id.

Marker strings inside the text (a user typing ``[A]``) become markers, as in the reference. For untrusted
input pass ``split_special_tokens=True`` to any helper (or ``sanitize_control_tokens=True`` to
``apply_chat_template``): they are then encoded as plain text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from transformers import BatchEncoding, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "RXT_SPECIAL_TOKENS",
    "RXT_SPECIAL_TOKEN_IDS",
    "RXT_ALPHA_TOKEN_IDS",
    "RXT_BETA_TOKEN_IDS",
    "RXT_CHAT_TEMPLATE",
    "SYSTEM_PROMPT_TITLE",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "QUERY_TOKEN",
    "ANSWER_TOKEN",
    "THINK_TOKEN",
    "TOOL_CALL_TOKEN",
    "TOOL_USE_TOKEN",
    "INTERNAL_TOKEN",
    "rxt_token_ids",
    "train_rxt_tokenizer",
    "load_rxt_tokenizer",
    "apply_rxt_chat_template",
    "tokenize_query",
    "tokenize_tool_result",
    "tokenize_prompt",
    "tokenize_interaction",
    "tokenize_system_prompt",
    "tokenize_queries",
    "tokenize_prompts",
    "tokenize_interactions",
    "tokenize_interaction_records",
    "pad_sequences",
    "format_tool_calls",
    "messages_to_interactions",
    "parse_interaction_text",
    "InputTooLongError",
]

# ------------------------------------------------------------------------------------------------------------
# Special tokens
# ------------------------------------------------------------------------------------------------------------

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"
MASK_TOKEN = "[MASK]"
QUERY_TOKEN = "[Q]"
ANSWER_TOKEN = "[A]"
THINK_TOKEN = "[T]"
TOOL_CALL_TOKEN = "[C]"
TOOL_USE_TOKEN = "[U]"
INTERNAL_TOKEN = "[I]"

#: The RxT special tokens in id order: the reference's tokenizers put them at ids 0..10.
RXT_SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    MASK_TOKEN,
    QUERY_TOKEN,
    ANSWER_TOKEN,
    THINK_TOKEN,
    TOOL_CALL_TOKEN,
    TOOL_USE_TOKEN,
    INTERNAL_TOKEN,
)
RXT_SPECIAL_TOKEN_IDS: dict[str, int] = {token: i for i, token in enumerate(RXT_SPECIAL_TOKENS)}

#: Keys and values of the reference's ``RxTAlphaTokenizerConfig`` for a tokenizer with the standard layout.
RXT_ALPHA_TOKEN_IDS: dict[str, int] = {
    "bos_token_id": 2,
    "eos_token_id": 3,
    "answer_token_id": 6,
    "query_token_id": 5,
    "pad_token_id": 0,
}
#: ``RxTBetaTokenizerConfig``: the Alpha keys plus the four Beta markers.
RXT_BETA_TOKEN_IDS: dict[str, int] = {
    **RXT_ALPHA_TOKEN_IDS,
    "think_token_id": 7,
    "tool_call_token_id": 8,
    "tool_use_token_id": 9,
    "internal_token_id": 10,
}

_CONFIG_KEY_TO_TOKEN = {
    "bos_token_id": BOS_TOKEN,
    "eos_token_id": EOS_TOKEN,
    "answer_token_id": ANSWER_TOKEN,
    "query_token_id": QUERY_TOKEN,
    "pad_token_id": PAD_TOKEN,
    "think_token_id": THINK_TOKEN,
    "tool_call_token_id": TOOL_CALL_TOKEN,
    "tool_use_token_id": TOOL_USE_TOKEN,
    "internal_token_id": INTERNAL_TOKEN,
}

#: Title line of a system prompt, as the reference writes it.
SYSTEM_PROMPT_TITLE = "SYSTEM INSTRUCTIONS"

# Beyond this, `model_max_length` is HF's "no limit" sentinel (int(1e30)), not a real limit.
_NO_LIMIT = 10**12


class InputTooLongError(ValueError):
    """A tokenized input is longer than the allowed ``max_length`` and truncation was not requested."""


def _lookup(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> dict[str, int]:
    """Ids of those ``tokens`` that are single tokens of the vocabulary (cheap: no full vocab dict is
    built).
    """
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    back = tokenizer.convert_ids_to_tokens([i for i in ids if i is not None])
    found = {}
    it = iter(back)
    for token, i in zip(tokens, ids):
        if i is None:
            continue
        # Unknown tokens map to the unk id; the round trip tells them apart.
        if next(it) == token:
            found[token] = i
    return found


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """Id of ``token`` if it is a single token of the vocabulary, else None."""
    return _lookup(tokenizer, [token]).get(token)


def rxt_token_ids(tokenizer: PreTrainedTokenizerBase, beta: bool = True) -> dict[str, int]:
    """The tokenizer-config dict (``bos_token_id``, ``answer_token_id``, ...) for ``tokenizer``.

    Looked up by token string, so tokenizers with another layout work too. With ``beta=False`` only the Alpha
    keys are returned. Raises ``ValueError`` naming the missing markers if the tokenizer lacks any of them.
    """
    keys = RXT_BETA_TOKEN_IDS if beta else RXT_ALPHA_TOKEN_IDS
    vocab = _lookup(tokenizer, [_CONFIG_KEY_TO_TOKEN[k] for k in keys])
    out: dict[str, int] = {}
    missing = []
    for key in keys:
        token = _CONFIG_KEY_TO_TOKEN[key]
        if token in vocab:
            out[key] = vocab[token]
        else:
            missing.append(token)
    if missing:
        raise ValueError(
            f"The tokenizer has no {', '.join(missing)} token(s); an RxT tokenizer needs all of "
            f"{', '.join(_CONFIG_KEY_TO_TOKEN[k] for k in keys)}. Train one with train_rxt_tokenizer() or "
            "add them with tokenizer.add_special_tokens(...) (and resize the model's embeddings)."
        )
    return out


def _marker_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Token string -> id for the RxT markers present in the vocabulary (checks the Alpha ones exist)."""
    ids = _lookup(tokenizer, RXT_SPECIAL_TOKENS)
    missing = [t for t in (BOS_TOKEN, EOS_TOKEN, QUERY_TOKEN, ANSWER_TOKEN) if t not in ids]
    if missing:
        raise ValueError(
            f"The tokenizer has no {', '.join(missing)} token(s), so it cannot encode RxT interactions. "
            "Use train_rxt_tokenizer() or load_rxt_tokenizer() on an RxT tokenizer."
        )
    return ids


def _require_marker(ids: Mapping[str, int], token: str, what: str) -> int:
    if token not in ids:
        raise ValueError(
            f"{what} needs the {token} token, which this tokenizer does not have (an RxT-Alpha-only "
            "tokenizer?). Train a tokenizer with train_rxt_tokenizer(), which includes all RxT-Beta markers."
        )
    return ids[token]


# ------------------------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------------------------

#: Jinja chat template for RxT. See the module docstring of :mod:`transformers_rxt.tokenization_rxt` and
#: :func:`apply_rxt_chat_template` for the rendering rules and the template variables.
RXT_CHAT_TEMPLATE = r"""{#- RxT chat template. Each interaction renders as
    [BOS]([I]internal)?([Q]query|[U]tool result)([T]think)?([A]answer)?([C]tool call)?[EOS]
  with no spaces around the markers. RxT is stateful: for chat, render ONLY the newest query (earlier turns live
  in the short-term memory); a list of several turns renders them back to back, which is what training data
  looks like. Variables: system_format ('internal' -> [BOS][I]TITLE\n\nsystem[EOS], RxT-Beta;
  'query' -> [BOS][Q]TITLE[A]system[EOS], the reference's SmatDataset form), system_prompt_title,
  thinking_mode ('fast' -> generation prompt [A], 'extended' -> [T], 'auto' -> nothing), enable_thinking. -#}
{%- macro rxt_text(c) -%}
{%- if c is string -%}{{ c }}
{%- elif c is mapping -%}{{ c.text if c.text is defined else '' }}
{%- elif c is iterable -%}{%- for part in c -%}{%- if part is string -%}{{ part }}{%- elif part is mapping and part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(open=false, body=false) -%}
{%- set sys_title = system_prompt_title if system_prompt_title is defined and system_prompt_title is not none else 'SYSTEM INSTRUCTIONS' -%}
{%- set sys_format = system_format if system_format is defined and system_format is not none else 'internal' -%}
{%- if enable_thinking is defined and enable_thinking is not none -%}
{%- set mode = 'extended' if enable_thinking else 'fast' -%}
{%- elif thinking_mode is defined and thinking_mode is not none -%}
{%- set mode = thinking_mode -%}
{%- else -%}
{%- set mode = 'fast' -%}
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
{%- if ns.open -%}{{ raise_exception('RxT chat template: a system message cannot come inside an interaction (between a user/tool message and its assistant answer).') }}{%- endif -%}
{%- if sys_format == 'query' -%}
{{- '[BOS][Q]' ~ sys_title ~ '[A]' ~ rxt_text(m.content) ~ '[EOS]' -}}
{%- elif sys_format == 'internal' -%}
{{- '[BOS][I]' ~ (sys_title ~ '\n\n' if sys_title else '') ~ rxt_text(m.content) ~ '[EOS]' -}}
{%- else -%}{{ raise_exception("RxT chat template: system_format must be 'internal' or 'query'.") }}
{%- endif -%}
{%- elif m.role == 'internal' -%}
{%- if ns.body -%}{{ raise_exception('RxT chat template: an internal message must come before the user/tool message of its interaction.') }}{%- endif -%}
{%- if not ns.open -%}{{- '[BOS]' -}}{%- set ns.open = true -%}{%- endif -%}
{{- '[I]' ~ rxt_text(m.content) -}}
{%- elif m.role == 'user' or m.role == 'tool' -%}
{%- if ns.body -%}{{ raise_exception('RxT chat template: two user/tool messages in a row; each one must be answered by an assistant message first (one query per interaction).') }}{%- endif -%}
{%- if not ns.open -%}{{- '[BOS]' -}}{%- endif -%}
{%- if m.internal is defined and m.internal is not none -%}{{- '[I]' ~ rxt_text(m.internal) -}}{%- endif -%}
{{- ('[Q]' if m.role == 'user' else '[U]') ~ rxt_text(m.content) -}}
{%- set ns.open = true -%}{%- set ns.body = true -%}
{%- elif m.role == 'assistant' -%}
{%- if not ns.body -%}{{ raise_exception('RxT chat template: an assistant message must answer a user or tool message.') }}{%- endif -%}
{%- if m.reasoning_content is defined and m.reasoning_content is not none -%}{%- set think = m.reasoning_content -%}
{%- elif m.thinking is defined and m.thinking is not none -%}{%- set think = m.thinking -%}
{%- elif m.think is defined and m.think is not none -%}{%- set think = m.think -%}
{%- else -%}{%- set think = none -%}{%- endif -%}
{%- set calls = m.tool_calls if m.tool_calls is defined and m.tool_calls else (m.tool_call if m.tool_call is defined and m.tool_call else none) -%}
{%- set answer = rxt_text(m.content) if m.content is defined and m.content is not none else '' -%}
{%- generation -%}
{%- if think is not none -%}{{- '[T]' ~ rxt_text(think) -}}{%- endif -%}
{%- if answer or calls is none -%}{{- '[A]' ~ answer -}}{%- endif -%}
{%- if calls is not none -%}{{- '[C]' -}}
{%- if calls is string -%}{{- calls -}}
{%- elif calls is mapping -%}{%- set f = calls.function if calls.function is defined else calls -%}{{- {'name': f.name, 'arguments': (f.arguments if f.arguments is defined else {})} | tojson -}}
{%- else -%}{%- for tc in calls -%}{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
{%- if tc is string -%}{{- tc -}}
{%- else -%}{%- set f = tc.function if tc.function is defined else tc -%}{{- {'name': f.name, 'arguments': (f.arguments if f.arguments is defined else {})} | tojson -}}
{%- endif -%}{%- endfor -%}
{%- endif -%}{%- endif -%}
{{- '[EOS]' -}}
{%- endgeneration -%}
{%- set ns.open = false -%}{%- set ns.body = false -%}
{%- else -%}{{ raise_exception('RxT chat template: unknown role ' ~ m.role ~ " (use system, user, assistant, tool or internal).") }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{%- if not ns.body -%}{{ raise_exception('RxT chat template: add_generation_prompt=True needs the messages to end with a user or tool message.') }}{%- endif -%}
{%- if mode == 'fast' -%}{{- '[A]' -}}{%- elif mode == 'extended' -%}{{- '[T]' -}}{%- elif mode != 'auto' -%}{{ raise_exception("RxT chat template: thinking_mode must be 'fast', 'extended' or 'auto'.") }}{%- endif -%}
{%- endif -%}"""  # noqa: E501 (Jinja: one tag per line)


def format_tool_calls(tool_calls: Any) -> str:
    """Text of the ``[C]`` section for ``tool_calls``, exactly as :data:`RXT_CHAT_TEMPLATE` renders it.

    A string is used as is; an OpenAI/HF style call (``{"type": "function", "function": {"name",
    "arguments"}}``) or a bare ``{"name", "arguments"}`` dict becomes ``{"name": ..., "arguments": ...}``
    JSON; a list of calls is joined with newlines.
    """
    if isinstance(tool_calls, str):
        return tool_calls

    def one(call: Any) -> str:
        if isinstance(call, str):
            return call
        f = call.get("function", call) if isinstance(call, Mapping) else call
        # Same serialisation as transformers' Jinja `tojson` filter, so template and helpers agree.
        return json.dumps({"name": f.get("name"), "arguments": f.get("arguments", {})}, ensure_ascii=False)

    if isinstance(tool_calls, Mapping):
        return one(tool_calls)
    return "\n".join(one(c) for c in tool_calls)


def _content_text(content: Any) -> str:
    """Message content as text (a string, or the text parts of a multimodal-style list)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text", ""))
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


def messages_to_interactions(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[str | None, list[dict[str, str | None]]]:
    """Split chat messages into ``(system, interactions)`` following the chat template's rules.

    Each interaction is a dict with the record fields of the reference's datasets: ``query`` or ``tool_use``,
    and optionally ``internal``, ``think``, ``answer``, ``tool_call`` (missing ones are None). A trailing
    query without an answer gives an interaction with ``answer=None``. Several system messages are joined with
    a blank line. Raises ``ValueError`` on sequences the template rejects (two queries in a row, an answer
    without a query).
    """
    system_parts: list[str] = []
    interactions: list[dict[str, str | None]] = []
    current: dict[str, str | None] | None = None
    for m in messages:
        role = m.get("role")
        if role == "system":
            if current is not None:
                raise ValueError("a system message cannot come inside an interaction")
            system_parts.append(_content_text(m.get("content")))
        elif role == "internal":
            if current is not None and (current["query"] is not None or current["tool_use"] is not None):
                raise ValueError(
                    "an internal message must come before the user/tool message of its interaction"
                )
            if current is None:
                current = dict.fromkeys(("internal", "query", "tool_use", "think", "answer", "tool_call"))
            text = _content_text(m.get("content"))
            current["internal"] = text if current["internal"] is None else current["internal"] + text
        elif role in ("user", "tool"):
            if current is not None and (current["query"] is not None or current["tool_use"] is not None):
                raise ValueError(
                    "two user/tool messages in a row; each must be answered by an assistant message"
                )
            if current is None:
                current = dict.fromkeys(("internal", "query", "tool_use", "think", "answer", "tool_call"))
            if m.get("internal") is not None:
                current["internal"] = _content_text(m["internal"])
            current["query" if role == "user" else "tool_use"] = _content_text(m.get("content"))
        elif role == "assistant":
            if current is None or (current["query"] is None and current["tool_use"] is None):
                raise ValueError("an assistant message must answer a user or tool message")
            think = next(
                (m[k] for k in ("reasoning_content", "thinking", "think") if m.get(k) is not None), None
            )
            calls = m.get("tool_calls") or m.get("tool_call") or None
            answer = _content_text(m.get("content")) if m.get("content") is not None else ""
            current["think"] = None if think is None else _content_text(think)
            current["answer"] = answer if (answer or calls is None) else None
            current["tool_call"] = None if calls is None else format_tool_calls(calls)
            interactions.append(current)
            current = None
        else:
            raise ValueError(f"unknown role {role!r} (use system, user, assistant, tool or internal)")
    if current is not None:
        interactions.append(current)
    system = "\n\n".join(system_parts) if system_parts else None
    return system, interactions


def parse_interaction_text(text: str) -> dict[str, str | None]:
    """Parse one interaction written with markers (``[BOS][Q]q[A]a[EOS]`` or the Beta form) into record
    fields.

    ``[BOS]``/``[EOS]`` and surrounding whitespace around the whole string are optional. Returns a dict with
    keys ``internal``, ``query``, ``tool_use``, ``think``, ``answer``, ``tool_call`` (None when absent).
    Raises ``ValueError`` if the text has neither ``[Q]`` nor ``[U]``. The content is kept verbatim (no
    stripping), so a space the data put after a marker stays part of the text.
    """
    import re

    body = text.strip()
    if body.startswith(BOS_TOKEN):
        body = body[len(BOS_TOKEN) :]
    if body.endswith(EOS_TOKEN):
        body = body[: -len(EOS_TOKEN)]
    fields = {
        INTERNAL_TOKEN: "internal",
        QUERY_TOKEN: "query",
        TOOL_USE_TOKEN: "tool_use",
        THINK_TOKEN: "think",
        ANSWER_TOKEN: "answer",
        TOOL_CALL_TOKEN: "tool_call",
    }
    out: dict[str, str | None] = dict.fromkeys(fields.values())
    pattern = "(" + "|".join(re.escape(t) for t in fields) + ")"
    pieces = re.split(pattern, body)
    if pieces[0].strip():
        raise ValueError(f"interaction text must start with a marker, got {text[:60]!r}")
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        key = fields[marker]
        out[key] = content if out[key] is None else out[key] + marker + content
    if out["query"] is None and out["tool_use"] is None:
        raise ValueError(f"interaction text has no {QUERY_TOKEN} or {TOOL_USE_TOKEN} marker: {text[:80]!r}")
    return out


def apply_rxt_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
    *,
    add_generation_prompt: bool = False,
    tokenize: bool = True,
    system_format: Literal["internal", "query"] = "internal",
    system_prompt_title: str = SYSTEM_PROMPT_TITLE,
    thinking_mode: Literal["fast", "extended", "auto"] = "fast",
    **kwargs: Any,
) -> Any:
    """``tokenizer.apply_chat_template`` with the RxT template (used when the tokenizer has no template of its
    own).

    Rendering rules (one interaction per user/tool message):

    - ``user`` -> ``[BOS][Q]content``, ``tool`` -> ``[BOS][U]content``; an ``internal`` key on the message, or
      a preceding ``{"role": "internal"}`` message, adds ``[I]internal`` right after ``[BOS]``;
    - ``assistant`` -> ``[T]reasoning`` (from ``reasoning_content``/``thinking``/``think``), ``[A]content``,
      ``[C]tool calls`` (see :func:`format_tool_calls`), then ``[EOS]``; ``[A]`` is left out only when the
      message has tool calls and no content;
    - ``system`` -> ``[BOS][I]SYSTEM INSTRUCTIONS\\n\\n{system}[EOS]`` (``system_format="internal"``,
      RxT-Beta) or ``[BOS][Q]SYSTEM INSTRUCTIONS[A]{system}[EOS]`` (``"query"``, the reference's SmatDataset
      form). A system prompt is meant to initialise the memory (``model.init_memory(input_ids=...)``), not to
      be decoded;
    - ``add_generation_prompt=True`` appends ``[A]`` (``thinking_mode="fast"``), ``[T]`` (``"extended"``) or
      nothing (``"auto"``): ``[BOS][Q]query[A]`` is the input of ``generate``. Without it, a trailing user
      message renders as ``[BOS][Q]query`` (the reference's ``tokenize_query``).

    RxT is stateful: for chat, render only the newest query; a list with several turns renders them back to
    back (training data), which is not a valid decoder prompt. Extra ``kwargs`` go to ``apply_chat_template``.
    """
    template = getattr(tokenizer, "chat_template", None) or RXT_CHAT_TEMPLATE
    kwargs.setdefault("chat_template", template)
    return tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=tokenize,
        system_format=system_format,
        system_prompt_title=system_prompt_title,
        thinking_mode=thinking_mode,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------------------
# Interaction helpers
# ------------------------------------------------------------------------------------------------------------

# A section is (marker id or None, content ids, trained?). Content ids may be shortened by truncation.
_Section = tuple[int | None, list[int], bool]


def _encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str | None], split_special_tokens: bool = False
) -> list[list[int] | None]:
    """Encode many texts with ``add_special_tokens=False`` in one (parallel) tokenizer call; None stays
    None.
    """
    idx = [i for i, t in enumerate(texts) if t is not None]
    out: list[list[int] | None] = [None] * len(texts)
    if idx:
        enc = tokenizer(
            [texts[i] for i in idx], add_special_tokens=False, split_special_tokens=split_special_tokens
        )["input_ids"]
        for i, ids in zip(idx, enc):
            out[i] = list(ids)
    return out


def _resolve_max_length(tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> int | None:
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        return max_length
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def _join(
    sections: list[_Section], max_length: int | None, truncation: bool, what: str, names: Sequence[str]
) -> tuple[list[int], list[bool]]:
    """Concatenate sections; enforce ``max_length``. Truncation shortens content, last section first, keeping
    every marker (so a truncated interaction still ends in [EOS] and a truncated prompt in [A])."""
    total = sum((m is not None) + len(c) for m, c, _ in sections)
    if max_length is not None and total > max_length:
        if not truncation:
            parts = ", ".join(f"{n}: {len(c)}" for n, (_, c, _) in zip(names, sections) if n and c)
            raise InputTooLongError(
                f"The {what} is {total} tokens long ({parts} text tokens), more than "
                f"max_length={max_length}. Shorten the text, raise max_length (up to the model's "
                "max_seq_len), or pass truncation=True to cut the text explicitly."
            )
        overflow = total - max_length
        for i in range(len(sections) - 1, -1, -1):
            m, c, t = sections[i]
            cut = min(overflow, len(c))
            if cut:
                sections[i] = (m, c[: len(c) - cut], t)
                overflow -= cut
            if overflow == 0:
                break
        if overflow > 0:
            raise InputTooLongError(
                f"max_length={max_length} is too small to hold even the {what}'s markers "
                f"({total - sum(len(c) for _, c, _ in sections)} tokens)."
            )
    ids: list[int] = []
    trained: list[bool] = []
    for m, c, t in sections:
        if m is not None:
            ids.append(m)
            trained.append(t)
        ids.extend(c)
        trained.extend([t] * len(c))
    return ids, trained


def _finish(
    ids: list[int], trained: list[bool] | None, return_labels: bool, return_tensors: str | None
) -> BatchEncoding:
    data: dict[str, Any] = {"input_ids": ids, "attention_mask": [1] * len(ids)}
    if return_labels:
        assert trained is not None
        data["labels"] = [i if t else -100 for i, t in zip(ids, trained)]
    return BatchEncoding(data, tensor_type=return_tensors, prepend_batch_axis=return_tensors is not None)


def _prompt_sections(
    marker: Mapping[str, int],
    query: list[int] | None,
    tool_use: list[int] | None,
    internal: list[int] | None,
) -> tuple[list[_Section], list[str]]:
    if query is not None and tool_use is not None:
        raise ValueError("an interaction has either a query or a tool result (tool_use), not both")
    if query is None and tool_use is None:
        raise ValueError("an interaction needs a query or a tool result (tool_use)")
    sections: list[_Section] = [(marker[BOS_TOKEN], [], False)]
    names = [""]
    if internal is not None:
        sections.append((_require_marker(marker, INTERNAL_TOKEN, "An internal instruction"), internal, False))
        names.append("internal")
    if tool_use is not None:
        sections.append((_require_marker(marker, TOOL_USE_TOKEN, "A tool result"), tool_use, False))
        names.append("tool result")
    else:
        sections.append((marker[QUERY_TOKEN], query or [], False))
        names.append("query")
    return sections, names


def _generation_marker(marker: Mapping[str, int], thinking_mode: str) -> list[_Section]:
    if thinking_mode == "fast":
        return [(marker[ANSWER_TOKEN], [], True)]
    if thinking_mode == "extended":
        return [(_require_marker(marker, THINK_TOKEN, "thinking_mode='extended'"), [], True)]
    if thinking_mode == "auto":
        return []
    raise ValueError(f"thinking_mode must be 'fast', 'extended' or 'auto', got {thinking_mode!r}")


def _interaction_sections(
    marker: Mapping[str, int],
    query: list[int] | None,
    answer: list[int] | None,
    think: list[int] | None,
    tool_call: list[int] | None,
    tool_use: list[int] | None,
    internal: list[int] | None,
) -> tuple[list[_Section], list[str]]:
    sections, names = _prompt_sections(marker, query, tool_use, internal)
    if think is not None:
        sections.append((_require_marker(marker, THINK_TOKEN, "A think section"), think, True))
        names.append("think")
    if answer is not None:
        sections.append((marker[ANSWER_TOKEN], answer, True))
        names.append("answer")
    if tool_call is not None:
        sections.append((_require_marker(marker, TOOL_CALL_TOKEN, "A tool call"), tool_call, True))
        names.append("tool call")
    sections.append((marker[EOS_TOKEN], [], True))
    names.append("")
    return sections, names


def tokenize_query(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_length: int | None = None,
    *,
    internal: str | None = None,
    truncation: bool = False,
    split_special_tokens: bool = False,
    return_tensors: str | None = None,
) -> BatchEncoding:
    """rxlm-compatible query encoding: ``[BOS]([I]internal)?[Q]text`` -- **without** ``[A]``.

    This is what the reference's ``tokenize_query`` returns (its ``interact`` appends ``[A]`` itself). The
    input of ``generate`` is :func:`tokenize_prompt` (which ends in ``[A]``). Returns ``input_ids`` and
    ``attention_mask`` (lists, or ``[1, T]`` tensors with ``return_tensors="pt"``). Over ``max_length``
    (default: the tokenizer's ``model_max_length`` when it is a real limit) raises :class:`InputTooLongError`
    unless ``truncation=True``.
    """
    marker = _marker_ids(tokenizer)
    q, i = _encode_texts(tokenizer, [text, internal], split_special_tokens)
    sections, names = _prompt_sections(marker, q, None, i)
    ids, _ = _join(sections, _resolve_max_length(tokenizer, max_length), truncation, "query", names)
    return _finish(ids, None, False, return_tensors)


def tokenize_tool_result(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    max_length: int | None = None,
    *,
    internal: str | None = None,
    truncation: bool = False,
    split_special_tokens: bool = False,
    return_tensors: str | None = None,
) -> BatchEncoding:
    """rxlm-compatible (RxT-Beta) tool-result encoding: ``[BOS]([I]internal)?[U]text``, no trailing marker."""
    marker = _marker_ids(tokenizer)
    u, i = _encode_texts(tokenizer, [text, internal], split_special_tokens)
    sections, names = _prompt_sections(marker, None, u, i)
    ids, _ = _join(sections, _resolve_max_length(tokenizer, max_length), truncation, "tool result", names)
    return _finish(ids, None, False, return_tensors)


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase,
    query: str | None = None,
    max_length: int | None = None,
    *,
    tool_use: str | None = None,
    internal: str | None = None,
    thinking_mode: Literal["fast", "extended", "auto"] = "fast",
    truncation: bool = False,
    split_special_tokens: bool = False,
    return_tensors: str | None = None,
) -> BatchEncoding:
    """The decoder prompt for one turn, i.e. the ``generate`` input: ``[BOS]([I]internal)?[Q]query[A]``.

    Identical to the chat template with ``add_generation_prompt=True`` on one user message. ``tool_use``
    replaces the query by a tool result (``[U]``). ``thinking_mode`` picks the final marker: ``"fast"`` ->
    ``[A]``, ``"extended"`` -> ``[T]``, ``"auto"`` -> none (the model chooses). Truncation (only with
    ``truncation=True``) shortens the text and keeps the markers. Lengths as in :func:`tokenize_query`. With
    ``split_special_tokens=True`` marker strings in the text are encoded as plain text (for untrusted input).
    """
    marker = _marker_ids(tokenizer)
    q, u, i = _encode_texts(tokenizer, [query, tool_use, internal], split_special_tokens)
    sections, names = _prompt_sections(marker, q, u, i)
    sections += _generation_marker(marker, thinking_mode)
    names = list(names) + [""] * (len(sections) - len(names))
    ids, _ = _join(sections, _resolve_max_length(tokenizer, max_length), truncation, "prompt", names)
    return _finish(ids, None, False, return_tensors)


def tokenize_interaction(
    tokenizer: PreTrainedTokenizerBase,
    query: str | None = None,
    answer: str | None = None,
    max_length: int | None = None,
    *,
    think: str | None = None,
    tool_call: str | None = None,
    tool_use: str | None = None,
    internal: str | None = None,
    truncation: bool = False,
    split_special_tokens: bool = False,
    return_labels: bool = False,
    return_tensors: str | None = None,
) -> BatchEncoding:
    """A full interaction, what the memory update encodes and what teacher forcing trains on.

    ``[BOS][Q]query[A]answer[EOS]``; RxT-Beta:
    ``[BOS]([I]internal)?([Q]query|[U]tool_use)([T]think)?([A]answer)?([C]tool_call)?[EOS]``. An ``answer`` of
    None leaves out ``[A]``; ``answer=""`` gives ``[A][EOS]`` (the reference's system-prompt-as-interaction
    form).

    With ``return_labels=True`` also returns ``labels`` (same length): the token ids of the answer side --
    ``[T]``/``[A]``/``[C]`` sections *with* their markers, and ``[EOS]`` -- and -100 on ``[BOS]`` and the
    ``[I]``/``[Q]``/``[U]`` sections (the reference's SMAT / RxT-Beta SFT masking). Labels are aligned with
    ``input_ids`` (HF convention: the model shifts them).

    Over ``max_length`` raises :class:`InputTooLongError` unless ``truncation=True``, which shortens the texts
    (answer side first) and keeps every marker including ``[EOS]``.
    """
    marker = _marker_ids(tokenizer)
    q, a, t, c, u, i = _encode_texts(
        tokenizer, [query, answer, think, tool_call, tool_use, internal], split_special_tokens
    )
    sections, names = _interaction_sections(marker, q, a, t, c, u, i)
    ids, trained = _join(
        sections, _resolve_max_length(tokenizer, max_length), truncation, "interaction", names
    )
    return _finish(ids, trained, return_labels, return_tensors)


def tokenize_system_prompt(
    tokenizer: PreTrainedTokenizerBase,
    system: str,
    max_length: int | None = None,
    *,
    style: Literal["internal", "query"] = "internal",
    title: str | None = SYSTEM_PROMPT_TITLE,
    truncation: bool = False,
    split_special_tokens: bool = False,
    return_tensors: str | None = None,
) -> BatchEncoding:
    """A system prompt as an interaction, to initialise the memory.

    ``style="internal"`` (RxT-Beta, default): ``[BOS][I]{title}\\n\\n{system}[EOS]`` (just
    ``[BOS][I]{system}[EOS]`` when ``title`` is empty). ``style="query"`` (the reference's SmatDataset form,
    usable with Alpha-only tokenizers): ``[BOS][Q]{title}[A]{system}[EOS]``. Matches the chat template's
    ``system_format``.
    """
    marker = _marker_ids(tokenizer)
    if style == "internal":
        text = f"{title}\n\n{system}" if title else system
        (body,) = _encode_texts(tokenizer, [text], split_special_tokens)
        sections: list[_Section] = [
            (marker[BOS_TOKEN], [], False),
            (
                _require_marker(marker, INTERNAL_TOKEN, "A system prompt with style='internal'"),
                body or [],
                False,
            ),
            (marker[EOS_TOKEN], [], False),
        ]
        names = ["", "system", ""]
    elif style == "query":
        head, body = _encode_texts(tokenizer, [title or "", system], split_special_tokens)
        sections = [
            (marker[BOS_TOKEN], [], False),
            (marker[QUERY_TOKEN], head or [], False),
            (marker[ANSWER_TOKEN], body or [], False),
            (marker[EOS_TOKEN], [], False),
        ]
        names = ["", "title", "system", ""]
    else:
        raise ValueError(f"style must be 'internal' or 'query', got {style!r}")
    ids, _ = _join(sections, _resolve_max_length(tokenizer, max_length), truncation, "system prompt", names)
    return _finish(ids, None, False, return_tensors)


# ------------------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------------------


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    padding_side: Literal["left", "right"] = "right",
    padding: Literal["longest", "max_length"] = "longest",
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    labels: Sequence[Sequence[int]] | None = None,
    label_pad_token_id: int = -100,
    return_tensors: str | None = "pt",
) -> BatchEncoding:
    """Pad id lists into ``input_ids``/``attention_mask`` (and ``labels`` if given) of one length.

    ``padding="longest"`` pads to the longest sequence (rounded up to ``pad_to_multiple_of``);
    ``"max_length"`` pads to ``max_length``. Sequences longer than ``max_length`` raise
    :class:`InputTooLongError` (nothing is cut here). ``return_tensors="pt"`` gives ``torch.long`` tensors
    ``[B, T]``; None gives lists.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(s) for s in sequences]
    longest = max(lengths, default=0)
    if max_length is not None and longest > max_length:
        raise InputTooLongError(
            f"A sequence is {longest} tokens long, more than max_length={max_length}. Raise max_length or "
            "tokenize "
            "with truncation=True."
        )
    if padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        target = max_length
    elif padding == "longest":
        target = longest
    else:
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if pad_to_multiple_of:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    if labels is not None and [len(x) for x in labels] != lengths:
        raise ValueError("labels must have the same lengths as the sequences")

    def pad(seq: Sequence[int], value: int) -> list[int]:
        fill = [value] * (target - len(seq))
        return fill + list(seq) if padding_side == "left" else list(seq) + fill

    data: dict[str, Any] = {
        "input_ids": [pad(s, pad_token_id) for s in sequences],
        "attention_mask": [pad([1] * n, 0) for n in lengths],
    }
    if labels is not None:
        data["labels"] = [pad(x, label_pad_token_id) for x in labels]
    return BatchEncoding(data, tensor_type=return_tensors)


_RECORD_FIELDS = ("query", "answer", "think", "tool_call", "tool_use", "internal")


def _records(
    queries: Sequence[str | Mapping[str, Any]], answers: Sequence[str | None] | None, with_answer: bool
) -> list[dict[str, Any]]:
    out = []
    if answers is not None and len(answers) != len(queries):
        raise ValueError(f"got {len(queries)} queries but {len(answers)} answers")
    for n, q in enumerate(queries):
        if isinstance(q, Mapping):
            if answers is not None:
                raise ValueError("pass either record dicts or separate queries and answers, not both")
            rec = {k: q.get(k) for k in _RECORD_FIELDS}
        else:
            rec = dict.fromkeys(_RECORD_FIELDS)
            rec["query"] = q
            if with_answer and answers is not None:
                rec["answer"] = answers[n]
        out.append(rec)
    return out


def _encode_records(
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, Any]],
    fields: Sequence[str],
    split_special_tokens: bool = False,
):
    """Encode each field of all records with one tokenizer call per field."""
    return {f: _encode_texts(tokenizer, [r.get(f) for r in records], split_special_tokens) for f in fields}


def tokenize_queries(
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str | Mapping[str, Any]],
    max_length: int | None = None,
    *,
    truncation: bool = False,
    split_special_tokens: bool = False,
    padding: Literal["longest", "max_length"] = "longest",
    padding_side: Literal["left", "right"] = "right",
    pad_to_multiple_of: int | None = None,
    return_tensors: str | None = "pt",
) -> BatchEncoding:
    """Batch of rxlm-style queries ``[BOS]([I]..)?[Q]text`` (no ``[A]``), padded (right by default, like the
    reference's ``tokenize_batch``; its ``padding='max_length'`` is ``padding="max_length"`` here)."""
    marker = _marker_ids(tokenizer)
    recs = _records(queries, None, False)
    enc = _encode_records(tokenizer, recs, ("query", "internal"), split_special_tokens)
    limit = _resolve_max_length(tokenizer, max_length)
    seqs = []
    for n in range(len(recs)):
        sections, names = _prompt_sections(marker, enc["query"][n] or [], None, enc["internal"][n])
        seqs.append(_join(sections, limit, truncation, f"query #{n}", names)[0])
    return pad_sequences(
        seqs,
        pad_token_id=_pad_id(tokenizer),
        padding_side=padding_side,
        padding=padding,
        max_length=limit,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors=return_tensors,
    )


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str | Mapping[str, Any]],
    max_length: int | None = None,
    *,
    thinking_mode: Literal["fast", "extended", "auto"] = "fast",
    truncation: bool = False,
    split_special_tokens: bool = False,
    padding: Literal["longest", "max_length"] = "longest",
    padding_side: Literal["left", "right"] = "left",
    pad_to_multiple_of: int | None = None,
    return_tensors: str | None = "pt",
) -> BatchEncoding:
    """Batch of decoder prompts ``[BOS][Q]query[A]`` for ``generate``, **left**-padded by default.

    Items are query strings or record dicts with ``query``/``tool_use``/``internal``.
    """
    marker = _marker_ids(tokenizer)
    recs = _records(queries, None, False)
    enc = _encode_records(tokenizer, recs, ("query", "tool_use", "internal"), split_special_tokens)
    limit = _resolve_max_length(tokenizer, max_length)
    tail = _generation_marker(marker, thinking_mode)
    seqs = []
    for n in range(len(recs)):
        sections, names = _prompt_sections(marker, enc["query"][n], enc["tool_use"][n], enc["internal"][n])
        sections += list(tail)
        names = list(names) + [""] * len(tail)
        seqs.append(_join(sections, limit, truncation, f"prompt #{n}", names)[0])
    return pad_sequences(
        seqs,
        pad_token_id=_pad_id(tokenizer),
        padding_side=padding_side,
        padding=padding,
        max_length=limit,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors=return_tensors,
    )


def tokenize_interaction_records(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    max_length: int | None = None,
    *,
    truncation: bool = False,
    split_special_tokens: bool = False,
) -> tuple[list[list[int]], list[list[int]]]:
    """Unpadded ``(input_ids, labels)`` lists for many interaction records (dicts with the reference's fields
    ``query``, ``answer``, ``think``, ``tool_call``, ``tool_use``, ``internal``; missing ones are None).

    Same ids and labels as :func:`tokenize_interaction`, with one tokenizer call per field for the whole list.
    """
    marker = _marker_ids(tokenizer)
    recs = [{k: r.get(k) for k in _RECORD_FIELDS} for r in records]
    enc = _encode_records(tokenizer, recs, _RECORD_FIELDS, split_special_tokens)
    limit = _resolve_max_length(tokenizer, max_length)
    seqs, labels = [], []
    for n in range(len(recs)):
        sections, names = _interaction_sections(
            marker,
            enc["query"][n],
            enc["answer"][n],
            enc["think"][n],
            enc["tool_call"][n],
            enc["tool_use"][n],
            enc["internal"][n],
        )
        ids, trained = _join(sections, limit, truncation, f"interaction #{n}", names)
        seqs.append(ids)
        labels.append([i if t else -100 for i, t in zip(ids, trained)])
    return seqs, labels


def tokenize_interactions(
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str | Mapping[str, Any]],
    answers: Sequence[str | None] | None = None,
    max_length: int | None = None,
    *,
    truncation: bool = False,
    split_special_tokens: bool = False,
    return_labels: bool = False,
    padding: Literal["longest", "max_length"] = "longest",
    padding_side: Literal["left", "right"] = "right",
    pad_to_multiple_of: int | None = None,
    return_tensors: str | None = "pt",
) -> BatchEncoding:
    """Batch of full interactions (see :func:`tokenize_interaction`), right-padded by default.

    Either ``queries`` + ``answers`` (strings), or ``queries`` as record dicts with the reference's fields
    (``query``, ``answer``, ``think``, ``tool_call``, ``tool_use``, ``internal``). Padded ``labels`` are -100.
    """
    recs = _records(queries, answers, True)
    limit = _resolve_max_length(tokenizer, max_length)
    seqs, labels = tokenize_interaction_records(
        tokenizer, recs, limit, truncation=truncation, split_special_tokens=split_special_tokens
    )
    return pad_sequences(
        seqs,
        pad_token_id=_pad_id(tokenizer),
        padding_side=padding_side,
        padding=padding,
        max_length=limit,
        pad_to_multiple_of=pad_to_multiple_of,
        labels=labels if return_labels else None,
        return_tensors=return_tensors,
    )


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    pad = _token_id(tokenizer, PAD_TOKEN)
    return 0 if pad is None else pad


# ------------------------------------------------------------------------------------------------------------
# Stage 0: training and loading
# ------------------------------------------------------------------------------------------------------------


def _iter_texts(source: Any, text_column: str, batch_size: int) -> Iterable[list[str]]:
    """Batches of strings from a datasets.Dataset / DatasetDict / IterableDataset or an iterable of
    strings.
    """
    try:
        import datasets
    except ImportError:  # datasets is optional (the train extra): plain iterables work without it
        datasets = None
    if datasets is not None and isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in source:
            raise ValueError(f"DatasetDict has no 'train' split (splits: {list(source)}); pass one split")
        source = source["train"]
    if datasets is not None and isinstance(source, datasets.Dataset):
        if text_column not in source.column_names:
            raise ValueError(f"dataset has no column {text_column!r} (columns: {source.column_names})")
        for start in range(0, len(source), batch_size):
            yield [t for t in source[start : start + batch_size][text_column] if t]
        return
    if datasets is not None and isinstance(source, datasets.IterableDataset):
        batch: list[str] = []
        for row in source:
            if row.get(text_column):
                batch.append(row[text_column])
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    if isinstance(source, str):
        raise TypeError(
            "texts_or_dataset is a single string; pass a list of texts, a datasets.Dataset, or files=[paths]"
        )
    batch = []
    for t in source:
        if isinstance(t, Mapping):
            t = t.get(text_column)
        if t:
            batch.append(t)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_rxt_tokenizer(
    texts_or_dataset: Any = None,
    vocab_size: int = 8192,
    *,
    files: Sequence[str | os.PathLike] | None = None,
    text_column: str = "text",
    min_frequency: int = 2,
    extra_special_tokens: Sequence[str] = (),
    add_prefix_space: bool = False,
    model_max_length: int | None = None,
    batch_size: int = 1000,
    show_progress: bool = False,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Stage 0: train a byte-level BPE tokenizer for RxT and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts_or_dataset: training text: an iterable of strings (or of dicts with ``text_column``), a
            ``datasets.Dataset``/``IterableDataset``, or a ``DatasetDict`` (its ``train`` split is used).
        vocab_size: final vocabulary size including the 256 byte symbols and the special tokens.
        files: plain-text files to train on instead of (or in addition to) ``texts_or_dataset``.
        text_column: the text column of a dataset.
        min_frequency: minimum pair count for a merge.
        extra_special_tokens: more special tokens, placed after ``[I]`` (id 10) in order, e.g.
            ``("[CLS]", "[SEP]")`` for the reference fixture's layout.
        add_prefix_space: the ByteLevel pre-tokenizer option. False (default) keeps ``decode(encode(t)) == t``
            for text that follows a marker; the reference trained with True, which makes every segment after a
            marker start with a space token.
        model_max_length: stored on the tokenizer; helpers then refuse longer inputs by default.
        chat_template: the Jinja chat template saved with the tokenizer (None: :data:`RXT_CHAT_TEMPLATE`;
            ``""``: none).

    The special tokens are ``[PAD]=0 [UNK]=1 [BOS]=2 [EOS]=3 [MASK]=4 [Q]=5 [A]=6 [T]=7 [C]=8 [U]=9 [I]=10``,
    the reference's ids. ``tokenizer(text)`` wraps text as ``[BOS] text [EOS]`` (the reference's
    post-processor, used for pre-training text); every RxT helper and the chat template pass
    ``add_special_tokens=False``. A ByteLevel decoder is attached, so ``decode`` returns clean text.
    bos/eos/pad/unk/mask are set, the other markers are registered as extra special tokens
    (``skip_special_tokens=True`` drops them).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(RXT_SPECIAL_TOKENS) + [t for t in extra_special_tokens if t not in RXT_SPECIAL_TOKENS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs {len(alphabet)} byte symbols plus "
            f"{len(specials)} special tokens before any merge; use at least "
            f"{len(alphabet) + len(specials) + 1}."
        )
    if texts_or_dataset is None and not files:
        raise ValueError("pass training text (texts_or_dataset) or files=[...]")

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    if files:
        if texts_or_dataset is not None:
            # tokenizers trains from one source; fold the files into the iterator.
            def _all() -> Iterable[list[str]]:
                yield from _iter_texts(texts_or_dataset, text_column, batch_size)
                for f in files:
                    with open(f, encoding="utf-8") as fh:
                        yield [line for line in fh if line.strip()]

            tok.train_from_iterator(_all(), trainer=trainer)
        else:
            tok.train([os.fspath(f) for f in files], trainer=trainer)
    else:
        tok.train_from_iterator(_iter_texts(texts_or_dataset, text_column, batch_size), trainer=trainer)

    for i, t in enumerate(specials):
        if tok.token_to_id(t) != i:  # pragma: no cover - BpeTrainer puts specials first, in order
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} {BOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[
            (BOS_TOKEN, RXT_SPECIAL_TOKEN_IDS[BOS_TOKEN]),
            (EOS_TOKEN, RXT_SPECIAL_TOKEN_IDS[EOS_TOKEN]),
        ],
    )
    template = RXT_CHAT_TEMPLATE if chat_template is None else (chat_template or None)
    return _wrap(tok, chat_template=template, model_max_length=model_max_length)


def _wrap(tok: Any, *, chat_template: str | None, model_max_length: int | None) -> PreTrainedTokenizerFast:
    vocab = tok.get_vocab(with_added_tokens=True)
    named = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "mask_token": MASK_TOKEN,
    }
    kwargs: dict[str, Any] = {k: v for k, v in named.items() if v in vocab}
    extra = [
        t for t in (QUERY_TOKEN, ANSWER_TOKEN, THINK_TOKEN, TOOL_CALL_TOKEN, TOOL_USE_TOKEN, INTERNAL_TOKEN)
    ]
    kwargs["extra_special_tokens"] = [t for t in extra if t in vocab]
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def _ensure_byte_level_decoder(tokenizer: PreTrainedTokenizerFast) -> None:
    """Attach a ByteLevel decoder to a byte-level tokenizer saved without one (as the reference's are)."""
    from tokenizers import decoders

    backend = tokenizer.backend_tokenizer
    if backend.decoder is not None:
        return
    state = json.loads(backend.to_str())
    pre = state.get("pre_tokenizer") or {}
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", []) or []}
    if "ByteLevel" in kinds:
        backend.decoder = decoders.ByteLevel()


def load_rxt_tokenizer(
    path_or_repo: str | os.PathLike,
    *,
    chat_template: str | None = None,
    model_max_length: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> PreTrainedTokenizerFast:
    """Load an RxT tokenizer (ours or the reference's) as a ready ``PreTrainedTokenizerFast``.

    ``path_or_repo`` is a directory with ``tokenizer.json`` (and optionally ``tokenizer_config.json``), a path
    to a ``tokenizer.json`` file, or a Hub repo id (the reference's repos hold only ``tokenizer.json``). The
    result has bos/eos/pad/unk/mask set (the reference's wrapper leaves bos/eos unset), a ByteLevel decoder
    when the tokenizer is byte-level and has none (the reference sets none and string-patches 'Ġ' instead),
    and a chat template: its own if it has one, else ``chat_template`` or :data:`RXT_CHAT_TEMPLATE`. Ids are
    never changed. Raises ``ValueError`` if the RxT markers ``[BOS] [EOS] [Q] [A]`` are missing.
    """
    from tokenizers import Tokenizer

    path = Path(os.fspath(path_or_repo))
    hub_kwargs = {
        "revision": revision,
        "token": token,
        "cache_dir": cache_dir,
        "local_files_only": local_files_only,
    }
    tokenizer: PreTrainedTokenizerFast
    if path.is_file():
        tokenizer = _wrap(Tokenizer.from_file(str(path)), chat_template=None, model_max_length=None)
    elif path.is_dir():
        if (path / "tokenizer_config.json").is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
        elif (path / "tokenizer.json").is_file():
            tokenizer = _wrap(
                Tokenizer.from_file(str(path / "tokenizer.json")), chat_template=None, model_max_length=None
            )
        else:
            raise FileNotFoundError(f"{path} has no tokenizer.json")
    else:
        repo = os.fspath(path_or_repo)
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(repo, **hub_kwargs)
        except (OSError, ValueError, TypeError):
            # Reference repos have a bare tokenizer.json and no tokenizer_config.json.
            from huggingface_hub import hf_hub_download

            file = hf_hub_download(repo, "tokenizer.json", **hub_kwargs)
            tokenizer = _wrap(Tokenizer.from_file(file), chat_template=None, model_max_length=None)

    vocab = tokenizer.get_vocab()
    for attr, tok in (
        ("bos_token", BOS_TOKEN),
        ("eos_token", EOS_TOKEN),
        ("pad_token", PAD_TOKEN),
        ("unk_token", UNK_TOKEN),
        ("mask_token", MASK_TOKEN),
    ):
        if getattr(tokenizer, attr) is None and tok in vocab:
            setattr(tokenizer, attr, tok)
    _marker_ids(tokenizer)  # validates [BOS] [EOS] [Q] [A]
    _ensure_byte_level_decoder(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template or RXT_CHAT_TEMPLATE
    elif chat_template is not None:
        tokenizer.chat_template = chat_template
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer
