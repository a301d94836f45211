"""The embedded synthetic memory corpus: a small, closed-world English for training and testing memory.

Everything is procedural and seeded (no files, no network), so the tiny curriculum and the tests can run
anywhere. The world has people, objects with colours and sizes, places, pets, ages and counts. A *fact* binds
one value to a person (and maybe an object), e.g. ``Anna has a red kite.``; questions about it have short,
templated answers (``What colour is Anna's kite?`` -> ``Anna's kite is red.``) whose key word (``red``)
decides exact-match accuracy.

Produced:

- pre-training text (:func:`build_pretraining_dataset`): paragraphs of facts, in-context questions with their
  answers, world knowledge and arithmetic;
- single-turn SFT pairs (:func:`build_sft_dataset`) in the reference's ``{"query", "answer"}`` format;
- multi-turn dialogues (:func:`build_memory_dialogues`) in the reference's MRL record format
  ``{"query", "answer", "interactions": [{"query", "answer"}, ...]}`` plus a ``probes`` list: a fact stated at
  turn t is asked about at turn t + d (d = 1..max_distance), with distractor turns (other facts, small talk,
  arithmetic) in between;
- a held-out split: every fact is a (kind, person, object, value) combination, and a fixed ~15 % of all
  combinations (chosen by a stable hash, independent of the seed) never occur in any train-split text;
- :func:`score_fact_accuracy`: exact-match fact accuracy per distance.

The vocabulary is a few hundred words, so a byte-level BPE of ~1-2k tokens covers it with short sequences.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..extras import require_extra

__all__ = [
    "PEOPLE",
    "OBJECTS",
    "COLOURS",
    "SIZES",
    "PLACES",
    "PETS",
    "ITEMS",
    "FACT_KINDS",
    "Fact",
    "is_heldout_fact",
    "sample_fact",
    "check_kind_weights",
    "pretraining_texts",
    "sft_pairs",
    "memory_dialogues",
    "build_pretraining_dataset",
    "build_sft_dataset",
    "build_memory_dialogues",
    "build_memory_corpus",
    "dialogue_turns",
    "iter_probes",
    "fact_key_correct",
    "fact_recall_reward",
    "score_fact_accuracy",
    "score_dialogue_answers",
    "format_accuracy_table",
]

Split = Literal["train", "heldout"]

PEOPLE: tuple[str, ...] = (
    "Anna", "Ben", "Tom", "Zoe", "Leo", "Mia", "Sam", "Eva", "Max", "Lily", "Jack", "Nora",
    "Finn", "Ruby", "Owen", "Ivy", "Paul", "Kate", "Adam", "Emma", "Luke", "Rose", "Dan", "Lucy",
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "kite", "ball", "hat", "cup", "bike", "book", "box", "boat",
    "lamp", "bag", "car", "coat", "key", "drum", "chair", "kettle",
)  # fmt: skip
COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "black", "white", "pink", "brown", "orange", "grey",
)  # fmt: skip
SIZES: tuple[str, ...] = ("tiny", "small", "big", "huge")
PLACES: tuple[str, ...] = (
    "park", "market", "school", "library", "beach", "farm",
    "station", "garden", "museum", "bakery", "river", "forest",
)  # fmt: skip
PETS: tuple[str, ...] = ("cat", "dog", "owl", "fox", "fish", "horse", "rabbit", "parrot", "turtle", "goat")
ITEMS: tuple[str, ...] = (
    "apples", "pears", "plums", "lemons", "eggs", "cookies", "stamps", "coins", "shells", "marbles",
)  # fmt: skip
AGES: tuple[str, ...] = tuple(str(n) for n in range(4, 91))
COUNTS: tuple[str, ...] = tuple(str(n) for n in range(2, 21))

#: Fact kinds and the set each value is drawn from (also the "competitors" the scorer checks for).
FACT_KINDS: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "size": SIZES,
    "place": PLACES,
    "age": AGES,
    "count": COUNTS,
    "pet": PETS,
}
# Sampling weights: colour facts are the "headline" memory test; the rest add variety.
_KIND_WEIGHTS = {"colour": 3, "size": 1, "place": 2, "age": 1, "count": 1, "pet": 2}

_STATEMENTS: dict[str, tuple[str, ...]] = {
    "colour": ("{p} has a {v} {o}.", "{p}'s {o} is {v}.", "The {o} that {p} has is {v}."),
    "size": ("{p} has a {v} {o}.", "{p}'s {o} is {v}.", "The {o} that {p} has is {v}."),
    "place": ("{p} is at the {v}.", "{p} went to the {v}.", "Right now {p} is at the {v}."),
    "age": ("{p} is {v} years old.", "{p} turned {v} this year.", "The age of {p} is {v}."),
    "count": ("{p} has {v} {o}.", "{p} collected {v} {o}.", "There are {v} {o} in the bag of {p}."),
    "pet": ("{p} has a pet {v}.", "{p} keeps a {v} as a pet.", "The pet of {p} is a {v}."),
}
_QUESTIONS: dict[str, str] = {
    "colour": "What colour is {p}'s {o}?",
    "size": "How big is {p}'s {o}?",
    "place": "Where is {p}?",
    "age": "How old is {p}?",
    "count": "How many {o} does {p} have?",
    "pet": "What pet does {p} have?",
}
_ANSWERS: dict[str, str] = {
    "colour": "{p}'s {o} is {v}.",
    "size": "{p}'s {o} is {v}.",
    "place": "{p} is at the {v}.",
    "age": "{p} is {v} years old.",
    "count": "{p} has {v} {o}.",
    "pet": "{p} has a pet {v}.",
}
_ACKS = ("Okay, {a}", "Got it, {a}", "I see, {a}", "Noted, {a}")

# Stateless small talk: answerable without memory, used as distractor turns.
_WORLD_QA: tuple[tuple[str, str], ...] = (
    ("What colour is the sky?", "The sky is blue."),
    ("What colour is grass?", "Grass is green."),
    ("What colour is snow?", "Snow is white."),
    ("What colour is a lemon?", "A lemon is yellow."),
    ("Where do fish live?", "Fish live in the river."),
    ("What does a cat say?", "A cat says meow."),
    ("What does a dog say?", "A dog says woof."),
    ("How many legs does a dog have?", "A dog has 4 legs."),
    ("How many days are in a week?", "There are 7 days in a week."),
    ("What do cows give?", "Cows give milk."),
    ("Where can you buy bread?", "You can buy bread at the bakery."),
    ("Where do children learn?", "Children learn at the school."),
    ("Where can you read books?", "You can read books at the library."),
    ("What is the opposite of big?", "The opposite of big is small."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What do bees make?", "Bees make honey."),
    ("When do people sleep?", "People sleep at night."),
    ("Where do trains stop?", "Trains stop at the station."),
    ("Where do trees grow?", "Trees grow in the forest."),
    ("Hello!", "Hello! How can I help you?"),
    ("How are you?", "I am fine, thank you."),
    ("Thank you!", "You are welcome."),
    ("Who are you?", "I am a small reactive model."),
    ("Can you remember things?", "Yes, I remember what you tell me."),
)
_WORLD_SENTENCES: tuple[str, ...] = tuple(a for q, a in _WORLD_QA[:19])


@dataclass(frozen=True)
class Fact:
    """One fact of the closed world: ``kind`` binds ``value`` to ``person`` (and ``obj`` for
    colour/size/count).
    """

    kind: str
    person: str
    obj: str | None
    value: str

    @property
    def key(self) -> tuple[str, str, str | None]:
        """What the fact is about; two facts with the same key contradict each other."""
        return (self.kind, self.person, self.obj)

    def _fmt(self, template: str) -> str:
        return template.format(p=self.person, o=self.obj, v=self.value)

    def statement(self, variant: int = 0) -> str:
        """The fact as a sentence (3 phrasings, ``variant`` modulo 3)."""
        forms = _STATEMENTS[self.kind]
        return self._fmt(forms[variant % len(forms)])

    def question(self) -> str:
        """The recall question, e.g. ``What colour is Anna's kite?``."""
        return self._fmt(_QUESTIONS[self.kind])

    def answer(self) -> str:
        """The canonical short answer, e.g. ``Anna's kite is red.``."""
        return self._fmt(_ANSWERS[self.kind])


def _stable_bucket(text: str, buckets: int = 100) -> int:
    # zlib.crc32 is stable across processes and Python versions (built-in hash() of str is salted).
    return zlib.crc32(text.encode("utf-8")) % buckets


def is_heldout_fact(fact: Fact, heldout_percent: int = 15) -> bool:
    """Whether ``fact``'s combination belongs to the held-out split (a fixed, seed-independent ~15 %)."""
    return _stable_bucket(f"{fact.kind}|{fact.person}|{fact.obj}|{fact.value}") < heldout_percent


def _rng(seed: int, *tags: str) -> random.Random:
    # Seeding with a string is deterministic (sha512-based), and the tags keep the streams independent.
    return random.Random("|".join([str(seed), *tags]))


def sample_fact(
    rng: random.Random,
    split: Split = "train",
    *,
    exclude_keys: Iterable[tuple[str, str, str | None]] = (),
    heldout_percent: int = 15,
    kind_weights: Mapping[str, float] | None = None,
) -> Fact:
    """Draw a random fact of ``split`` whose key is not in ``exclude_keys``; ``kind_weights`` (see
    :func:`check_kind_weights`) replaces the corpus's kind mix."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    excluded = set(exclude_keys)
    mix = check_kind_weights(kind_weights)
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    for _ in range(10_000):
        kind = rng.choices(kinds, weights)[0]
        person = rng.choice(PEOPLE)
        obj = (
            rng.choice(OBJECTS)
            if kind in ("colour", "size")
            else rng.choice(ITEMS)
            if kind == "count"
            else None
        )
        if (kind, person, obj) in excluded:
            continue
        fact = Fact(kind, person, obj, rng.choice(FACT_KINDS[kind]))
        if is_heldout_fact(fact, heldout_percent) == (split == "heldout"):
            return fact
    raise RuntimeError("could not sample a fact; too many excluded keys")  # pragma: no cover


def check_kind_weights(kind_weights: Mapping[str, float] | None) -> dict[str, float]:
    """The fact-kind sampling weights: the corpus's own mix (colour 3, place 2, pet 2, size 1, age 1, count 1)
    when None, else ``kind_weights`` (every kind named, weights >= 0, not all 0). A training corpus can
    over-sample the kinds that are hard to recall (values from many classes: ages, counts); the held-out
    dialogues the recall figures come from keep the corpus's own mix."""
    if kind_weights is None:
        return dict(_KIND_WEIGHTS)
    weights = dict(kind_weights)
    if set(weights) != set(_KIND_WEIGHTS) or any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"kind_weights must give every fact kind {sorted(_KIND_WEIGHTS)} a weight >= 0, not all 0; "
                         f"got {weights}")
    return {kind: float(weights[kind]) for kind in _KIND_WEIGHTS}


def _small_talk(rng: random.Random) -> tuple[str, str]:
    """A stateless question/answer pair (world knowledge or arithmetic)."""
    r = rng.random()
    if r < 0.35:
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    return rng.choice(_WORLD_QA)


def _new_fact(rng: random.Random, split: Split, keys: set, heldout_percent: int,
              kind_weights: Mapping[str, float] | None = None) -> Fact:
    """A fact whose key is not in ``keys`` yet; adds its key."""
    fact = sample_fact(rng, split, exclude_keys=keys, heldout_percent=heldout_percent, kind_weights=kind_weights)
    keys.add(fact.key)
    return fact


def _statement_turn(rng: random.Random, fact: Fact) -> tuple[str, str]:
    query = fact.statement(rng.randrange(3))
    return query, rng.choice(_ACKS).format(a=fact.answer())


# ------------------------------------------------------------------------------------------------------------
# Generators (plain Python)
# ------------------------------------------------------------------------------------------------------------


def pretraining_texts(n: int, seed: int = 0, *, heldout_percent: int = 15,
                      kind_weights: Mapping[str, float] | None = None) -> list[str]:
    """``n`` paragraphs of plain text built from train-split facts only.

    Kinds: fact paragraphs followed by in-context questions and their answers (the recall pattern the memory
    must later serve), world-knowledge/arithmetic paragraphs, and short dialogues written as prose.
    """
    rng = _rng(seed, "pretrain")
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.6:
            facts: list[Fact] = []
            for _ in range(rng.randint(2, 5)):
                facts.append(
                    sample_fact(
                        rng, "train", exclude_keys=[f.key for f in facts], heldout_percent=heldout_percent,
                        kind_weights=kind_weights,
                    )
                )
            sentences = [f.statement(rng.randrange(3)) for f in facts]
            if rng.random() < 0.5:
                sentences.append(rng.choice(_WORLD_SENTENCES))
            for f in rng.sample(facts, k=min(len(facts), rng.randint(1, 2))):
                sentences += [f.question(), f.answer()]
            out.append(" ".join(sentences))
        elif r < 0.8:
            sentences = []
            for _ in range(rng.randint(3, 6)):
                if rng.random() < 0.5:
                    sentences.append(rng.choice(_WORLD_SENTENCES))
                else:
                    sentences.append(_small_talk(rng)[1])
            out.append(" ".join(sentences))
        else:
            f = sample_fact(rng, "train", heldout_percent=heldout_percent, kind_weights=kind_weights)
            q, a = _small_talk(rng)
            out.append(
                f'{f.person} said: "{f.statement(rng.randrange(3))}" Later someone asked: "{f.question()}" '
                f'The answer was: "{f.answer()}" Then someone asked: "{q}" The answer was: "{a}"'
            )
    return out


def sft_pairs(
    n: int, seed: int = 0, split: Split = "train", *, heldout_percent: int = 15,
    kind_weights: Mapping[str, float] | None = None,
) -> list[dict[str, str]]:
    """``n`` single-turn ``{"query", "answer"}`` pairs: fact statements with acknowledgements (~40 %), recall
    questions with their answers (~35 %) and small talk (~25 %)."""
    rng = _rng(seed, "sft", split)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            q, a = _statement_turn(rng, sample_fact(rng, split, heldout_percent=heldout_percent,
                                                    kind_weights=kind_weights))
        elif r < 0.75:
            f = sample_fact(rng, split, heldout_percent=heldout_percent, kind_weights=kind_weights)
            q, a = f.question(), f.answer()
        else:
            q, a = _small_talk(rng)
        out.append({"query": q, "answer": a})
    return out


def memory_dialogues(
    n: int,
    max_distance: int = 8,
    seed: int = 0,
    split: Split = "train",
    *,
    num_turns: int | None = None,
    fact_rate: float = 0.45,
    probe_rate: float = 0.7,
    heldout_percent: int = 15,
    reviews: bool = False,
    kind_weights: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """``n`` multi-turn episodes in the reference's MRL record format, with recall probes.

    Every episode has ``num_turns`` turns (default ``max_distance + 1``; all episodes the same length, as the
    reference's curriculum collate expects). Episode ``i`` has a *target* fact stated at some turn t and asked
    about at turn t + d with ``d = i % max_distance + 1``, so distances are covered evenly. Every other turn
    is, with probability ``fact_rate``, a new fact (asked about later with probability ``probe_rate``, at a
    random free distance) or else small talk. Facts in one episode never share a key, so every probe has
    exactly one right answer.

    Record: ``query``/``answer`` (turn 0), ``interactions`` (turns 1..), and ``probes``: one dict per recall
    question with ``turn`` (0-based index in the episode), ``distance``, ``fact_turn``, ``kind``, ``expected``
    (the key value, e.g. ``"red"``) and ``answer`` (the reference answer, also the turn's ``answer``).

    ``reviews=True`` adds ``reviews``: after every turn k that follows a fact (k = 1 .. ``num_turns``), the
    recall question of one fact stated before turn k (drawn at random), as a ``turn``/``query``/``answer``
    dict. A review asks the memory *before* turn k (after turns 0 .. k-1 are written; ``turn == num_turns``:
    after the whole episode) and is not part of the conversation: it is never written into the memory.
    Stage 4 trains on them as extra answers (``review_loss_weight``), so every turn gives a retention signal
    for an earlier fact, not only the few probe turns. The dialogues are the same with or without reviews.
    """
    if max_distance < 1:
        raise ValueError(f"max_distance must be >= 1, got {max_distance}")
    turns_n = num_turns if num_turns is not None else max_distance + 1
    if turns_n < 2:
        raise ValueError(f"num_turns must be >= 2, got {turns_n}")
    rng = _rng(seed, "dialogues", split, str(max_distance), str(turns_n))
    episodes = []
    for i in range(n):
        d_target = min(i % max_distance + 1, turns_n - 1)
        slots: list[tuple | None] = [None] * turns_n
        keys: set = set()

        t0 = rng.randint(0, turns_n - 1 - d_target)
        target = _new_fact(rng, split, keys, heldout_percent, kind_weights)
        slots[t0] = ("fact", target)
        slots[t0 + d_target] = ("probe", target, d_target)
        for s in range(turns_n):
            if slots[s] is not None:
                continue
            if rng.random() < fact_rate:
                f = _new_fact(rng, split, keys, heldout_percent, kind_weights)
                slots[s] = ("fact", f)
                free = [d for d in range(1, max_distance + 1) if s + d < turns_n and slots[s + d] is None]
                if free and rng.random() < probe_rate:
                    d = rng.choice(free)
                    slots[s + d] = ("probe", f, d)
            else:
                slots[s] = ("talk", _small_talk(rng))
        turns: list[dict[str, str]] = []
        probes: list[dict[str, Any]] = []
        for k, slot in enumerate(slots):
            assert slot is not None
            if slot[0] == "fact":
                q, a = _statement_turn(rng, slot[1])
            elif slot[0] == "probe":
                f, d = slot[1], slot[2]
                q, a = f.question(), f.answer()
                probes.append(
                    {
                        "turn": k,
                        "distance": d,
                        "fact_turn": k - d,
                        "kind": f.kind,
                        "expected": f.value,
                        "answer": a,
                    }
                )
            else:
                q, a = slot[1]
            turns.append({"query": q, "answer": a})
        episode = {
            "query": turns[0]["query"],
            "answer": turns[0]["answer"],
            "interactions": turns[1:],
            "probes": probes,
        }
        if reviews:
            # A stream of its own per episode: the dialogues do not change when reviews are asked for.
            review_rng = _rng(seed, "reviews", split, str(max_distance), str(turns_n), str(i))
            episode["reviews"] = _reviews(review_rng, slots)
        episodes.append(episode)
    return episodes


def _reviews(rng: random.Random, slots: list[tuple]) -> list[dict[str, Any]]:
    """One recall question per turn boundary k (1 .. len(slots)) about a fact stated before turn k."""
    out, stated = [], []
    for k in range(1, len(slots) + 1):
        if slots[k - 1][0] == "fact":
            stated.append(slots[k - 1][1])
        if stated:
            fact = rng.choice(stated)
            out.append({"turn": k, "query": fact.question(), "answer": fact.answer()})
    return out


# ------------------------------------------------------------------------------------------------------------
# datasets builders
# ------------------------------------------------------------------------------------------------------------


def build_pretraining_dataset(n: int = 20_000, seed: int = 0, *, kind_weights: Mapping[str, float] | None = None):
    """``datasets.Dataset`` with a ``text`` column of ``n`` paragraphs (train-split facts only)."""
    datasets = require_extra("datasets")

    return datasets.Dataset.from_dict({"text": pretraining_texts(n, seed, kind_weights=kind_weights)})


def build_sft_dataset(n: int = 20_000, seed: int = 0, split: Split = "train", *,
                      kind_weights: Mapping[str, float] | None = None):
    """``datasets.Dataset`` with ``query``/``answer`` columns (the reference's SFT record format)."""
    datasets = require_extra("datasets")

    return datasets.Dataset.from_list(sft_pairs(n, seed, split, kind_weights=kind_weights))


def build_memory_dialogues(
    n: int = 5_000,
    max_distance: int = 8,
    seed: int = 0,
    split: Split = "train",
    *,
    num_turns: int | None = None,
    fact_rate: float = 0.45,
    probe_rate: float = 0.7,
    reviews: bool = False,
    kind_weights: Mapping[str, float] | None = None,
):
    """``datasets.Dataset`` of :func:`memory_dialogues` episodes (columns ``query``, ``answer``,
    ``interactions``, ``probes``, and ``reviews`` when asked for). ``split="heldout"`` uses only held-out fact
    combinations."""
    datasets = require_extra("datasets")

    return datasets.Dataset.from_list(
        memory_dialogues(
            n,
            max_distance,
            seed,
            split,
            num_turns=num_turns,
            fact_rate=fact_rate,
            probe_rate=probe_rate,
            reviews=reviews,
            kind_weights=kind_weights,
        )
    )


def build_memory_corpus(
    *,
    n_pretrain: int = 20_000,
    n_sft: int = 20_000,
    n_dialogues: int = 5_000,
    n_heldout: int = 500,
    max_distance: int = 8,
    seed: int = 0,
):
    """Everything at once: ``{"pretrain": Dataset, "sft": Dataset, "dialogues": DatasetDict(train,
    heldout)}``.
    """
    datasets = require_extra("datasets")

    return {
        "pretrain": build_pretraining_dataset(n_pretrain, seed),
        "sft": build_sft_dataset(n_sft, seed),
        "dialogues": datasets.DatasetDict(
            {
                "train": build_memory_dialogues(n_dialogues, max_distance, seed, "train"),
                "heldout": build_memory_dialogues(n_heldout, max_distance, seed, "heldout"),
            }
        ),
    }


# ------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------


def dialogue_turns(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The turns of an MRL record in order: the first ``query``/``answer``, then ``interactions``."""
    from .formats import episode_turns

    return episode_turns(record)


def iter_probes(dialogues: Iterable[Mapping[str, Any]]) -> Iterable[dict[str, Any]]:
    """Flatten the recall probes of many episodes: each probe dict plus ``episode`` (index) and ``query``."""
    for e, record in enumerate(dialogues):
        turns = dialogue_turns(record)
        for p in record.get("probes") or []:
            yield {**p, "episode": e, "query": turns[p["turn"]]["query"]}


_WORD = re.compile(r"[a-z0-9]+")


def fact_key_correct(prediction: str, expected: str, kind: str | None = None) -> bool:
    """Exact match of the key fact word: ``expected`` occurs as a whole word in ``prediction`` and no other
    value of the same kind does (so "red or blue" is wrong). Case-insensitive."""
    words = set(_WORD.findall(prediction.lower()))
    target = expected.lower()
    if target not in words:
        return False
    if kind is None:
        return True
    rivals = {v.lower() for v in FACT_KINDS.get(kind, ())} - {target}
    return not (words & rivals)


def _question_kind(query: str) -> str | None:
    """The fact kind a recall question asks about (``None`` for any other query)."""
    for kind, pattern in _QUESTION_PATTERNS.items():
        if pattern.search(query):
            return kind
    return None


_QUESTION_PATTERNS = {
    kind: re.compile(re.escape(t).replace(re.escape("{p}"), r"\w+").replace(re.escape("{o}"), r"\w+"), re.I)
    for kind, t in _QUESTIONS.items()
}


def fact_recall_reward(
    prompts: Sequence[str], completions: Sequence[str], references: Sequence[str], **kwargs: Any
) -> list[float | None]:
    """A TRL-style reward function for the synthetic corpus: 1.0 when the answer to a recall question names
    the right value (:func:`fact_key_correct`, the value read from the reference answer), 0.0 when it does
    not, ``None`` for turns that are not recall questions (TRL's convention for "does not apply").

    Used as ``IMPOTrainer(..., reward_funcs=[fact_recall_reward])``: BLEU against the reference barely moves
    when only the one key word is wrong, this reward moves by 1.
    """
    out: list[float | None] = []
    for prompt, completion, reference in zip(prompts, completions, references):
        kind = _question_kind(prompt)
        values = set(_WORD.findall(reference.lower())) & {v.lower() for v in FACT_KINDS.get(kind, ())}
        if kind is None or len(values) != 1:
            out.append(None)
            continue
        out.append(float(fact_key_correct(completion, values.pop(), kind)))
    return out


def _normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def score_fact_accuracy(
    predictions: Sequence[str],
    probes: Sequence[Mapping[str, Any]],
    *,
    mode: Literal["key", "exact"] = "key",
) -> dict[str, Any]:
    """Fact accuracy per distance.

    Args:
        predictions: the model's answer text for each probe (decoded without special tokens).
        probes: the matching probe dicts (``distance``, ``expected``, ``kind``, ``answer``), e.g. from
            :func:`iter_probes`.
        mode: ``"key"``: :func:`fact_key_correct` (the key word is there and no rival value is);
            ``"exact"``: the whole answer equals the reference answer up to case, spaces and punctuation.

    Returns ``{"accuracy": float, "n": int, "per_distance": {d: accuracy}, "counts": {d: n},
    "correct": [bool, ...]}`` (distances sorted ascending).
    """
    if len(predictions) != len(probes):
        raise ValueError(f"got {len(predictions)} predictions for {len(probes)} probes")
    correct = []
    for pred, probe in zip(predictions, probes):
        if mode == "key":
            ok = fact_key_correct(pred, str(probe["expected"]), probe.get("kind"))
        elif mode == "exact":
            ok = _normalise(pred) == _normalise(str(probe["answer"]))
        else:
            raise ValueError(f"mode must be 'key' or 'exact', got {mode!r}")
        correct.append(ok)
    hits: dict[int, int] = {}
    counts: dict[int, int] = {}
    for ok, probe in zip(correct, probes):
        d = int(probe["distance"])
        counts[d] = counts.get(d, 0) + 1
        hits[d] = hits.get(d, 0) + int(ok)
    per_distance = {d: hits[d] / counts[d] for d in sorted(counts)}
    return {
        "accuracy": sum(correct) / len(correct) if correct else 0.0,
        "n": len(correct),
        "per_distance": per_distance,
        "counts": {d: counts[d] for d in sorted(counts)},
        "correct": correct,
    }


def score_dialogue_answers(
    answers: Sequence[Sequence[str]],
    dialogues: Sequence[Mapping[str, Any]],
    *,
    mode: Literal["key", "exact"] = "key",
) -> dict[str, Any]:
    """:func:`score_fact_accuracy` from per-episode answer lists: ``answers[e][k]`` is the model's answer at
    turn ``k`` of episode ``e`` (only the probe turns are read)."""
    if len(answers) != len(dialogues):
        raise ValueError(f"got answers for {len(answers)} episodes, but {len(dialogues)} episodes")
    probes = list(iter_probes(dialogues))
    preds = []
    for p in probes:
        turns = answers[p["episode"]]
        if p["turn"] >= len(turns):
            raise ValueError(
                f"episode {p['episode']} has {len(turns)} answers but a probe at turn {p['turn']}"
            )
        preds.append(turns[p["turn"]])
    return score_fact_accuracy(preds, probes, mode=mode)


def format_accuracy_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table of per-distance accuracy for several runs, e.g.
    ``{"memory": score_a, "reset": score_b}`` -> rows per distance, one column per run."""
    names = list(results)
    distances = sorted({d for r in results.values() for d in r["per_distance"]})
    lines = ["distance | " + " | ".join(f"{n:>8}" for n in names) + " |     n"]
    for d in distances:
        cells = " | ".join(f"{results[n]['per_distance'].get(d, float('nan')):>8.3f}" for n in names)
        n = max(results[x]["counts"].get(d, 0) for x in names)
        lines.append(f"{d:>8} | {cells} | {n:>5}")
    lines.append(
        "     all | "
        + " | ".join(f"{results[n]['accuracy']:>8.3f}" for n in names)
        + f" | {max(r['n'] for r in results.values()):>5}"
    )
    return "\n".join(lines)
