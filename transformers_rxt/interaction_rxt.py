"""rxlm-compatible conveniences for users coming from the reference implementation.

Thin layers over `generate`, `STMCache` and the tokenizer helpers; there is no second decoding loop.
Differences from rxlm 0.3.80 (all deliberate):

* the state is an `STMCache` the caller passes in (`stm=`); the model keeps none, so one model serves
  many conversations;
* decoding positions are correct (the reference's single-stream `interact` places every generated token one
  position too far);
* `batch_interact` works (the reference's crashes); as there, finished rows repeat their last id;
* the memory update starts as soon as the answer is complete, whether or not the caller keeps iterating
  (the reference only updates if the generator is drained past -1); -1 is yielded when it starts and -2
  when it has finished. The answer is streamed from a non-daemon thread in the caller's torch context
  (autocast, inference mode, thread count), so a script may stop iterating and exit: the interpreter
  finishes the answer and its update first;
* RxTBeta `thinking_mode="auto"` chooses between [A] and [T] once, at the first step.

`RxTInteractor(model, tokenizer)` is a facade over the model, not part of its class hierarchy: a saved model's
code (remote code) does not include it. The model's `interact`, `batch_interact`, `init_stm_state`,
`tokenize_query`, `tokenize_full_interaction` and `stringify_token` delegate to it, for rxlm users' call sites.
"""

from __future__ import annotations

import queue
from typing import Iterator, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .cache_rxt import STMCache, start_thread
from .tokenization_rxt import tokenize_interaction, tokenize_query

MEMORY_UPDATE_STARTED = -1
MEMORY_UPDATE_FINISHED = -2


class _QueueStreamer:
    """A `generate` streamer that hands each step's tokens to a consumer thread (the prompt is skipped)."""

    def __init__(self):
        self.queue: "queue.Queue" = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).clone())

    def end(self) -> None:
        self.queue.put(None)


class _RowLengthLimit(StoppingCriteria):
    """Stop each row when its own real length (prompt without padding + answer) reaches `max_len`."""

    def __init__(self, prompt_lengths: torch.Tensor, padded_prompt_len: int, max_len: int):
        self.prompt_lengths, self.padded_prompt_len, self.max_len = prompt_lengths, padded_prompt_len, max_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.padded_prompt_len
        return (self.prompt_lengths.to(input_ids.device) + generated) >= self.max_len


def _sampling_kwargs(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> dict:
    """The reference's sampler settings as `generate` arguments (it always samples; top_k=1 is greedy)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use top_k=1 for greedy decoding, as with rxlm)")
    if top_k == 1:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": 1.0 if top_p is None else top_p}


class RxTInteractor:
    """rxlm's RxTAlpha/RxTBeta conversation API over an RxT model: `interact`, `batch_interact`, `init_stm_state`
    and the tokenize/stringify helpers.

    Args:
        model: an `RxTForConversationalGeneration` (the package class or its remote-code copy).
        tokenizer: the model's tokenizer, needed by the text helpers (`tokenize_query`, `stringify_token`, ...).
    """

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.model.config

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this helper needs a tokenizer: pass it as RxTInteractor(model, tokenizer) (or call "
                             "model.set_tokenizer(tokenizer) before the model's own helpers)")
        return self.tokenizer

    # ------------------------------------------------------------------ text helpers
    def tokenize_query(self, text: str, max_seq_len: int = 256, device=None) -> dict:
        """`[BOS][Q]text` (no [A]; `interact` appends it), as tensors [1, T]."""
        enc = tokenize_query(self._require_tokenizer(), text, max_length=max_seq_len, return_tensors="pt")
        return {k: v.to(device or self.model.device) for k, v in enc.items()}

    def tokenize_full_interaction(self, query: str, answer: str, max_seq_len: int = 256, device=None, **extra) -> dict:
        """`[BOS][Q]query[A]answer[EOS]` (Beta: thinking/tool/internal sections via keyword arguments)."""
        enc = tokenize_interaction(self._require_tokenizer(), query, answer, max_length=max_seq_len,
                                   return_tensors="pt", **extra)
        return {k: v.to(device or self.model.device) for k, v in enc.items()}

    def stringify_token(self, token_id: int, skip_special_tokens: bool = True, show_memory_update: bool = False) -> str:
        """Text of one yielded id; -1/-2 become memory-update markers (or nothing)."""
        if token_id == MEMORY_UPDATE_STARTED:
            return "\n[Memory update]" if show_memory_update else ""
        if token_id == MEMORY_UPDATE_FINISHED:
            return "\n[Memory updated]" if show_memory_update else ""
        return self._require_tokenizer().decode([int(token_id)], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ memory
    def init_stm_state(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                       stm: Optional[STMCache] = None) -> STMCache:
        """One memory update with a text (e.g. a system prompt as an interaction) on `stm` or on a fresh memory."""
        stm = self.model.init_memory(input_ids.shape[0]) if stm is None else stm
        return self.model.update_memory(input_ids=input_ids, attention_mask=attention_mask, stm=stm)

    # ------------------------------------------------------------------ generation
    def _start_marker(self, prompt: torch.LongTensor, stm: STMCache, thinking_mode: Optional[str]) -> int:
        """[A] normally; RxTBeta's [T] for 'extended'; for 'auto' whichever the model prefers at the first step."""
        answer = self.config.answer_token_id
        if thinking_mode in (None, "fast"):
            return answer
        think = self.config.think_token_id
        if think is None:
            raise ValueError("thinking modes need an RxTBeta model (config.think_token_id is not set)")
        if thinking_mode == "extended":
            return think
        if thinking_mode != "auto":
            raise ValueError(f"thinking_mode={thinking_mode!r}; expected 'fast', 'extended' or 'auto'")
        with torch.no_grad():
            logits = self.model(input_ids=prompt, stm=stm, logits_to_keep=1).logits[0, -1]
        return think if logits[think] >= logits[answer] else answer  # a tie goes to [T], as in the reference

    def interact(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                 stm: Optional[STMCache] = None, max_seq_len: int = 256, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, thinking_mode: Optional[str] = None,
                 memory_update: str = "async", **generate_kwargs) -> Iterator[int]:
        """Stream one answer: yields token ids, then -1 when the memory update starts and -2 when it is done.

        `input_ids` is rxlm's `tokenize_query` output, `[BOS][Q]query` (batch 1); the answer marker is appended
        here (and, for RxTBeta thinking modes, yielded first). `stm` is updated with the full interaction.
        """
        if not isinstance(stm, STMCache):
            raise ValueError("interact needs the conversation state as an STMCache (its update runs in the "
                             "background): pass stm=model.init_memory() or stm=STMCache(memory)")
        self.model._check_token_ids(input_ids, attention_mask, "input_ids")
        if input_ids.shape[0] != 1:
            raise ValueError(f"interact streams one conversation; got a batch of {input_ids.shape[0]} "
                             "(use batch_interact or generate for batches)")
        if attention_mask is not None:
            input_ids = input_ids[:, attention_mask[0].bool()]
        stm.wait()
        marker = self._start_marker(input_ids, stm, thinking_mode)
        prompt = torch.cat([input_ids, input_ids.new_tensor([[marker]])], dim=1)
        if thinking_mode in ("extended", "auto", "fast") and self.config.think_token_id is not None:
            yield marker
        max_new = max_seq_len - prompt.shape[1]
        if max_new <= 0:
            raise ValueError(f"the query takes {prompt.shape[1]} tokens with its marker; max_seq_len={max_seq_len} "
                             "leaves no room for an answer")
        streamer = _QueueStreamer()
        failure: list = []

        def run() -> None:
            try:
                self.model.generate(prompt, stm=stm, max_new_tokens=max_new, streamer=streamer, memory_update=memory_update,
                              **_sampling_kwargs(temperature, top_k, top_p), **generate_kwargs)
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread
                failure.append(error)
                streamer.end()

        # Joined at interpreter exit even if the caller stops iterating (see `start_thread`).
        worker = start_thread(run, name="rxt-interact")
        eos = self.config.eos_token_id
        while (step := streamer.queue.get()) is not None:
            token = int(step[0])
            yield token
            if token == eos:
                break
        worker.join()
        if failure:
            raise failure[0]
        if memory_update == "none":
            return
        yield MEMORY_UPDATE_STARTED
        stm.wait()
        yield MEMORY_UPDATE_FINISHED

    def batch_interact(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, stm: STMCache,
                       max_seq_len: int = 256, temperature: float = 1.0, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, memory_update: str = "sync",
                       **generate_kwargs) -> Iterator[torch.Tensor]:
        """rxlm-style batch: right-padded `[BOS][Q]query` rows in; yields per-step ids [B], then -1s and -2s.

        Each row stops at EOS or when its own length reaches `max_seq_len`; finished rows repeat their last id.
        The caller's tensors are not modified.
        """
        if not isinstance(stm, STMCache):
            raise ValueError("batch_interact needs the conversations' state as an STMCache: pass "
                             "stm=model.init_memory(batch_size) or stm=STMCache(memory)")
        self.model._check_token_ids(input_ids, attention_mask, "input_ids")
        lengths = attention_mask.long().sum(dim=1)
        batch = input_ids.shape[0]
        width = int(lengths.max()) + 1
        prompt = input_ids.new_full((batch, width), self.config.pad_token_id)
        prompt_mask = torch.zeros_like(prompt)
        for row in range(batch):  # left-pad each row's real tokens + [A]
            n = int(lengths[row])
            real = input_ids[row][attention_mask[row].bool()]
            prompt[row, width - n - 1:width - 1] = real
            prompt[row, -1] = self.config.answer_token_id
            prompt_mask[row, width - n - 1:] = 1
        max_new = max_seq_len - int(lengths.min()) - 1
        if max_new <= 0:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for an answer after the queries")
        limit = _RowLengthLimit(lengths + 1, width, max_seq_len)
        criteria = StoppingCriteriaList([limit] + list(generate_kwargs.pop("stopping_criteria", [])))
        streamer = _QueueStreamer()
        self.model.generate(prompt, attention_mask=prompt_mask, stm=stm, max_new_tokens=max_new, streamer=streamer,
                      stopping_criteria=criteria, memory_update=memory_update,
                      **_sampling_kwargs(temperature, top_k, top_p), **generate_kwargs)
        finished = torch.zeros(batch, dtype=torch.bool)
        last = torch.zeros(batch, dtype=torch.long)
        row_lengths = lengths.cpu() + 1
        while (step := streamer.queue.get()) is not None:
            # As in the reference, a finished row keeps repeating its last id.
            last = torch.where(finished, last, step.cpu())
            row_lengths += 1
            finished |= (last == self.config.eos_token_id) | (row_lengths >= max_seq_len)
            yield last.clone()
        yield torch.full((batch,), MEMORY_UPDATE_STARTED, dtype=torch.long)
        stm.wait()
        yield torch.full((batch,), MEMORY_UPDATE_FINISHED, dtype=torch.long)
