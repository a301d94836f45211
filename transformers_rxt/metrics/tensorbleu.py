"""TensorBLEU: exact, batched BLEU on token ids, in plain torch.

BLEU is computed per sentence (``tensor_sentence_bleu``) or per corpus (``tensor_corpus_bleu``) directly on
padded id tensors, on the tensors' device, with NLTK's semantics (``nltk.translate.bleu_score``): modified
n-gram precision clipped by the maximum count over references, closest-reference-length brevity penalty with
NLTK's tie-breaking, and NLTK's ``SmoothingFunction`` methods including their quirks.

How the counting stays exact, memory-linear and fast:

* Every sentence gets one "pool" row: its candidate's tokens, then each reference's, every segment followed by
  end-marker columns. Pad tokens are removed first and ids are shifted by two; the candidate's end marker is 0
  and the references' is 1, so a window running past the end of a sentence can never equal a window of the
  other side. That removes every "is this a complete n-gram" mask.
* n-grams are compared through integer keys that pack token ids losslessly (fixed-width fields or mixed-radix
  digits checked against int64 overflow, with dense re-ranking for enormous ids), never hashes: equal keys are
  equal n-grams, whatever the vocabulary size.
* Sorting the keys makes equal n-grams contiguous runs; a run's candidate count and per-reference counts give
  the clipped matches ``min(candidate count, max reference count)``. All tensors are O(total tokens): nothing
  is ``[B, B*L]`` or vocabulary-sized.
* Two strategies share this: on CPU, ``_sparse_matches`` extends only n-grams that occur on both sides,
  order by order (after unigrams usually a small fraction of the pool); on accelerators, ``_dense_matches``
  uses fixed shapes only (one row-wise sort covers up to four orders, prefix doubling beyond), so it needs no
  host sync.

There is no Python loop over the batch; Python loops run over n-gram orders only. The one host synchronisation
of the dense path is a single read of the id range (validation and key width).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "SMOOTHING_ALIASES",
    "SMOOTHING_METHODS",
    "ngram_statistics",
    "pad_id_lists",
    "tensor_corpus_bleu",
    "tensor_sentence_bleu",
]

# NLTK ``SmoothingFunction`` methods implemented here, by their NLTK names.
SMOOTHING_METHODS = ("method0", "method1", "method2", "method3", "method4", "method5", "method7")

# Names used by the original TensorBLEU paper/code, mapped to the NLTK method with the same idea. They give
# NLTK's behaviour, not the original code's (which differed from NLTK for "add-k" and "exp").
SMOOTHING_ALIASES = {
    "none": "method0",  # no smoothing: a zero precision makes the score (numerically) zero
    "floor": "method1",  # add epsilon to zero match counts
    "add-k": "method2",  # add 1 to numerator and denominator of orders >= 2 (Lin & Och 2004)
    "exp": "method3",  # NIST geometric sequence: 1 / 2**k for the k-th order with no match
}

_INT64_MAX = 2**63 - 1
# Tests set this to "dense" or "sparse" to run one counting strategy on any device.
_STRATEGY_OVERRIDE: str | None = None
# NLTK's method0 replaces a zero precision by sys.float_info.min; keeping its log works in float32 too.
_LOG_FLOAT_MIN = math.log(sys.float_info.min)


# ----------------------------------------------------------------------------------------------------------
# Input checking and preparation
# ----------------------------------------------------------------------------------------------------------


def _check_id_tensor(name: str, x: object) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}. "
            f"Pad ragged lists into a tensor, "
            f"e.g. torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, "
            f"padding_value=pad_token_id)."
        )
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer token ids, got dtype {x.dtype}. "
            f"If the values are ids, convert them with "
            f"{name}.long(); if they are logits or probabilities, take argmax(-1) first."
        )


def _resolve_smoothing(
    smoothing: str | Callable | None, epsilon: float, k: float
) -> tuple[str, float, float]:
    """Returns ``(nltk_method_name, epsilon, k)``.

    Accepts a method name, an alias, ``None`` (NLTK's default: no smoothing, method0), or a bound method of an
    ``nltk.translate.bleu_score.SmoothingFunction`` instance, whose ``epsilon`` and ``k`` are then used.
    """
    if smoothing is None:
        return "method0", epsilon, k
    if callable(smoothing) and hasattr(smoothing, "__name__"):
        owner = getattr(smoothing, "__self__", None)
        epsilon = getattr(owner, "epsilon", epsilon)
        k = getattr(owner, "k", k)
        smoothing = smoothing.__name__
    if not isinstance(smoothing, str):
        raise TypeError(f"smoothing must be a method name, got {type(smoothing).__name__}")
    method = SMOOTHING_ALIASES.get(smoothing.lower(), smoothing.lower())
    if method not in SMOOTHING_METHODS:
        raise ValueError(
            f"Unknown smoothing {smoothing!r}. "
            f"Use one of {', '.join(SMOOTHING_METHODS)} (NLTK SmoothingFunction "
            f"methods) or an alias {', '.join(repr(a) for a in SMOOTHING_ALIASES)}. method6 is not supported."
        )
    return method, epsilon, k


def _check_max_n(max_n: int) -> None:
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be a positive int (the highest n-gram order), got {max_n!r}")


def _resolve_weights(max_n: int, weights: Sequence[float] | torch.Tensor | None) -> list[float]:
    _check_max_n(max_n)
    if weights is None:
        return [1.0 / max_n] * max_n
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    try:
        weights = [float(w) for w in weights]
    except TypeError as err:
        raise TypeError(
            "weights must be one flat sequence of floats, one per order; "
            "for several weight sets (NLTK's list of "
            "tuples), call once per set"
        ) from err
    if len(weights) != max_n:
        raise ValueError(
            f"weights has {len(weights)} entries but max_n={max_n}: "
            f"give one weight per n-gram order 1..max_n, "
            f"e.g. pass max_n={len(weights)} together with these weights."
        )
    return weights


def _check_inputs(candidates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Validates types, ranks, batch sizes and devices; returns references as ``[B, R, Lr]``."""
    _check_id_tensor("candidates", candidates)
    _check_id_tensor("references", references)
    if candidates.dim() != 2:
        raise ValueError(
            f"candidates must have shape [batch, length], got {tuple(candidates.shape)}. "
            f"For a single sentence use candidates.unsqueeze(0)."
        )
    if references.dim() == 2:
        references = references.unsqueeze(1)
    elif references.dim() != 3:
        raise ValueError(
            f"references must have shape [batch, length] (one reference per candidate) or "
            f"[batch, num_references, length], got {tuple(references.shape)}."
        )
    if references.shape[0] != candidates.shape[0]:
        raise ValueError(
            f"candidates has batch size {candidates.shape[0]} but references has {references.shape[0]}: give "
            f"one reference row, or one [num_references, length] block, per candidate."
        )
    if references.device != candidates.device:
        raise ValueError(
            f"candidates are on {candidates.device} but references are on {references.device}; "
            f"move both to the "
            f"same device."
        )
    return references


def _scan_ids(
    candidates: torch.Tensor, references: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Finds pad positions, rejects negative ids, and returns ``(keep_c, keep_r, max_id, has_gaps)``.

    ``max_id`` bounds every id (it may count the pad id). ``has_gaps`` says whether a pad sits before a real
    token (left padding or holes), which needs the slower compaction. This is the one host synchronisation:
    every scalar comes back in a single transfer.
    """
    keeps, flags = [], []
    for x in (candidates, references):
        keep = x != pad_token_id
        keeps.append(keep)
        if x.numel() == 0:
            flags += [x.new_zeros((), dtype=torch.long)] * 3
            continue
        lo, hi = x.aminmax()
        gaps = (keep[..., 1:] > keep[..., :-1]).any()
        flags += [lo.long(), hi.long(), gaps.long()]
    lo_c, hi_c, gaps_c, lo_r, hi_r, gaps_r = torch.stack(flags).tolist()
    for name, x, keep, lo in (
        ("candidates", candidates, keeps[0], lo_c),
        ("references", references, keeps[1], lo_r),
    ):
        if lo < 0 and lo == pad_token_id:
            # The minimum is the (negative) pad id itself; look at the real tokens only (rare, costs a sync).
            lo = int(x.masked_fill(~keep, 0).min())
        if lo < 0:
            raise ValueError(
                f"{name} contain the negative token id {lo} (pad_token_id={pad_token_id}). Token ids must be "
                f">= 0. If -100 marks ignored label positions, replace it by the pad id "
                f"or pass pad_token_id=-100."
            )
    return keeps[0], keeps[1], max(hi_c, hi_r, 0), bool(gaps_c or gaps_r)


def _dense_ids(candidates: torch.Tensor, references: torch.Tensor, pad_token_id: int):
    """Replaces ids by their dense rank ``0..U-1`` (pad by -1): for ids >= 2**31, where keys overflow."""
    keep_c, keep_r = candidates != pad_token_id, references != pad_token_id
    values = torch.cat([candidates[keep_c], references[keep_r]])
    uniq, inverse = torch.unique(values, return_inverse=True)
    split = int(keep_c.sum())
    new_c = torch.full(candidates.shape, -1, dtype=torch.long, device=candidates.device)
    new_r = torch.full(references.shape, -1, dtype=torch.long, device=references.device)
    new_c[keep_c] = inverse[:split]
    new_r[keep_r] = inverse[split:]
    return new_c, new_r, -1, max(uniq.numel() - 1, 0)


def _fill_segment(
    out: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, marker: int, compact: bool
) -> None:
    """Writes ``ids + 2`` into ``out[..., :L]`` (pads removed, tokens left-aligned), ``marker`` elsewhere."""
    length = ids.shape[-1]
    values = (ids.to(out.dtype) + 2).masked_fill_(~keep, marker)
    if compact:
        out.fill_(marker)
        # Kept tokens go to their rank among kept tokens; dropped ones all land on column `length` (a marker
        # column), writing the marker it holds anyway.
        target = torch.where(keep, keep.cumsum(-1) - 1, length)
        out.scatter_(-1, target, values)
    else:
        out[..., :length] = values
        out[..., length:] = marker


def _pool(
    candidates: torch.Tensor,
    references: torch.Tensor,
    keep_c: torch.Tensor,
    keep_r: torch.Tensor,
    tail: int,
    compact: bool,
    max_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Builds the pool rows ``[B, S]`` (shifted ids and end markers) and the source of each column ``[S]``.

    Layout of a row: ``candidate | tail markers 0 | reference 1 | tail markers 1 | reference 2 | ...``.
    """
    batch, cand_width = candidates.shape
    num_refs, ref_width = references.shape[1], references.shape[2]
    device = candidates.device
    cand_seg, ref_seg = cand_width + tail, ref_width + tail
    dtype = torch.int32 if max_id + 2 < 2**31 else torch.long
    tokens = torch.empty(batch, cand_seg + num_refs * ref_seg, dtype=dtype, device=device)
    _fill_segment(tokens[:, :cand_seg], candidates, keep_c, 0, compact)
    _fill_segment(tokens[:, cand_seg:].view(batch, num_refs, ref_seg), references, keep_r, 1, compact)
    # Computed on the device (a host-built tensor would need a copy that waits for the device).
    columns = torch.arange(tokens.shape[1], device=device)
    src = torch.where(columns < cand_seg, 0, (columns - cand_seg).div(ref_seg, rounding_mode="floor") + 1)
    return tokens, src


# ----------------------------------------------------------------------------------------------------------
# Counting: both strategies return clipped matches [B, max_n] for a pool built by `_pool`, where `src` is 0
# for candidate columns and r + 1 for reference r's.
# ----------------------------------------------------------------------------------------------------------


def _sparse_matches(
    tokens: torch.Tensor,
    src: torch.Tensor,
    num_refs: int,
    max_n: int,
    max_id: int,
    give_up_above: float = 1.0,
) -> torch.Tensor | None:
    """Clipped matches following only the n-grams that occur in both the candidate and a reference (CPU).

    Order by order, elements are sorted by ``(row or run of their (n-1)-gram, n-th token, src)`` packed in one
    integer, so each run of equal n-grams lists its candidate elements first, then reference 1's, reference
    2's... A run with both kinds is found where ``src`` steps up from 0 inside the run; binary search gives
    its block bounds. Only those runs can hold longer matches, so only their elements go on to the next order:
    for realistic data a small part of the pool after unigrams. Sizes are data-dependent (host syncs), which
    costs nothing on CPU.

    Returns None when more than ``give_up_above`` of the pool shares its unigram with the other side and
    orders >= 3 are wanted: then nearly everything goes on to every order, and one row-wise sort
    (``_dense_matches``) is cheaper than one flat sort per order.
    """
    batch, width = tokens.shape
    device = tokens.device
    matches = torch.zeros(batch, max_n, dtype=torch.long, device=device)
    flat_tokens = tokens.reshape(-1)
    src_bits = num_refs.bit_length()  # src is 0..num_refs
    src_mask = (1 << src_bits) - 1
    tok_bits = (max_id + 2).bit_length()  # shifted ids and markers are 0..max_id + 2
    low_bits = tok_bits + src_bits
    if max(batch * width - 1, 1).bit_length() + low_bits > 62:
        raise ValueError("batch too large to pack n-gram keys into int64; split it into smaller batches")

    # Order 1: (row, token, src) for every pool position. int32 sorts several times faster, so use it when the
    # key fits in 30 bits (30, not 31, so that `run_base + (1 << src_bits)` below cannot overflow).
    row_bits = max(batch - 1, 1).bit_length()
    key_dtype = torch.int32 if row_bits + low_bits <= 30 else torch.long
    key = tokens.to(key_dtype) << src_bits
    key |= src.to(key_dtype)
    key += (torch.arange(batch, device=device, dtype=key_dtype) << low_bits).unsqueeze(1)
    key, elems = key.reshape(-1).sort()

    for n in range(1, max_n + 1):
        # First reference element of each run that also has candidate elements: the previous element has src 0
        # and the key steps by 1..src_mask, which keeps it inside the same run.
        step = key[1:] - key[:-1]
        if num_refs == 1:
            found = (step == 1) & ((key[:-1] & 1) == 0)
        else:
            found = (step >= 1) & (step <= src_mask) & ((key[:-1] & src_mask) == 0)
        first_ref = found.nonzero().squeeze(1) + 1
        if first_ref.numel() == 0:
            break  # no n-gram shared by candidate and references: no longer ones either
        run_base = key[first_ref] - step[first_ref - 1]  # the run's candidate key (src = 0)
        if first_ref.numel() * 32 < key.numel():
            # Few shared n-grams (the usual case): binary search for their run bounds.
            run_begin = torch.searchsorted(key, run_base)
            run_end = torch.searchsorted(key, run_base + (1 << src_bits))
        else:
            # Many: one linear pass numbering the runs is cheaper than millions of binary searches.
            new_run = torch.ones(key.numel() + 1, dtype=torch.bool, device=device)
            torch.ne(key[1:] >> src_bits, key[:-1] >> src_bits, out=new_run[1:-1])
            run_starts = new_run.nonzero().squeeze(1)  # ends with key.numel() as a sentinel
            run_index = new_run[:-1].cumsum(0)[first_ref] - 1
            run_begin, run_end = run_starts[run_index], run_starts[run_index + 1]
        cand_count = first_ref - run_begin
        if num_refs == 1:
            best_ref = run_end - first_ref
        else:
            offsets = torch.arange(1, num_refs + 2, device=device, dtype=key.dtype)
            best_ref = torch.searchsorted(key, run_base.unsqueeze(1) + offsets).diff(dim=1).amax(1)
        row = elems[first_ref] // width
        matches[:, n - 1].index_add_(0, row, torch.minimum(cand_count, best_ref))
        if n == max_n:
            break
        # Keep these runs' elements (still in sorted order) and extend each by its next token.
        lengths = run_end - run_begin
        total = int(lengths.sum())
        if n == 1 and max_n >= 3 and total > give_up_above * key.numel():
            return None
        start_shift = run_begin - (lengths.cumsum(0) - lengths)
        kept = torch.arange(total, device=device) + torch.repeat_interleave(
            start_shift, lengths, output_size=total
        )
        elems, kept_src = elems[kept], (key[kept] & src_mask).long()
        group = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=device), lengths, output_size=total
        )
        next_token = flat_tokens[elems + n].long()
        key, order = (((group << tok_bits) | next_token) << src_bits | kept_src).sort()
        elems = elems[order]
    return matches


def _digits_per_key(rank_range: int, base: int, wanted: int) -> int:
    """How many base-``base`` digits fit after a leading value in ``[0, rank_range)`` in an int64."""
    k = 0
    while k < wanted and rank_range * base ** (k + 1) <= _INT64_MAX:
        k += 1
    if k == 0:
        raise ValueError("sequences are too long to pack n-gram keys into int64; split the batch")
    return k


def _dense_matches(
    tokens: torch.Tensor, src: torch.Tensor, num_refs: int, max_n: int, max_id: int
) -> torch.Tensor:
    """Clipped matches with fixed-size tensors only, so it runs on accelerators without host syncs.

    Each pool position's window is packed into one int64 key in mixed radix ``base = max_id + 3`` (four digits
    for vocabularies up to ~55k) and each row is sorted once; equal n-grams of every order up to the number of
    digits are then contiguous runs (their keys share the prefix ``key // base**(k - n)``). Higher orders use
    prefix doubling: the dense rank of the order-``m`` window within its row replaces its first ``m`` digits.
    """
    batch, width = tokens.shape
    device = tokens.device
    tail = max_n - 1
    # Windows starting in the last segment's marker columns read past the row: extend it with markers.
    tokens = torch.nn.functional.pad(tokens, (0, tail), value=1)
    matches = torch.zeros(batch, max_n, dtype=torch.long, device=device)
    base = max_id + 3
    positions = torch.arange(width, dtype=torch.int32, device=device)
    ref_ids = torch.arange(1, num_refs + 1, device=device).view(-1, 1, 1)
    order, lead = 0, None  # orders 1..order are done; lead = dense rank of the order-`order` window
    while order < max_n:
        k = _digits_per_key(1 if lead is None else width, base, max_n - order)
        key = (
            tokens[:, order : order + width].long()
            if lead is None
            else lead * base + tokens[:, order : order + width]
        )
        for j in range(1, k):
            key.mul_(base).add_(tokens[:, order + j : order + j + width])
        sorted_key, perm = key.sort(dim=1)
        del key
        ref_of = src[perm].unsqueeze(0) == ref_ids  # [R, B, S]: the element comes from reference r
        ref_seen = ref_of.cumsum(-1, dtype=torch.int32)
        ref_before = ref_seen - ref_of.to(torch.int32)
        del ref_of
        for d in range(1, k + 1):
            prefix = sorted_key // base ** (k - d) if d < k else sorted_key
            start = torch.ones_like(prefix, dtype=torch.bool)
            torch.ne(prefix[:, 1:], prefix[:, :-1], out=start[:, 1:])
            matches[:, order + d - 1] = _clipped_run_matches(start, ref_seen, ref_before, positions)
        order += k
        if order < max_n:
            rank = start.cumsum(-1) - 1
            lead = torch.empty_like(rank).scatter_(1, perm, rank)
    return matches


def _clipped_run_matches(
    start: torch.Tensor, ref_seen: torch.Tensor, ref_before: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Sum over runs of ``min(candidate count, max reference count)`` for one sorted order ``[B, S]``.

    ``start`` flags the first element of each run of equal n-grams; ``ref_seen`` / ``ref_before`` (``[R, B,
    S]``) count reference-``r`` elements up to and including / before each element. Returns ``[B]``.
    """
    start_i = start.to(torch.int32)
    # Values at the latest run start, carried forward with a cumulative max: positions and "references seen
    # before" never decrease along a row, and they are masked to 0 away from run starts.
    run_start = (positions * start_i).cummax(-1).values
    before = (ref_before * start_i).cummax(-1).values
    ref_count = ref_seen - before  # running count inside the run: the run's total at its last element
    run_size = positions + 1 - run_start
    if ref_count.shape[0] == 1:
        best_ref, cand_count = ref_count[0], run_size - ref_count[0]
    else:
        best_ref, cand_count = ref_count.amax(0), run_size - ref_count.sum(0)
    end = torch.ones_like(start_i)
    end[:, :-1] = start_i[:, 1:]
    return (torch.minimum(cand_count, best_ref) * end).sum(-1)


def ngram_statistics(
    candidates: torch.Tensor,
    references: torch.Tensor,
    *,
    max_n: int = 4,
    pad_token_id: int | None = 0,
) -> dict[str, torch.Tensor]:
    """Per-sentence BLEU sufficient statistics (what NLTK accumulates before smoothing).

    Args:
        candidates: ``[B, Lc]`` integer ids, padded with ``pad_token_id``.
        references: ``[B, Lr]`` or ``[B, R, Lr]`` integer ids, padded; an all-pad reference row is absent.
        max_n: highest n-gram order.
        pad_token_id: id removed from every sequence wherever it occurs (so left or right padding both work).

    Returns:
        A dict of int64 tensors: ``matches`` ``[B, max_n]`` (clipped n-gram matches), ``totals`` ``[B,
        max_n]`` (candidate n-gram counts, ``max(0, len - n + 1)``), ``hyp_len`` ``[B]`` and ``ref_len``
        ``[B]`` (length of the closest reference, NLTK tie-breaking: the shorter one; 0 without references).
    """
    return _statistics(candidates, references, max_n=max_n, pad_token_id=pad_token_id)


def _statistics(
    candidates: torch.Tensor,
    references: torch.Tensor,
    *,
    max_n: int,
    pad_token_id: int | None,
    strategy: str | None = None,
) -> dict[str, torch.Tensor]:
    references = _check_inputs(candidates, references)
    _check_max_n(max_n)
    if pad_token_id is None:
        pad_token_id = -1  # no padding: -1 cannot be a token id (negative ids are rejected)
    keep_c, keep_r, max_id, has_gaps = _scan_ids(candidates, references, pad_token_id)
    if max_id >= 2**31 - 3:
        # Keys hold ids in a fixed number of bits; for enormous ids use dense ranks instead (exact, one sort).
        candidates, references, pad_token_id, max_id = _dense_ids(candidates, references, pad_token_id)
        keep_c, keep_r = candidates != pad_token_id, references != pad_token_id
    device = candidates.device
    batch, cand_width = candidates.shape
    num_refs, ref_width = references.shape[1], references.shape[2]

    hyp_len = keep_c.sum(-1)
    ref_lens = keep_r.sum(-1)
    totals = (hyp_len.unsqueeze(1) - torch.arange(max_n, device=device)).clamp(min=0)
    if batch == 0 or cand_width == 0 or num_refs * ref_width == 0:
        matches = torch.zeros(batch, max_n, dtype=torch.long, device=device)
    else:
        # At least one marker column per segment: compaction parks dropped pads there.
        tokens, src = _pool(candidates, references, keep_c, keep_r, max(max_n - 1, 1), has_gaps, max_id)
        strategy = strategy or _STRATEGY_OVERRIDE
        if strategy is None:
            # Sync-free fixed-size work on accelerators. On CPU, following only shared n-grams is much cheaper
            # unless most of the pool is shared ("auto" falls back to dense then).
            strategy = "auto" if device.type == "cpu" else "dense"
        matches = None
        if strategy in ("sparse", "auto"):
            matches = _sparse_matches(
                tokens, src, num_refs, max_n, max_id, 0.6 if strategy == "auto" else 1.0
            )
        if matches is None:
            matches = _dense_matches(tokens, src, num_refs, max_n, max_id)

    # Closest reference length; ties go to the shorter reference, absent (empty) references are skipped.
    present = ref_lens > 0
    span = ref_width + 1
    closeness = (ref_lens - hyp_len.unsqueeze(1)).abs() * span + ref_lens
    closeness = torch.where(present, closeness, _INT64_MAX)
    if num_refs > 0:
        best = closeness.min(dim=1).values
        ref_len = torch.where(present.any(dim=1), best % span, 0)
    else:
        ref_len = torch.zeros_like(hyp_len)
    return {"matches": matches, "totals": totals, "hyp_len": hyp_len, "ref_len": ref_len}


# ----------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------


def _method4(
    p: torch.Tensor, zero: torch.Tensor, denom: torch.Tensor, hyp_len: torch.Tensor, k: float
) -> torch.Tensor:
    # NLTK: the i-th zero-match order (counting from 1) gets 1 / (2**i * k / ln(hyp_len)) / denominator, and
    # only when hyp_len > 1; otherwise the zero stays and is later skipped by the geometric mean.
    replace = zero & (hyp_len > 1).unsqueeze(1)
    rank = replace.cumsum(-1).to(p.dtype)
    log_len = hyp_len.to(p.dtype).clamp(min=2).log().unsqueeze(1)
    smoothed = 1.0 / ((torch.pow(2.0, rank) * k) / log_len) / denom
    return torch.where(replace, smoothed, p)


def _method5(p: torch.Tensor, p5: torch.Tensor) -> torch.Tensor:
    # NLTK: p'_i = (m_{i-1} + p_i + p_{i+1}) / 3 with m_{-1} = p_1 + 1 and m_i = p'_i. The value after the
    # last order is always the raw 5-gram precision, whatever max_n is (NLTK appends a 5-gram precision).
    prev = p[:, 0] + 1
    out = []
    for i in range(p.shape[1]):
        nxt = p[:, i + 1] if i + 1 < p.shape[1] else p5
        prev = (prev + p[:, i] + nxt) / 3
        out.append(prev)
    return torch.stack(out, dim=1)


def _bleu_from_statistics(
    matches: torch.Tensor,
    denom: torch.Tensor,
    hyp_len: torch.Tensor,
    ref_len: torch.Tensor,
    weights: list[float],
    method: str,
    epsilon: float,
    k: float,
    p5: torch.Tensor | None,
    dtype: torch.dtype,
    auto_reweigh: bool = False,
) -> torch.Tensor:
    """NLTK's ``corpus_bleu`` arithmetic, vectorised over rows. ``denom`` is already ``max(1, count)``."""
    num = matches.to(dtype)
    den = denom.to(dtype)
    zero = matches == 0
    p = num / den
    log_p = None
    if method == "method0":
        log_p = torch.where(zero, torch.full_like(p, _LOG_FLOAT_MIN), p.log())
        include = torch.ones_like(zero)
    elif method == "method1":
        p = torch.where(zero, epsilon / den, p)
    elif method == "method2":
        p = torch.cat([p[:, :1], (num[:, 1:] + 1) / (den[:, 1:] + 1)], dim=1)
    elif method == "method3":
        p = torch.where(zero, 1.0 / (torch.pow(2.0, zero.cumsum(-1).to(dtype)) * den), p)
    elif method == "method4":
        p = _method4(p, zero, den, hyp_len, k)
    elif method == "method5":
        p = _method5(p, p5)
    elif method == "method7":
        p = _method5(_method4(p, zero, den, hyp_len, k), p5)
    if log_p is None:
        # NLTK skips precisions that are still 0 after smoothing (`if p_i > 0`), i.e. they count as log 1.
        include = p > 0
        log_p = torch.where(include, p, 1.0).log()
    # Python-float weights, one order at a time: no host-to-device copy (which would wait for the device).
    log_terms = torch.where(include, log_p, 0.0)
    log_mean = sum(w * log_terms[:, i] for i, w in enumerate(weights))
    if auto_reweigh and weights == [0.25] * 4:
        # NLTK: a hypothesis shorter than 4 tokens gets uniform weights 1/len over its first len orders only.
        short = (hyp_len > 0) & (hyp_len < 4)
        orders = torch.arange(4, device=p.device)
        uniform = torch.where(
            orders < hyp_len.unsqueeze(1), 1.0 / hyp_len.clamp(min=1).to(dtype).unsqueeze(1), 0.0
        )
        log_mean = torch.where(short, (uniform * log_terms).sum(-1), log_mean)

    c = hyp_len.to(dtype)
    r = ref_len.to(dtype)
    bp = torch.where(
        hyp_len > ref_len, 1.0, torch.where(hyp_len == 0, 0.0, torch.exp(1 - r / c.clamp(min=1)))
    )
    score = bp * torch.exp(log_mean)
    # NLTK returns 0 as soon as there is no unigram match, before any smoothing.
    return torch.where(matches[:, 0] == 0, 0.0, score)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # The scoring arithmetic is tiny ([B, max_n]); float64 keeps it within ~1e-15 of NLTK. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def tensor_sentence_bleu(
    candidates: torch.Tensor,
    references: torch.Tensor,
    *,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str | Callable | None = "method1",
    epsilon: float = 0.1,
    k: float = 5,
    pad_token_id: int | None = 0,
    dtype: torch.dtype = torch.float32,
    auto_reweigh: bool = False,
) -> torch.Tensor:
    """Per-sentence BLEU of a batch, identical to NLTK's ``sentence_bleu`` on the unpadded id lists.

    Args:
        candidates: ``[B, Lc]`` integer token ids (hypotheses), padded with ``pad_token_id``.
        references: ``[B, Lr]`` (one reference per candidate) or ``[B, R, Lr]`` (R references each), padded
            with ``pad_token_id``. An all-pad reference row is absent (use it to give sentences different
            numbers of references). A sentence with no reference at all scores 0.
        max_n: highest n-gram order (4 = BLEU-4).
        weights: one weight per order ``1..max_n``; default uniform ``1 / max_n``.
        smoothing: an NLTK ``SmoothingFunction`` method name, ``"method0"`` .. ``"method5"`` or ``"method7"``;
            an alias: ``"none"`` (method0), ``"floor"`` (method1), ``"add-k"`` (method2), ``"exp"`` (method3);
            ``None`` (method0, NLTK's default); or a bound NLTK method such as
            ``SmoothingFunction(k=3).method4`` (its ``epsilon``/``k`` win). Our default is method1: unsmoothed
            BLEU is ~0 for most single sentences.
        epsilon: method1's added count (NLTK ``SmoothingFunction(epsilon=0.1)``).
        k: method4/method7's ``k`` (NLTK ``SmoothingFunction(k=5)``).
        pad_token_id: this id is removed wherever it occurs (right, left or inside), so a real token with the
            same id is dropped too. ``None``: no padding.
        dtype: dtype of the result. The arithmetic runs in float64 either way; ``torch.float64`` keeps it.
        auto_reweigh: NLTK's option (off by default there too): with the default BLEU-4 weights, a hypothesis
            shorter than 4 tokens is scored with uniform weights over its ``len`` lowest orders.

    Returns:
        ``[B]`` tensor of scores in ``[0, 1]`` on the inputs' device.

    Example:
        >>> cand = torch.tensor([[5, 6, 7, 8, 0]])
        >>> refs = torch.tensor([[5, 6, 7, 9, 8]])
        >>> tensor_sentence_bleu(cand, refs, dtype=torch.float64)  # == nltk sentence_bleu(..., method1)
    """
    method, epsilon, k = _resolve_smoothing(smoothing, epsilon, k)
    weights = _resolve_weights(max_n, weights)
    needs_p5 = method in ("method5", "method7")
    stats = _statistics(
        candidates, references, max_n=max(max_n, 5) if needs_p5 else max_n, pad_token_id=pad_token_id
    )
    matches, totals = stats["matches"], stats["totals"]
    denom = totals.clamp(min=1)
    work = _compute_dtype(candidates.device)
    p5 = matches[:, 4].to(work) / denom[:, 4].to(work) if needs_p5 else None
    scores = _bleu_from_statistics(
        matches[:, :max_n],
        denom[:, :max_n],
        stats["hyp_len"],
        stats["ref_len"],
        weights,
        method,
        epsilon,
        k,
        p5,
        work,
        auto_reweigh,
    )
    return scores.to(dtype)


def tensor_corpus_bleu(
    candidates: torch.Tensor,
    references: torch.Tensor,
    *,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str | Callable | None = "method1",
    epsilon: float = 0.1,
    k: float = 5,
    pad_token_id: int | None = 0,
    dtype: torch.dtype = torch.float32,
    auto_reweigh: bool = False,
) -> torch.Tensor:
    """Corpus BLEU of a batch (0-dim tensor), identical to NLTK's ``corpus_bleu`` on the unpadded id lists.

    Matches and n-gram counts are summed over sentences before the precisions are taken (micro average), as
    are hypothesis and closest-reference lengths for the brevity penalty. Arguments are those of
    :func:`tensor_sentence_bleu`. NLTK quirks kept on purpose: each sentence's denominator is ``max(1,
    count)`` before summing; method4 uses the corpus hypothesis length; method5/method7 take the extra 5-gram
    precision from the *last* sentence only.
    """
    method, epsilon, k = _resolve_smoothing(smoothing, epsilon, k)
    weights = _resolve_weights(max_n, weights)
    stats = ngram_statistics(candidates, references, max_n=max_n, pad_token_id=pad_token_id)
    work = _compute_dtype(candidates.device)
    device = candidates.device
    if candidates.shape[0] == 0:
        return torch.zeros((), dtype=dtype, device=device)
    p5 = None
    if method in ("method5", "method7"):
        last = ngram_statistics(candidates[-1:], references[-1:], max_n=5, pad_token_id=pad_token_id)
        p5 = last["matches"][:, 4].to(work) / last["totals"][:, 4].clamp(min=1).to(work)
    score = _bleu_from_statistics(
        stats["matches"].sum(0, keepdim=True),
        stats["totals"].clamp(min=1).sum(0, keepdim=True),
        stats["hyp_len"].sum().view(1),
        stats["ref_len"].sum().view(1),
        weights,
        method,
        epsilon,
        k,
        p5,
        work,
        auto_reweigh,
    )
    return score[0].to(dtype)


def pad_id_lists(
    candidates: Sequence[Sequence[int]],
    references: Sequence[Sequence[Sequence[int]]],
    *,
    pad_token_id: int = -1,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads ragged id lists into ``([B, Lc], [B, R, Lr])`` tensors for the functions above.

    ``references[i]`` is the list of references of candidate ``i`` (they may differ in number: missing ones
    become all-pad rows, i.e. absent). The default pad id -1 cannot clash with a real id; pass the same
    ``pad_token_id`` to the BLEU functions.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    cand_width = max((len(c) for c in candidates), default=0)
    num_refs = max((len(r) for r in references), default=0)
    ref_width = max((len(x) for r in references for x in r), default=0)
    pad = [pad_token_id]
    cand = [list(c) + pad * (cand_width - len(c)) for c in candidates]
    refs = [
        [list(x) + pad * (ref_width - len(x)) for x in r] + [pad * ref_width] * (num_refs - len(r))
        for r in references
    ]
    cand_t = torch.tensor(cand, dtype=torch.long).view(len(candidates), cand_width)
    ref_t = torch.tensor(refs, dtype=torch.long).view(len(references), num_refs, ref_width)
    return cand_t.to(device), ref_t.to(device)
