"""TensorBLEU vs NLTK (the oracle) and sacrebleu; input errors, strategies, memory and the reward."""

import math
import random
import warnings

import pytest
import torch

import transformers_rxt.metrics.tensorbleu as tb
from transformers_rxt.metrics import (
    SMOOTHING_ALIASES,
    TensorBLEUReward,
    ngram_statistics,
    pad_id_lists,
    tensor_corpus_bleu,
    tensor_sentence_bleu,
    tensorbleu_reward,
)

nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
METHODS = ["method0", "method1", "method2", "method3", "method4", "method5", "method7"]
STRATEGIES = ["auto", "sparse", "dense"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add overhead, and on a busy 2-core box OpenMP waits dominate.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setattr(tb, "_STRATEGY_OVERRIDE", request.param)
    return request.param


def nltk_sentence(refs, hyp, weights, method, **smoothing_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # method0 warns on zero counts
        sf = nltk_bleu.SmoothingFunction(**smoothing_kwargs)
        return nltk_bleu.sentence_bleu(refs, hyp, weights=weights, smoothing_function=getattr(sf, method))


def nltk_corpus(refs, hyps, weights, method, **smoothing_kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sf = nltk_bleu.SmoothingFunction(**smoothing_kwargs)
        return nltk_bleu.corpus_bleu(refs, hyps, weights=weights, smoothing_function=getattr(sf, method))


def random_case(rng: random.Random):
    """A batch as Python lists plus its padded tensors: pads anywhere, absent references, empty sentences."""
    batch = rng.randint(1, 6)
    vocab = rng.choice([2, 3, 6, 30, 32000, 2**40])  # tiny vocabularies force repeated n-grams and matches
    num_refs = rng.randint(1, 3)
    pad = rng.choice([0, 0, 5, -100])
    max_len = rng.choice([4, 12, 30])

    def sentence():
        tokens = []
        while len(tokens) < rng.randint(0, max_len):
            t = rng.randint(0, vocab)
            if t != pad:
                tokens.append(t)
        return tokens

    hyps = [sentence() for _ in range(batch)]
    refs = [[sentence() for _ in range(num_refs)] for _ in range(batch)]
    for i in range(batch):
        if rng.random() < 0.3:  # copy chunks of a reference into the candidate: long matches
            src = refs[i][0]
            a = rng.randint(0, len(src))
            hyps[i] = hyps[i][: rng.randint(0, len(hyps[i]))] + src[a : a + rng.randint(0, 8)]
        if not any(refs[i]):
            refs[i][0] = [1 if pad != 1 else 2]  # NLTK needs at least one non-empty reference

    def padded(seq, width):
        seq = list(seq)
        if rng.random() < 0.3:  # pads scattered anywhere, not only on the right
            for _ in range(width - len(seq)):
                seq.insert(rng.randint(0, len(seq)), pad)
            return seq
        return seq + [pad] * (width - len(seq))

    cand_width = max(len(h) for h in hyps) + rng.randint(0, 3)
    ref_width = max(len(r) for rr in refs for r in rr) + rng.randint(0, 3)
    cand = torch.tensor([padded(h, cand_width) for h in hyps], dtype=torch.long).view(batch, cand_width)
    ref = torch.tensor([[padded(r, ref_width) for r in rr] for rr in refs], dtype=torch.long)
    ref = ref.view(batch, num_refs, ref_width)
    if num_refs == 1 and rng.random() < 0.5:
        ref = ref[:, 0]  # the [B, Lr] form
    nltk_refs = [[r for r in rr if r] for rr in refs]  # an all-pad reference row is absent
    return hyps, nltk_refs, cand, ref, pad


def random_weights(rng, max_n):
    if rng.random() < 0.4:
        return None, (1.0 / max_n,) * max_n
    w = tuple(rng.choice([0.0, rng.random()]) for _ in range(max_n))
    return w, w


@pytest.mark.parametrize("seed", range(4))
def test_sentence_bleu_matches_nltk(strategy, seed):
    rng = random.Random(1000 + seed)
    for _ in range(12):
        hyps, refs, cand, ref, pad = random_case(rng)
        max_n = rng.randint(1, 5)
        weights, nltk_weights = random_weights(rng, max_n)
        for method in METHODS:
            got = tensor_sentence_bleu(
                cand,
                ref,
                max_n=max_n,
                weights=weights,
                smoothing=method,
                pad_token_id=pad,
                dtype=torch.float64,
            )
            want = [nltk_sentence(r, h, nltk_weights, method) for r, h in zip(refs, hyps)]
            assert got.dtype == torch.float64 and got.shape == (len(hyps),)
            diff = (got - torch.tensor(want, dtype=torch.float64)).abs().max().item()
            assert diff <= 1e-6, (method, max_n, weights, hyps, refs, got.tolist(), want)


@pytest.mark.parametrize("seed", range(4))
def test_corpus_bleu_matches_nltk(strategy, seed):
    rng = random.Random(2000 + seed)
    for _ in range(12):
        hyps, refs, cand, ref, pad = random_case(rng)
        max_n = rng.randint(1, 5)
        weights, nltk_weights = random_weights(rng, max_n)
        for method in METHODS:
            got = tensor_corpus_bleu(
                cand,
                ref,
                max_n=max_n,
                weights=weights,
                smoothing=method,
                pad_token_id=pad,
                dtype=torch.float64,
            )
            want = nltk_corpus(refs, hyps, nltk_weights, method)
            assert got.shape == () and abs(got.item() - want) <= 1e-6, (method, max_n, hyps, refs, got, want)


def test_float32_within_1e5_and_smoothing_parameters():
    rng = random.Random(7)
    for _ in range(20):
        hyps, refs, cand, ref, pad = random_case(rng)
        for method, kwargs in [("method1", {"epsilon": 0.3}), ("method4", {"k": 2}), ("method7", {"k": 3})]:
            got = tensor_sentence_bleu(cand, ref, smoothing=method, pad_token_id=pad, **kwargs)
            assert got.dtype == torch.float32
            want = [nltk_sentence(r, h, (0.25,) * 4, method, **kwargs) for r, h in zip(refs, hyps)]
            assert (got.double() - torch.tensor(want, dtype=torch.float64)).abs().max() <= 1e-5
            # A bound NLTK method carries its own parameters.
            sf = nltk_bleu.SmoothingFunction(**kwargs)
            same = tensor_sentence_bleu(cand, ref, smoothing=getattr(sf, method), pad_token_id=pad)
            assert torch.equal(same, got)


def test_larger_batch_all_strategies_agree_with_nltk():
    """Longer sentences, several references, a 50k vocabulary (two key levels in the dense strategy)."""
    gen = torch.Generator().manual_seed(0)
    batch, length = 24, 60
    cand = torch.randint(1, 9, (batch, length), generator=gen)
    ref = torch.randint(1, 9, (batch, 3, length + 7), generator=gen)
    ref[:, 0, :length] = torch.where(torch.rand(batch, length, generator=gen) < 0.7, cand, ref[:, 0, :length])
    ref[5, 1:] = 0  # sentence 5 has one reference only
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    cand[torch.arange(length) >= lengths[:, None]] = 0
    hyps = [[t for t in row if t != 0] for row in cand.tolist()]
    refs = [[[t for t in r if t != 0] for r in rr if any(rr)] for rr in ref.tolist()]
    refs = [[r for r in rr if r] for rr in refs]
    for vocab_offset in (0, 50_000, 2**35):  # small ids, GPT-2-sized ids, ids that need dense re-ranking
        c = torch.where(cand > 0, cand + vocab_offset, 0)
        r = torch.where(ref > 0, ref + vocab_offset, 0)
        stats = {
            s: tb._statistics(c, r, max_n=6, pad_token_id=0, strategy=s) for s in ("sparse", "dense", "auto")
        }
        for s in ("dense", "auto"):
            for key in ("matches", "totals", "hyp_len", "ref_len"):
                assert torch.equal(stats[s][key], stats["sparse"][key]), (s, key)
    for method in ("method1", "method4", "method5"):
        got = tensor_sentence_bleu(cand, ref, smoothing=method, dtype=torch.float64)
        want = torch.tensor([nltk_sentence(r, h, (0.25,) * 4, method) for r, h in zip(refs, hyps)])
        assert (got - want.double()).abs().max() <= 1e-6
        got_corpus = tensor_corpus_bleu(cand, ref, smoothing=method, dtype=torch.float64).item()
        assert abs(got_corpus - nltk_corpus(refs, hyps, (0.25,) * 4, method)) <= 1e-6


# --- NLTK edge cases, spelled out ---------------------------------------------------------------------------


def ids(*words_lists):
    vocab = {}
    return [[vocab.setdefault(w, len(vocab) + 1) for w in words.split()] for words in words_lists]


def test_nltk_docstring_example():
    hyp, ref1, ref2, ref3 = ids(
        "It is a guide to action which ensures that the military always obeys the commands of the party",
        "It is a guide to action that ensures that the military will forever heed Party commands",
        "It is the guiding principle which guarantees the military forces always being under the command of "
        "the Party",
        "It is the practical guide for the army always to heed the directions of the party",
    )
    cand, ref = pad_id_lists([hyp], [[ref1, ref2, ref3]])
    got = tensor_sentence_bleu(cand, ref, smoothing="method0", pad_token_id=-1, dtype=torch.float64)
    assert abs(got.item() - 0.5045666840058485) < 1e-12
    assert abs(got.item() - nltk_bleu.sentence_bleu([ref1, ref2, ref3], hyp)) < 1e-12


def test_empty_and_short_candidates():
    cand = torch.tensor([[0, 0, 0, 0], [7, 0, 0, 0], [7, 8, 0, 0], [11, 11, 0, 0]])
    ref = torch.tensor([[7, 8, 9, 10], [7, 8, 9, 10], [7, 8, 9, 10], [7, 8, 9, 10]])
    for method in METHODS:
        got = tensor_sentence_bleu(cand, ref, smoothing=method, dtype=torch.float64)
        assert got[0] == 0.0 and got[3] == 0.0  # empty candidate / no unigram match: NLTK returns 0
        for i in (1, 2):
            want = nltk_sentence([[7, 8, 9, 10]], [t for t in cand[i].tolist() if t], (0.25,) * 4, method)
            assert abs(got[i].item() - want) <= 1e-12, method
    # method4 leaves zero precisions of a one-token candidate unsmoothed; NLTK then skips them entirely.
    one = tensor_sentence_bleu(cand[1:2], ref[1:2], smoothing="method4", dtype=torch.float64).item()
    assert abs(one - math.exp(1 - 4 / 1)) < 1e-12


def test_zero_matches_at_higher_orders():
    cand = torch.tensor([[1, 2, 3, 4, 5, 6]])
    ref = torch.tensor([[1, 2, 9, 3, 4, 9]])  # bigram matches, no trigram
    stats = ngram_statistics(cand, ref)
    assert stats["matches"].tolist() == [[4, 2, 0, 0]]
    assert stats["totals"].tolist() == [[6, 5, 4, 3]]
    method0 = tensor_sentence_bleu(cand, ref, smoothing="none", dtype=torch.float64).item()
    assert 0 < method0 < 1e-70  # NLTK's sys.float_info.min in the log, not an exact 0
    for alias, method in SMOOTHING_ALIASES.items():
        got = tensor_sentence_bleu(cand, ref, smoothing=alias, dtype=torch.float64).item()
        assert got == tensor_sentence_bleu(cand, ref, smoothing=method, dtype=torch.float64).item()
        assert abs(got - nltk_sentence([[1, 2, 9, 3, 4, 9]], [1, 2, 3, 4, 5, 6], (0.25,) * 4, method)) < 1e-12
    # method3 (NIST): the k-th zero-match order gets 1 / (2**k * denominator).
    expected = math.exp(
        0.25 * (math.log(4 / 6) + math.log(2 / 5) + math.log(1 / (2 * 4)) + math.log(1 / (4 * 3)))
    )
    assert (
        abs(tensor_sentence_bleu(cand, ref, smoothing="exp", dtype=torch.float64).item() - expected) < 1e-12
    )


def test_clipping_and_closest_reference_tie():
    # "the the the ..." clipped by the maximum count in any one reference.
    cand = torch.tensor([[1, 1, 1, 1, 1, 1, 1]])
    refs = torch.tensor([[[1, 2, 3, 1, 4, 5, 0], [2, 1, 6, 7, 8, 0, 0]]])
    assert ngram_statistics(cand, refs, max_n=1)["matches"].item() == 2
    # Hypothesis of length 4 with references of lengths 2 and 6: equally close, NLTK takes the shorter (2).
    cand = torch.tensor([[1, 2, 3, 4]])
    refs = torch.tensor([[[1, 2, 0, 0, 0, 0], [1, 2, 3, 5, 6, 7]]])
    assert ngram_statistics(cand, refs)["ref_len"].item() == 2
    swapped = refs.flip(1)
    assert ngram_statistics(cand, swapped)["ref_len"].item() == 2
    got = tensor_sentence_bleu(cand, refs, dtype=torch.float64).item()
    assert (
        abs(got - nltk_sentence([[1, 2], [1, 2, 3, 5, 6, 7]], [1, 2, 3, 4], (0.25,) * 4, "method1")) < 1e-12
    )


def test_absent_references_and_no_reference():
    cand = torch.tensor([[1, 2, 3], [1, 2, 3]])
    refs = torch.tensor([[[0, 0, 0, 0], [1, 2, 3, 4]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    stats = ngram_statistics(cand, refs)
    assert stats["ref_len"].tolist() == [4, 0]  # the all-pad row is not a length-0 reference
    got = tensor_sentence_bleu(cand, refs, dtype=torch.float64)
    assert abs(got[0].item() - nltk_sentence([[1, 2, 3, 4]], [1, 2, 3], (0.25,) * 4, "method1")) < 1e-12
    assert got[1].item() == 0.0


def test_method5_quirks():
    # The extra precision after the last order is always the 5-gram one, whatever max_n is.
    hyp, ref = [1, 2, 3, 4, 5, 6, 7, 1, 2], [1, 2, 3, 4, 5, 6, 9, 1, 2]
    cand, refs = torch.tensor([hyp]), torch.tensor([ref])
    for max_n in (1, 2, 3, 6):
        w = (1.0 / max_n,) * max_n
        got = tensor_sentence_bleu(cand, refs, max_n=max_n, smoothing="method5", dtype=torch.float64).item()
        assert abs(got - nltk_sentence([ref], hyp, w, "method5")) < 1e-12
    # Corpus level: NLTK takes that 5-gram precision from the last sentence only.
    hyps = [[1, 2, 3, 4, 5, 6], [4, 3, 2, 1, 9]]
    refs2 = [[[1, 2, 3, 4, 5, 6]], [[4, 3, 2, 1, 8]]]
    cand, ref = pad_id_lists(hyps, refs2)
    for method in ("method5", "method7"):
        got = tensor_corpus_bleu(cand, ref, smoothing=method, pad_token_id=-1, dtype=torch.float64).item()
        assert abs(got - nltk_corpus(refs2, hyps, (0.25,) * 4, method)) < 1e-12


def test_left_padding_and_pad_inside():
    right = torch.tensor([[5, 6, 7, 8, 0, 0]])
    left = torch.tensor([[0, 0, 5, 6, 7, 8]])
    holes = torch.tensor([[5, 0, 6, 7, 0, 8]])
    ref = torch.tensor([[5, 6, 7, 9, 8, 0]])
    base = tensor_sentence_bleu(right, ref, dtype=torch.float64)
    assert torch.equal(tensor_sentence_bleu(left, ref, dtype=torch.float64), base)
    assert torch.equal(tensor_sentence_bleu(holes, ref, dtype=torch.float64), base)


def test_integer_dtypes_batch_edges():
    cand = torch.tensor([[3, 4, 5, 6]], dtype=torch.int32)
    ref = torch.tensor([[3, 4, 5, 6]], dtype=torch.int16)
    assert tensor_sentence_bleu(cand, ref).item() == pytest.approx(1.0, abs=1e-7)
    empty = torch.zeros(0, 5, dtype=torch.long)
    assert tensor_sentence_bleu(empty, torch.zeros(0, 2, 5, dtype=torch.long)).shape == (0,)
    assert tensor_corpus_bleu(empty, torch.zeros(0, 5, dtype=torch.long)).item() == 0.0
    no_width = torch.zeros(3, 0, dtype=torch.long)
    assert tensor_sentence_bleu(no_width, torch.ones(3, 4, dtype=torch.long)).tolist() == [0.0, 0.0, 0.0]


def test_auto_reweigh_and_no_padding():
    rng = random.Random(11)
    hyps = [[rng.randint(1, 4) for _ in range(rng.randint(0, 5))] for _ in range(30)]
    refs = [[[rng.randint(1, 4) for _ in range(rng.randint(1, 6))]] for _ in range(30)]
    cand, ref = pad_id_lists(hyps, refs)
    for method in ("method0", "method1", "method4", "method7"):
        got = tensor_sentence_bleu(
            cand, ref, smoothing=method, pad_token_id=-1, auto_reweigh=True, dtype=torch.float64
        )
        sf = getattr(nltk_bleu.SmoothingFunction(), method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = [
                nltk_bleu.sentence_bleu(r, h, smoothing_function=sf, auto_reweigh=True)
                for r, h in zip(refs, hyps)
            ]
            want_corpus = nltk_bleu.corpus_bleu(refs, hyps, smoothing_function=sf, auto_reweigh=True)
        assert (got - torch.tensor(want, dtype=torch.float64)).abs().max() <= 1e-6, method
        corpus = tensor_corpus_bleu(
            cand, ref, smoothing=method, pad_token_id=-1, auto_reweigh=True, dtype=torch.float64
        )
        assert abs(corpus.item() - want_corpus) <= 1e-6
    # pad_token_id=None: every id is a token, 0 included.
    cand, ref = torch.tensor([[0, 1, 2, 0]]), torch.tensor([[0, 1, 2, 0]])
    assert tensor_sentence_bleu(cand, ref, pad_token_id=None).item() == pytest.approx(1.0, abs=1e-7)
    assert ngram_statistics(cand, ref, pad_token_id=None)["hyp_len"].item() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_with_a_single_host_sync():
    gen = torch.Generator().manual_seed(5)
    cand = torch.randint(1, 50, (64, 120), generator=gen)
    ref = torch.randint(1, 50, (64, 2, 100), generator=gen)
    ref[:, 0, :60] = cand[:, :60]
    cand[:, 100:] = 0
    want = tensor_sentence_bleu(cand, ref, smoothing="method5", dtype=torch.float64)
    cand_gpu, ref_gpu = cand.cuda(), ref.cuda()
    tensor_sentence_bleu(cand_gpu, ref_gpu)  # warm-up (lazy CUDA init synchronises)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = tensor_sentence_bleu(cand_gpu, ref_gpu, smoothing="method5", dtype=torch.float64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]  # the one read of the id range
    # Same integer statistics; CUDA's exp/log may differ from the CPU's in the last bit.
    assert got.device.type == "cuda" and (got.cpu() - want).abs().max() <= 1e-12
    corpus = tensor_corpus_bleu(cand_gpu, ref_gpu, dtype=torch.float64)
    assert abs(corpus.item() - tensor_corpus_bleu(cand, ref, dtype=torch.float64).item()) <= 1e-12


# --- sacrebleu cross-check (an independent implementation) --------------------------------------------------


def test_corpus_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    gen = torch.Generator().manual_seed(3)
    batch = 40
    lengths = torch.randint(6, 30, (batch,), generator=gen)
    cand = torch.randint(1, 12, (batch, 30), generator=gen)
    ref = torch.where(
        torch.rand(batch, 2, 34, generator=gen) < 0.6, torch.randint(1, 12, (batch, 2, 34), generator=gen), 0
    )
    ref[:, 0, :30] = torch.where(torch.rand(batch, 30, generator=gen) < 0.5, cand, ref[:, 0, :30])
    ref = torch.where(ref == 0, 1, ref)
    ref[:, 1, 20:] = 0  # second reference shorter
    cand[torch.arange(30) >= lengths[:, None]] = 0
    hyps = [" ".join(f"w{t}" for t in row if t) for row in cand.tolist()]
    refs = [[" ".join(f"w{t}" for t in r[i] if t) for r in ref.tolist()] for i in range(2)]
    # Candidates have >= 6 tokens so NLTK's per-sentence max(1, count) equals sacrebleu's count; no order has
    # zero matches at corpus level, so sacrebleu's smoothing is not involved; sacrebleu reports 0-100.
    sacre = sacrebleu.corpus_bleu(hyps, refs, tokenize="none", smooth_method="none", force=True)
    ours = tensor_corpus_bleu(cand, ref, smoothing="method0", dtype=torch.float64).item()
    assert abs(ours * 100 - sacre.score) < 1e-9
    # Sentence level with sacrebleu's "floor" smoothing == NLTK method1 when effective_order is off.
    metric = sacrebleu.metrics.BLEU(
        tokenize="none", smooth_method="floor", smooth_value=0.1, effective_order=False
    )
    per_sentence = tensor_sentence_bleu(cand, ref, smoothing="floor", dtype=torch.float64)
    for i in range(batch):
        want = metric.sentence_score(hyps[i], [refs[0][i], refs[1][i]]).score
        assert abs(per_sentence[i].item() * 100 - want) < 1e-9


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cand, ref, kwargs, error, message",
    [
        (
            torch.ones(2, 4, dtype=torch.long),
            torch.ones(3, 4, dtype=torch.long),
            {},
            ValueError,
            "batch size 2 .* 3",
        ),
        (
            torch.ones(2, 4),
            torch.ones(2, 4, dtype=torch.long),
            {},
            TypeError,
            r"integer token ids.*\.long\(\)",
        ),
        (
            torch.ones(2, 4, dtype=torch.long),
            torch.ones(2, 4, dtype=torch.float16),
            {},
            TypeError,
            "references must",
        ),
        (
            torch.tensor([[1, -3, 2]]),
            torch.ones(1, 3, dtype=torch.long),
            {},
            ValueError,
            "negative token id -3",
        ),
        (torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, -100]]), {}, ValueError, "pad_token_id=-100"),
        (
            torch.ones(4, dtype=torch.long),
            torch.ones(4, dtype=torch.long),
            {},
            ValueError,
            r"\[batch, length\].*unsqueeze",
        ),
        (
            torch.ones(2, 4, dtype=torch.long),
            torch.ones(2, 1, 1, 4, dtype=torch.long),
            {},
            ValueError,
            "num_references",
        ),
        (
            torch.ones(2, 4, dtype=torch.long),
            torch.ones(2, 4, dtype=torch.long),
            {"weights": (0.5, 0.5)},
            ValueError,
            "2 entries but max_n=4.*max_n=2",
        ),
        (
            torch.ones(2, 4, dtype=torch.long),
            torch.ones(2, 4, dtype=torch.long),
            {"max_n": 0},
            ValueError,
            "max_n",
        ),
        (
            torch.ones(2, 4, dtype=torch.long),
            torch.ones(2, 4, dtype=torch.long),
            {"smoothing": "method6"},
            ValueError,
            "Unknown smoothing",
        ),
        ([[1, 2]], torch.ones(1, 2, dtype=torch.long), {}, TypeError, "pad_sequence"),
    ],
)
def test_bad_input(cand, ref, kwargs, error, message):
    for fn in (tensor_sentence_bleu, tensor_corpus_bleu):
        with pytest.raises(error, match=message):
            fn(cand, ref, **kwargs)


def test_negative_pad_id_is_allowed():
    cand = torch.tensor([[4, 5, 6, 7, -100]])
    ref = torch.tensor([[4, 5, 6, 7, -100]])
    assert tensor_sentence_bleu(cand, ref, pad_token_id=-100).item() == pytest.approx(1.0, abs=1e-7)


# --- memory: linear in the number of tokens -----------------------------------------------------------------


# The benchmark's measurement (profiler allocator events), so the test checks what the benchmark reports.
from transformers_rxt.benchmarks.bench_tensorbleu import torch_cpu_peak_bytes as peak_cpu_bytes  # noqa: E402


def test_memory_grows_linearly_with_batch():
    gen = torch.Generator().manual_seed(0)
    peaks = {}
    for batch in (32, 128):
        cand = torch.randint(1, 32000, (batch, 256), generator=gen)
        ref = torch.randint(1, 32000, (batch, 256), generator=gen)
        ref[:, :128] = cand[:, :128]  # plenty of shared n-grams so every order has work
        for strategy in ("sparse", "dense"):
            peaks[batch, strategy] = peak_cpu_bytes(
                lambda: tb._statistics(cand, ref, max_n=4, pad_token_id=0, strategy=strategy)
            )
    for strategy in ("sparse", "dense"):
        ratio = peaks[128, strategy] / peaks[32, strategy]
        assert 3.0 < ratio < 5.0, (strategy, peaks)  # 4x the tokens -> ~4x the memory, not 16x
        # At most a few hundred bytes per token (2 x 128 x 256): nothing batch-squared or vocabulary-sized.
        assert peaks[128, strategy] < 400 * 2 * 128 * 256, (strategy, peaks)


# --- reward -------------------------------------------------------------------------------------------------


def test_tensorbleu_reward_masks_and_ignored_ids():
    cand = torch.tensor([[0, 7, 8, 9, 2, 5], [7, 8, 2, 5, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    ref = torch.tensor([[0, 7, 8, 9, 3], [7, 8, 9, 3, 3]])
    ref_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    got = tensorbleu_reward(
        cand, ref, completion_mask=mask, reference_mask=ref_mask, ignore_token_ids=[2], max_n=2, scale=10.0
    )
    # Token 0 is real here (masks decide padding); 2 (say EOS) is dropped from both sides.
    want = [
        10 * nltk_sentence([[0, 7, 8, 9]], [0, 7, 8, 9], (0.5, 0.5), "method1"),
        10 * nltk_sentence([[7, 8, 9, 3]], [7, 8], (0.5, 0.5), "method1"),
    ]
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(want, abs=1e-5)


def test_trl_reward_callable():
    vocab = {}

    def tokenize(text):
        return [vocab.setdefault(w, len(vocab)) for w in text.split()]

    reward = TensorBLEUReward(reference_column="answer", tokenizer=tokenize, max_n=2, device="cpu")
    assert reward.__name__ == "tensorbleu"
    completion_ids = [tokenize("the cat sat on the mat"), tokenize("a dog"), tokenize("hello there")]
    answers = ["the cat is on the mat", ["a dog barks", "the dog"], None]
    got = reward(
        prompts=["p1", "p2", "p3"],
        completions=["c1", "c2", "c3"],
        completion_ids=completion_ids,
        answer=answers,
        trainer_state=None,
        log_extra=None,
        log_metric=None,
    )
    want0 = nltk_sentence([tokenize("the cat is on the mat")], completion_ids[0], (0.5, 0.5), "method1")
    want1 = nltk_sentence(
        [tokenize("a dog barks"), tokenize("the dog")], completion_ids[1], (0.5, 0.5), "method1"
    )
    assert got[0] == pytest.approx(want0, abs=1e-6) and got[1] == pytest.approx(want1, abs=1e-6)
    assert got[2] is None
    ids_reward = TensorBLEUReward(reference_column="reference_ids")
    assert ids_reward(completion_ids=[[1, 2, 3, 4]], reference_ids=[[1, 2, 3, 4]])[0] == pytest.approx(
        1.0, abs=1e-6
    )
    with pytest.raises(KeyError, match="reference_column"):
        ids_reward(completion_ids=[[1, 2, 3]], answer=[[1]])
