"""`pipeline("text-generation")` for RxT: a chat history is written into a fresh memory, then answered.

RxT reads earlier turns from its short-term memory, never as tokens, so a chat cannot be rendered into one
prompt as for a decoder-only model. For a chat `[system?, user, assistant, ..., user]` the pipeline

1. renders every earlier turn with the tokenizer's chat template (the system prompt as its own interaction,
   each user/assistant pair as `[BOS][Q]query[A]answer[EOS]`) and writes them, in order, into a fresh STM
   (`model.init_memory(1)`) through `model.update_memory`, the model's one memory-update path;
2. answers the last user message (`[BOS][Q]query[A]`) through `model.generate(..., stm=stm)`, the model's
   one decoding path, with `memory_update="none"`: the memory is the pipeline's scratch state and is
   discarded.

A plain string is the query of a first turn, answered from a fresh memory. A fresh memory is initialised as
the config's `stm_init_type` says (random for "standard"): seed torch for reproducible answers. To carry a
memory across calls, use `model.generate(..., stm=stm)` directly.

Why this extension point: transformers chooses the pipeline class per *task*; for a model instance nothing
model-specific takes part (a config's `custom_pipelines` is read only for checkpoints loaded by name with
remote code), and `TextGenerationPipeline._forward` calls `model.generate(input_ids, attention_mask)` with
nothing that could carry a memory, while a bare `generate` without `stm` must keep refusing. So the package
registers, as the "text-generation" task's implementation, a subclass of transformers' own
`TextGenerationPipeline` that overrides only `preprocess` (render the last query, tokenize the earlier
turns) and `_forward` (write them, then call the parent's `_forward` with `stm=`); `postprocess`
(`generated_text`, `return_full_text`, chat output) is the parent's. For any other model every method is the
parent's, unchanged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.text_generation import TextGenerationPipeline
from transformers.utils.chat_template_utils import Chat

from .cache_rxt import STMCache
from .tokenization_rxt import _content_text

_TASK = "text-generation"
_PARENT_IMPL = (TextGenerationPipeline, "transformers.pipelines.text_generation.TextGenerationPipeline")


@dataclass(frozen=True)
class ChatHistory:
    """The token ids of one conversation's earlier interactions, oldest first (system prompt included).

    A plain object, not a tensor or list, so that the pipeline's batch collation passes it through as is (one per
    conversation) instead of padding it."""

    interactions: tuple[tuple[int, ...], ...]


def split_chat(messages: Sequence[Mapping[str, Any]]) -> tuple[list[list[dict]], dict]:
    """Check a chat and split it into the earlier interactions (each a list of messages to render on its own) and
    the last user message.

    Accepted: optional system messages first, then user and assistant messages alternating, starting and ending
    with a user message, every content a non-empty text. Anything else raises a `ValueError` that names the
    message and the fix.
    """
    if not messages:
        raise ValueError("the chat is empty: pass at least one {'role': 'user', 'content': ...} message")
    history: list[list[dict]] = []
    expected = "user"
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {index} has role {role!r}: the RxT text-generation pipeline takes system, user "
                             "and assistant messages (for tool results and internal instructions render the turn "
                             "with transformers_rxt.tokenize_prompt and call model.generate with an STMCache)")
        if not _content_text(message.get("content")).strip():
            raise ValueError(f"message {index} ({role}) has no text content: every message must say something; drop "
                             "it or fill it in")
        if role == "system":
            if index > 0 and messages[index - 1].get("role") != "system":
                raise ValueError(f"message {index} is a system message after the conversation started: put the "
                                 "system prompt first (it initialises the memory)")
            history.append([dict(message)])
            continue
        if role != expected:
            raise ValueError(f"message {index} is a {role} message where a {expected} message must come: user and "
                             "assistant messages must alternate, starting and ending with a user message (merge "
                             "consecutive messages of the same role, or drop the unanswered one)")
        if role == "user":
            history.append([dict(message)])
        else:
            history[-1].append(dict(message))
        expected = "assistant" if role == "user" else "user"
    if expected != "assistant":
        last = "no user message" if not history or history[-1][0]["role"] == "system" else "an assistant message"
        raise ValueError(f"the chat ends with {last}: RxT answers the last user message; end the chat with one "
                         "(continuing a prefilled assistant answer is not supported)")
    return history[:-1], history[-1][0]


class RxTTextGenerationPipeline(TextGenerationPipeline):
    """transformers' `TextGenerationPipeline`, with RxT's semantics for a chat history (see the module docstring).

    Differences for an RxT model: no default `max_new_tokens` (the answer may run to the end of the model's
    interaction window, as in `generate`); `prefix`, `handle_long_generation`, `tools`, `documents`,
    `continue_final_message=True` and `stm`/`memory_update` arguments are refused with a clear error.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._is_rxt and hasattr(self, "_generation_defaults"):
            # The parent's 256 new tokens exceed a small model's interaction window, which generate refuses.
            self._generation_defaults.pop("max_new_tokens", None)

    @property
    def _is_rxt(self) -> bool:
        # By model type, not class: a checkpoint loaded with trust_remote_code has its own copy of the class.
        return getattr(self.model.config, "model_type", None) == "rxt"

    def preprocess(self, prompt_text, prefix="", handle_long_generation=None, add_special_tokens=None,
                   truncation=None, padding=None, max_length=None, continue_final_message=None,
                   tokenizer_encode_kwargs=None, tools=None, documents=None, **generate_kwargs):
        if not self._is_rxt:
            return super().preprocess(
                prompt_text, prefix=prefix, handle_long_generation=handle_long_generation,
                add_special_tokens=add_special_tokens, truncation=truncation, padding=padding, max_length=max_length,
                continue_final_message=continue_final_message, tokenizer_encode_kwargs=tokenizer_encode_kwargs,
                tools=tools, documents=documents, **generate_kwargs)
        unsupported = {"prefix": prefix, "handle_long_generation": handle_long_generation, "tools": tools,
                       "documents": documents, "continue_final_message": continue_final_message,
                       "stm": generate_kwargs.get("stm"), "memory_update": generate_kwargs.get("memory_update")}
        given = [name for name, value in unsupported.items() if value]
        if given:
            raise ValueError(f"the RxT text-generation pipeline does not take {given}: it writes the chat's earlier "
                             "turns into a fresh memory and answers the last user message. To continue your own "
                             "STMCache, call model.generate(..., stm=stm) directly")
        messages = [{"role": "user", "content": prompt_text}] if isinstance(prompt_text, str) else prompt_text.messages
        history, query = split_chat(messages)
        kwargs = {key: value for key, value in {"truncation": truncation, "padding": padding,
                                                "max_length": max_length}.items() if value is not None}
        kwargs.update(tokenizer_encode_kwargs or {})
        interactions = tuple(tuple(self._render(turn, False, kwargs)["input_ids"]) for turn in history)
        inputs = self._render([query], True, dict(kwargs, return_tensors="pt"))
        inputs["prompt_text"] = prompt_text
        inputs["rxt_history"] = ChatHistory(interactions)
        return inputs

    def _render(self, messages: list[dict], add_generation_prompt: bool, kwargs: dict):
        """One interaction through the tokenizer's chat template (what the user configured, e.g. system_format)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=True, **kwargs)

    def _forward(self, model_inputs, **generate_kwargs):
        if not self._is_rxt:
            return super()._forward(model_inputs, **generate_kwargs)
        histories = model_inputs.pop("rxt_history")  # one ChatHistory, or a list of them for a batch
        stm = self.memory_from_history(histories if isinstance(histories, list) else [histories])
        return super()._forward(model_inputs, stm=stm, memory_update="none", **generate_kwargs)

    def memory_from_history(self, histories: Sequence[ChatHistory]) -> STMCache:
        """One fresh STM row per conversation, with its earlier interactions written in order (batch 1 each: the
        conversations have different numbers of turns)."""
        rows = [write_history(self.model, self.model.init_memory(1), history.interactions) for history in histories]
        return type(rows[0]).cat(rows)  # the model's own STMCache class (remote code has its own copy)


def write_history(model, stm: STMCache, interactions: Sequence[Sequence[int]]) -> STMCache:
    """Write a conversation's earlier interactions (token ids, oldest first) into its one-row `stm`, in order,
    through `model.update_memory`; shared by the pipeline and `rxt serve`'s `/v1/chat/completions`."""
    for ids in interactions:
        model.update_memory(torch.tensor([list(ids)], device=model.device), stm=stm)
    return stm


def register_text_generation_pipeline() -> None:
    """Make `RxTTextGenerationPipeline` the implementation of transformers' "text-generation" task.

    Only the task's class changes (its default model and model classes stay); a task already re-registered by
    someone else is left alone. The registry's `register_pipeline` is not used: it would also mark the class as a
    custom pipeline, which `Pipeline.save_pretrained` then writes into every saved model's config.
    """
    entry = PIPELINE_REGISTRY.supported_tasks[_TASK]
    if entry["impl"] in _PARENT_IMPL:
        entry["impl"] = RxTTextGenerationPipeline


__all__ = ["ChatHistory", "RxTTextGenerationPipeline", "register_text_generation_pipeline", "split_chat",
           "write_history"]
