"""Batch collators for the RxT curriculum.

All collators take lists of tokenized features (``datasets`` rows from
:mod:`transformers_rxt.data.formats`) and return dicts of ``torch.long`` tensors, right-padded by default.

Label conventions (HF): ``labels`` are aligned with ``input_ids`` (the model shifts them) and -100 marks
tokens that are not trained. Padding is never trained (the reference trains pad targets in stage 1; we do
not).

Which decoder tokens are trained:

- pre-training text (stage 1): every real (non-pad) token;
- interactions (stages 2, 4): the answer side, i.e. ``[T]``/``[A]``/``[C]`` sections *with* their markers and
  the final ``[EOS]``; ``[BOS]`` and the query side (``[I]``, ``[Q]``, ``[U]``) are -100. This is the
  reference's stage-4 (SMAT) and RxT-Beta SFT masking. (Its Alpha ``JointSftDataset`` also drops ``[A]`` and
  ``[EOS]``; without ``[EOS]`` the model never learns to stop, so we keep it.) The tokenization step writes
  these ``labels``; ``train_on_all_tokens=True`` on a collator ignores them and trains the whole interaction
  instead.

Encoder MLM masking differs from the reference on purpose: it never selects special tokens (markers,
``[BOS]``, ``[EOS]``) or padding, and replaces selected tokens 80/10/10 (``[MASK]``/random/unchanged) like
BERT. The reference's scheme (every non-pad token selectable, 100 % ``[MASK]``) is ``mask_replace_prob=1.0,
random_replace_prob=0.0`` (specials still excluded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..tokenization_rxt import (
    ANSWER_TOKEN,
    MASK_TOKEN,
    RXT_SPECIAL_TOKENS,
    THINK_TOKEN,
    TOOL_CALL_TOKEN,
    InputTooLongError,
)

__all__ = [
    "DataCollatorForRxTDecoder",
    "DataCollatorForRxTMLM",
    "DataCollatorForJointLM",
    "DataCollatorForRxTEpisodes",
    "select_turn",
]


def _target_length(lengths: Sequence[int], max_length: int | None, pad_to_multiple_of: int | None) -> int:
    longest = max(lengths, default=0)
    if max_length is not None and longest > max_length:
        raise InputTooLongError(
            f"A sequence in the batch is {longest} tokens long, more than max_length={max_length}. Tokenize "
            "with a matching max_length (and truncation=True if cutting is acceptable) or raise max_length."
        )
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _pad_2d(
    rows: Sequence[Sequence[int]], length: int, value: int, side: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    t = torch.full((len(rows), length), value, dtype=torch.long) if out is None else out
    for i, r in enumerate(rows):
        if not len(r):
            continue
        r = torch.as_tensor(r, dtype=torch.long)
        if side == "right":
            t[i, : len(r)] = r
        else:
            t[i, length - len(r) :] = r
    return t


def _as_list(x: Any) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _special_ids_of(tokenizer: Any) -> list[int]:
    """Every special id of a tokenizer: named/extra special tokens, added tokens marked special, RxT
    markers.
    """
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    for token, i in zip(RXT_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(RXT_SPECIAL_TOKENS))):
        if i is not None and tokenizer.convert_ids_to_tokens(i) == token:
            ids.add(i)
    return sorted(ids)


@dataclass
class DataCollatorForRxTDecoder:
    """Pads decoder LM features (``input_ids`` and optional ``labels``) into ``input_ids``,
    ``attention_mask``, ``labels``.

    Without ``labels`` in a feature (pre-training text) every real token is trained; with them (interactions
    from :func:`~transformers_rxt.data.tokenize_sft_dataset`) they are used as given. Padding gets
    ``label_pad_token_id``. ``max_length`` is a check (longer rows raise), never a cut.
    """

    pad_token_id: int = 0
    label_pad_token_id: int = -100
    padding_side: Literal["left", "right"] = "right"
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    train_on_all_tokens: bool = False

    def _pad(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [_as_list(f["input_ids"]) for f in features]
        length = _target_length([len(x) for x in ids], self.max_length, self.pad_to_multiple_of)
        input_ids = _pad_2d(ids, length, self.pad_token_id, self.padding_side)
        attention_mask = _pad_2d([[1] * len(x) for x in ids], length, 0, self.padding_side)
        if self.train_on_all_tokens or any("labels" not in f or f["labels"] is None for f in features):
            labels = input_ids.masked_fill(attention_mask == 0, self.label_pad_token_id)
            if not self.train_on_all_tokens and any(f.get("labels") is not None for f in features):
                # Mixed batch: rows that brought labels keep them.
                for i, f in enumerate(features):
                    if f.get("labels") is not None:
                        _pad_2d(
                            [_as_list(f["labels"])],
                            length,
                            self.label_pad_token_id,
                            self.padding_side,
                            out=labels[i : i + 1],
                        )
        else:
            labels = _pad_2d(
                [_as_list(f["labels"]) for f in features], length, self.label_pad_token_id, self.padding_side
            )
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return self._pad(features)


@dataclass
class DataCollatorForRxTMLM:
    """Encoder MLM: pads ``input_ids`` and masks them -> ``input_ids`` (masked), ``attention_mask``,
    ``labels`` (original ids at selected positions, -100 elsewhere).

    Each real, non-special token is selected with ``mlm_probability``; a selected token becomes ``[MASK]``
    with ``mask_replace_prob``, a random non-special token with ``random_replace_prob``, and stays unchanged
    otherwise. With ``ensure_masked`` a row that drew no selection but has maskable tokens gets one (so the
    MLM loss of short rows and tiny batches is never empty). Use :meth:`from_tokenizer` to fill the ids.
    Randomness comes from ``generator`` if given, else torch's global RNG (seeded by ``Trainer``).
    """

    mask_token_id: int = 4
    pad_token_id: int = 0
    vocab_size: int | None = None
    special_token_ids: Sequence[int] = tuple(range(len(RXT_SPECIAL_TOKENS)))
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    ensure_masked: bool = True
    padding_side: Literal["left", "right"] = "right"
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    label_pad_token_id: int = -100
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1], got {self.mlm_probability}")
        if (
            self.mask_replace_prob < 0
            or self.random_replace_prob < 0
            or (self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9)
        ):
            raise ValueError("mask_replace_prob and random_replace_prob must be >= 0 and sum to at most 1")
        if self.random_replace_prob > 0 and self.vocab_size is None:
            raise ValueError(
                "random_replace_prob > 0 needs vocab_size (or use DataCollatorForRxTMLM.from_tokenizer)"
            )
        specials = set(self.special_token_ids) | {self.pad_token_id, self.mask_token_id}
        self._special = torch.tensor(sorted(specials), dtype=torch.long)
        if self.vocab_size is not None:
            allowed = torch.ones(self.vocab_size, dtype=torch.bool)
            allowed[self._special[self._special < self.vocab_size]] = False
            self._random_pool = allowed.nonzero().flatten()
            if self.random_replace_prob > 0 and self._random_pool.numel() == 0:
                raise ValueError("the vocabulary has no non-special token to use for random replacement")
        else:
            self._random_pool = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> DataCollatorForRxTMLM:
        """Take ``mask_token_id``, ``pad_token_id``, ``vocab_size`` (``len(tokenizer)``) and the special ids
        from an RxT tokenizer; ``kwargs`` override."""
        mask = tokenizer.mask_token_id
        if mask is None:
            mask = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        defaults = {
            "mask_token_id": mask,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            "vocab_size": len(tokenizer),
            "special_token_ids": tuple(_special_ids_of(tokenizer)),
        }
        defaults.update(kwargs)
        return cls(**defaults)

    def mask_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(masked_input_ids, labels)`` for a padded batch (the inputs are not modified)."""
        g = self.generator
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self._special.to(input_ids.device))
        probs = torch.full(input_ids.shape, self.mlm_probability)
        selected = (torch.rand(input_ids.shape, generator=g) < probs) & maskable
        if self.ensure_masked and self.mlm_probability > 0:
            empty = ~selected.any(dim=1) & maskable.any(dim=1)
            if empty.any():
                # Pick one maskable position uniformly in each empty row.
                scores = torch.rand(input_ids.shape, generator=g).masked_fill(~maskable, -1.0)
                pick = scores.argmax(dim=1)
                rows = empty.nonzero().flatten()
                selected[rows, pick[rows]] = True
        labels = input_ids.masked_fill(~selected, self.label_pad_token_id)
        masked = input_ids.clone()
        draw = torch.rand(input_ids.shape, generator=g)
        to_mask = selected & (draw < self.mask_replace_prob)
        to_random = (
            selected
            & (draw >= self.mask_replace_prob)
            & (draw < self.mask_replace_prob + self.random_replace_prob)
        )
        masked[to_mask] = self.mask_token_id
        n_random = int(to_random.sum())
        if n_random:
            pool = self._random_pool
            picks = torch.randint(len(pool), (n_random,), generator=g)
            masked[to_random] = pool[picks]
        return masked, labels

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [_as_list(f["input_ids"]) for f in features]
        length = _target_length([len(x) for x in ids], self.max_length, self.pad_to_multiple_of)
        input_ids = _pad_2d(ids, length, self.pad_token_id, self.padding_side)
        attention_mask = _pad_2d([[1] * len(x) for x in ids], length, 0, self.padding_side)
        masked, labels = self.mask_tokens(input_ids, attention_mask)
        return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


@dataclass
class DataCollatorForJointLM(DataCollatorForRxTMLM):
    """Stages 1-2 (joint LM pre-training / interaction SFT): one padded batch, two views of it.

    Returns ``encoder_input_ids`` (MLM-masked), ``encoder_labels`` (MLM targets, -100 elsewhere),
    ``decoder_input_ids`` (the clean ids), ``decoder_labels`` (see the module docstring: all real tokens for
    text, the feature's ``labels`` for interactions) and the shared ``attention_mask`` [B, T].
    """

    train_on_all_tokens: bool = False

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        dec = DataCollatorForRxTDecoder(
            pad_token_id=self.pad_token_id,
            label_pad_token_id=self.label_pad_token_id,
            padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
            max_length=self.max_length,
            train_on_all_tokens=self.train_on_all_tokens,
        )(features)
        masked, mlm_labels = self.mask_tokens(dec["input_ids"], dec["attention_mask"])
        return {
            "encoder_input_ids": masked,
            "encoder_labels": mlm_labels,
            "decoder_input_ids": dec["input_ids"],
            "decoder_labels": dec["labels"],
            "attention_mask": dec["attention_mask"],
        }


@dataclass
class DataCollatorForRxTEpisodes:
    """Multi-turn episodes (stages 3-5) -> batch-first per-turn tensors.

    Features come from :func:`~transformers_rxt.data.tokenize_mrl_dataset` (``turn_input_ids``, optional
    ``turn_labels``, optional ``system_input_ids``). Returns, with ``B`` episodes, ``N`` turns (the longest
    episode, or ``max_turns``) and ``T`` the longest turn in the batch:

    - ``input_ids`` [B, N, T]: each turn's full interaction ``[BOS][Q]query[A]answer[EOS]``, right-padded. It
      is both the decoder's teacher-forcing input and the memory-update (encoder) input of that turn;
    - ``attention_mask`` [B, N, T];
    - ``labels`` [B, N, T]: answer-side labels (-100 on query side and padding);
    - ``turn_mask`` [B, N]: 1 where the episode has that turn. Rows with 0 are all padding: keep their memory
      unchanged and skip them in losses (their labels are all -100);
    - ``prompt_lengths`` [B, N]: length of ``[BOS][Q]query[A]`` (up to and including the first answer-side
      marker ``[A]``/``[T]``/``[C]``), i.e. ``input_ids[b, k, :prompt_lengths[b, k]]`` is the ``generate``
      prompt;
    - if any feature has a system prompt: ``system_input_ids``/``system_attention_mask`` [B, S] and
      ``has_system`` [B];
    - if the features have reviews (``review_input_ids`` from :func:`tokenize_mrl_dataset`):
      ``review_input_ids``/``review_attention_mask``/``review_labels`` [B, N + 1, R] and ``review_mask``
      [B, N + 1]: entry k is a question asked of the memory before turn k (after turns 0 .. k-1 are written),
      never written into it.

    Batch-first keeps ``Trainer``/``accelerate`` batch splitting correct; take one turn with
    :func:`select_turn`. ``truncate_to_shortest=True`` reproduces the reference's collate (all episodes cut to
    the shortest one).
    """

    pad_token_id: int = 0
    label_pad_token_id: int = -100
    answer_marker_ids: Sequence[int] = (6, 7, 8)
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    max_turns: int | None = None
    truncate_to_shortest: bool = False
    train_on_all_tokens: bool = False

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> DataCollatorForRxTEpisodes:
        """Fill ``pad_token_id`` and ``answer_marker_ids`` from an RxT tokenizer."""
        markers = [
            i
            for t in (ANSWER_TOKEN, THINK_TOKEN, TOOL_CALL_TOKEN)
            if (i := tokenizer.convert_tokens_to_ids(t)) is not None
            and tokenizer.convert_ids_to_tokens(i) == t
        ]
        defaults = {
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            "answer_marker_ids": tuple(markers),
        }
        defaults.update(kwargs)
        return cls(**defaults)

    def _prompt_length(self, ids: Sequence[int]) -> int:
        markers = set(self.answer_marker_ids)
        for i, t in enumerate(ids):
            if t in markers:
                return i + 1
        return len(ids)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        episodes = []
        for f in features:
            if "turn_input_ids" not in f:
                raise KeyError(
                    "episode features need 'turn_input_ids'; tokenize the episodes with "
                    "tokenize_mrl_dataset()"
                )
            ids = [_as_list(x) for x in f["turn_input_ids"]]
            if self.train_on_all_tokens or f.get("turn_labels") is None:
                labels = [list(x) for x in ids]
            else:
                labels = [_as_list(x) for x in f["turn_labels"]]
            episodes.append((ids, labels))
        counts = [len(e[0]) for e in episodes]
        n_turns = min(counts) if self.truncate_to_shortest else max(counts, default=0)
        if self.max_turns is not None:
            n_turns = min(n_turns, self.max_turns)
        input_ids, attention_mask, labels, turn_mask = self._pad_slots(
            [ids for ids, _ in episodes], [labs for _, labs in episodes], n_turns
        )
        prompt_lengths = torch.zeros((len(episodes), n_turns), dtype=torch.long)
        for i, (ids, _) in enumerate(episodes):
            for k, turn in enumerate(ids[:n_turns]):
                prompt_lengths[i, k] = self._prompt_length(turn)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "turn_mask": turn_mask,
            "prompt_lengths": prompt_lengths,
        }
        if any(f.get("system_input_ids") for f in features):
            sys_ids = [_as_list(f.get("system_input_ids") or []) for f in features]
            s_len = _target_length([len(x) for x in sys_ids], self.max_length, self.pad_to_multiple_of)
            batch["system_input_ids"] = _pad_2d(sys_ids, s_len, self.pad_token_id, "right")
            batch["system_attention_mask"] = _pad_2d([[1] * len(x) for x in sys_ids], s_len, 0, "right")
            batch["has_system"] = torch.tensor([int(bool(x)) for x in sys_ids], dtype=torch.long)
        if any(f.get("review_input_ids") for f in features):
            batch.update(self._reviews(features, n_turns))
        return batch

    def _pad_slots(
        self, seqs: Sequence[Sequence[list[int]]], labels: Sequence[Sequence[list[int]]], n_slots: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row up to ``n_slots`` token lists (an empty list: nothing in that slot), right-padded: ids,
        attention mask and labels [B, n_slots, T], and the mask of filled slots [B, n_slots]."""
        lengths = [len(x) for row in seqs for x in row[:n_slots]]
        shape = (len(seqs), n_slots, _target_length(lengths, self.max_length, self.pad_to_multiple_of))
        ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        labs = torch.full(shape, self.label_pad_token_id, dtype=torch.long)
        filled = torch.zeros(shape[:2], dtype=torch.long)
        for i, (row, row_labels) in enumerate(zip(seqs, labels)):
            for k, (seq, lab) in enumerate(zip(row[:n_slots], row_labels[:n_slots])):
                if seq:
                    ids[i, k, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                    mask[i, k, : len(seq)] = 1
                    labs[i, k, : len(seq)] = torch.as_tensor(lab, dtype=torch.long)
                    filled[i, k] = 1
        return ids, mask, labs, filled

    def _reviews(self, features: Sequence[Mapping[str, Any]], n_turns: int) -> dict[str, torch.Tensor]:
        # A review at k asks about turns before k, so it stays valid when the episode is cut to n_turns >= k.
        seqs = [[_as_list(x) for x in (f.get("review_input_ids") or [])] for f in features]
        labels = [[_as_list(x) for x in (f.get("review_labels") or [])] for f in features]
        ids, mask, labs, filled = self._pad_slots(seqs, labels, n_turns + 1)
        return {"review_input_ids": ids, "review_attention_mask": mask, "review_labels": labs, "review_mask": filled}


def select_turn(
    batch: Mapping[str, torch.Tensor], turn: int, *, trim: bool = True
) -> dict[str, torch.Tensor]:
    """One turn of an episode batch as ``[B, T_k]`` tensors: ``input_ids``, ``attention_mask``, ``labels``,
    ``turn_mask`` [B] and ``prompt_lengths`` [B]. With ``trim`` trailing columns that are padding in every row
    are dropped (right padding only)."""
    ids = batch["input_ids"][:, turn]
    mask = batch["attention_mask"][:, turn]
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": batch["labels"][:, turn],
        "turn_mask": batch["turn_mask"][:, turn],
        "prompt_lengths": batch["prompt_lengths"][:, turn],
    }
    if trim:
        used = int(mask.sum(dim=1).max()) if mask.numel() else 0
        used = max(used, 1)
        for k in ("input_ids", "attention_mask", "labels"):
            out[k] = out[k][:, :used]
    return out
