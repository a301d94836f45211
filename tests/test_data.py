"""Embedded synthetic corpus, dataset formats/loaders and collators."""

import json
import re

import datasets
import pytest
import torch

from transformers_rxt.data import (
    DataFormatError,
    FACT_KINDS,
    DataCollatorForJointLM,
    DataCollatorForRxTDecoder,
    DataCollatorForRxTEpisodes,
    DataCollatorForRxTMLM,
    build_memory_dialogues,
    build_pretraining_dataset,
    build_sft_dataset,
    episode_turns,
    fact_key_correct,
    format_accuracy_table,
    is_heldout_fact,
    iter_probes,
    load_mrl_dataset,
    load_pretraining_dataset,
    load_sft_dataset,
    memory_dialogues,
    pretraining_texts,
    score_dialogue_answers,
    score_fact_accuracy,
    select_turn,
    sft_pairs,
    tokenize_mrl_dataset,
    tokenize_pretraining_dataset,
    tokenize_sft_dataset,
)
from transformers_rxt.data.synthetic import Fact
from transformers_rxt.tokenization_rxt import InputTooLongError, tokenize_interaction, train_rxt_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_rxt_tokenizer(pretraining_texts(1000, seed=0), vocab_size=1024)


@pytest.fixture(scope="module")
def dialogues():
    return memory_dialogues(400, max_distance=8, seed=0)


# ---------------------------------------------------------------------------------------------------- corpus

# Canonical sentence forms of every fact kind: (kind, regex) -> (person, obj, value) groups.
_FACT_PATTERNS = [
    ("colour|size", re.compile(r"\b([A-Z][a-z]+)'s (\w+) is (\w+)\.")),
    ("place", re.compile(r"\b([A-Z][a-z]+) is at the (\w+)\.")),
    ("age", re.compile(r"\b([A-Z][a-z]+) is (\d+) years old\.")),
    ("count", re.compile(r"\b([A-Z][a-z]+) has (\d+) (\w+)\.")),
    ("pet", re.compile(r"\b([A-Z][a-z]+) has a pet (\w+)\.")),
]


def _facts_in(text: str) -> set[Fact]:
    """Facts stated in canonical answer form (every fact the corpus mentions is also written this way)."""
    out = set()
    for kinds, pat in _FACT_PATTERNS:
        for m in pat.finditer(text):
            if kinds == "colour|size":
                p, o, v = m.groups()
                kind = "colour" if v in FACT_KINDS["colour"] else "size" if v in FACT_KINDS["size"] else None
                if kind:
                    out.add(Fact(kind, p, o, v))
            elif kinds == "count":
                p, v, o = m.groups()
                out.add(Fact("count", p, o, v))
            else:
                p, v = m.groups()
                out.add(Fact(kinds, p, None, v))
    return out


def _dialogue_text(records) -> str:
    return "\n".join(t["query"] + " " + t["answer"] for r in records for t in episode_turns(r))


def test_corpus_is_deterministic():
    assert pretraining_texts(50, seed=3) == pretraining_texts(50, seed=3)
    assert pretraining_texts(50, seed=3) != pretraining_texts(50, seed=4)
    assert sft_pairs(50, seed=3) == sft_pairs(50, seed=3)
    assert memory_dialogues(20, 6, seed=3) == memory_dialogues(20, 6, seed=3)
    assert memory_dialogues(20, 6, seed=3) != memory_dialogues(20, 6, seed=4)
    assert build_memory_dialogues(10, 4, seed=1).to_list() == build_memory_dialogues(10, 4, seed=1).to_list()
    assert build_pretraining_dataset(5, 1)["text"] == pretraining_texts(5, 1)
    assert build_sft_dataset(5, 1).column_names == ["query", "answer"]


def test_vocabulary_is_small():
    words = set()
    for text in pretraining_texts(2000, seed=0) + [
        p["query"] + " " + p["answer"] for p in sft_pairs(2000, seed=0)
    ]:
        words |= set(re.findall(r"[A-Za-z]+", text))
    assert len(words) < 400


def test_heldout_combinations_never_appear_in_train(dialogues):
    train_text = "\n".join(pretraining_texts(1500, seed=0))
    train_text += "\n" + "\n".join(p["query"] + " " + p["answer"] for p in sft_pairs(1500, seed=0))
    train_text += "\n" + _dialogue_text(dialogues)
    train_facts = _facts_in(train_text)
    assert len(train_facts) > 1000
    assert not any(is_heldout_fact(f) for f in train_facts)
    heldout = memory_dialogues(200, max_distance=8, seed=0, split="heldout")
    heldout_facts = _facts_in(_dialogue_text(heldout))
    assert len(heldout_facts) > 100
    assert all(is_heldout_fact(f) for f in heldout_facts)
    assert not heldout_facts & train_facts
    # The held-out split is the same whatever the seed.
    assert all(
        is_heldout_fact(f)
        for f in _facts_in(_dialogue_text(memory_dialogues(50, 4, seed=9, split="heldout")))
    )


def test_dialogue_format_and_distance_coverage(dialogues):
    distances = set()
    for i, r in enumerate(dialogues):
        assert set(r) == {"query", "answer", "interactions", "probes"}
        turns = episode_turns(r)
        assert len(turns) == 9  # max_distance + 1, equal for every episode
        assert all(set(t) == {"query", "answer"} for t in turns)
        assert any(p["distance"] == i % 8 + 1 for p in r["probes"])  # the target distance
        for p in r["probes"]:
            distances.add(p["distance"])
            assert p["turn"] - p["fact_turn"] == p["distance"] >= 1
            assert turns[p["turn"]]["answer"] == p["answer"]
            assert p["expected"] in turns[p["turn"]]["answer"]
            # The fact was stated at fact_turn (query) and repeated in the acknowledgement.
            assert p["answer"] in turns[p["fact_turn"]]["answer"]
            assert fact_key_correct(p["answer"], p["expected"], p["kind"])
        # No contradictory facts inside an episode: each probe question has one answer.
        questions = [turns[p["turn"]]["query"] for p in r["probes"]]
        assert len(questions) == len(set(questions))
    assert distances == set(range(1, 9))
    ds = build_memory_dialogues(16, max_distance=3, seed=0, num_turns=6)
    assert all(len(r["interactions"]) == 5 for r in ds)
    assert {p["distance"] for r in ds for p in r["probes"]} <= {1, 2, 3}


def test_fact_accuracy_scorer(dialogues):
    probes = list(iter_probes(dialogues[:50]))
    assert probes and all(p["query"].endswith("?") for p in probes)
    perfect = score_fact_accuracy([p["answer"] for p in probes], probes)
    assert perfect["accuracy"] == 1.0 and all(v == 1.0 for v in perfect["per_distance"].values())
    assert sum(perfect["counts"].values()) == perfect["n"] == len(probes)
    assert fact_key_correct("Anna's kite is red.", "red", "colour")
    assert fact_key_correct("RED", "red", "colour")
    assert not fact_key_correct("Anna's kite is red or blue.", "red", "colour")
    assert not fact_key_correct("Anna's kite is reddish.", "red", "colour")
    assert not fact_key_correct("Tom is 34 years old.", "3", "age")
    fake = [{"distance": 1, "expected": "red", "kind": "colour", "answer": "Anna's kite is red."},
            {"distance": 1, "expected": "blue", "kind": "colour", "answer": "Ben's kite is blue."},
            {"distance": 3, "expected": "park", "kind": "place",
             "answer": "Tom is at the park."}]  # fmt: skip
    res = score_fact_accuracy(["Anna's kite is red.", "Ben's kite is red.", "tom is at the PARK"], fake)
    assert res["per_distance"] == {1: 0.5, 3: 1.0} and res["correct"] == [True, False, True]
    assert score_fact_accuracy(["tom is at the park"], fake[2:], mode="exact")["accuracy"] == 1.0
    assert score_fact_accuracy(["Tom is at the park now"], fake[2:], mode="exact")["accuracy"] == 0.0
    # Per-episode answers: the reference answers score 1, a constant guess much less.
    answers = [[t["answer"] for t in episode_turns(r)] for r in dialogues]
    assert score_dialogue_answers(answers, dialogues)["accuracy"] == 1.0
    guess = [["It is red."] * len(a) for a in answers]
    assert score_dialogue_answers(guess, dialogues)["accuracy"] < 0.3
    table = format_accuracy_table(
        {"memory": perfect, "reset": score_fact_accuracy(["x"] * len(probes), probes)}
    )
    assert (
        "memory" in table and "reset" in table and len(table.splitlines()) == len(perfect["per_distance"]) + 2
    )


# ---------------------------------------------------------------------------------------------------- loaders


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def test_load_pretraining_and_sft_formats(tmp_path):
    cache = {"cache_dir": str(tmp_path / "cache")}
    texts = pretraining_texts(8, seed=0)
    f = _write_jsonl(tmp_path / "pre.jsonl", [{"content": t} for t in texts])
    ds = load_pretraining_dataset(f, text_column="content", **cache)
    assert ds["text"] == texts
    pq = tmp_path / "pre.parquet"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(pq))
    assert load_pretraining_dataset(pq, **cache)["text"] == texts
    with pytest.raises(ValueError, match="no text column"):
        load_pretraining_dataset(f, **cache)

    pairs = sft_pairs(6, seed=0)
    sep = load_sft_dataset(_write_jsonl(tmp_path / "sft.jsonl", pairs), **cache)
    assert sep.to_list() == pairs
    renamed = [{"q": p["query"], "a": p["answer"]} for p in pairs]
    (tmp_path / "sft.json").write_text(json.dumps(renamed))
    assert (
        load_sft_dataset(tmp_path / "sft.json", query_field="q", answer_field="a", **cache).to_list() == pairs
    )
    combined = [{"interaction": f"[BOS][Q]{p['query']}[A]{p['answer']}[EOS]"} for p in pairs]
    assert load_sft_dataset(_write_jsonl(tmp_path / "comb.jsonl", combined), **cache).to_list() == pairs
    chats = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": p["query"]},
                           {"role": "assistant", "content": p["answer"]}]} for p in pairs]  # fmt: skip
    assert load_sft_dataset(_write_jsonl(tmp_path / "chat.jsonl", chats), **cache).to_list() == pairs
    streamed = load_sft_dataset(tmp_path / "comb.jsonl", streaming=True)
    # Streaming cannot drop the all-None Beta columns without reading everything; they stay, as None.
    assert [{"query": r["query"], "answer": r["answer"]} for r in streamed] == pairs
    beta = [{"query": "Name a prime.", "think": "2 is prime.", "answer": "2", "tool_call": None}]
    loaded = load_sft_dataset(_write_jsonl(tmp_path / "beta.jsonl", beta), **cache)
    assert loaded[0]["think"] == "2 is prime."


def test_load_mrl_formats(tmp_path, dialogues):
    cache = {"cache_dir": str(tmp_path / "cache")}
    records = dialogues[:5]
    std = load_mrl_dataset(_write_jsonl(tmp_path / "mrl.jsonl", records), **cache)
    assert [episode_turns(r) for r in std] == [episode_turns(r) for r in records]
    assert std[0]["probes"] == records[0]["probes"]  # extra columns are kept
    pq = tmp_path / "mrl.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(pq))
    assert [episode_turns(r) for r in load_mrl_dataset(pq, **cache)] == [episode_turns(r) for r in records]
    hybrid = [{"interactions": episode_turns(r), "system": "Remember facts."} for r in records]
    hy = load_mrl_dataset(_write_jsonl(tmp_path / "hybrid.jsonl", hybrid), **cache)
    assert [episode_turns(r) for r in hy] == [episode_turns(r) for r in records]
    assert hy[0]["system"] == "Remember facts."
    chats = []
    for r in records:
        msgs = [{"role": "system", "content": "sys"}]
        for t in episode_turns(r):
            msgs += [{"role": "user", "content": t["query"]}, {"role": "assistant", "content": t["answer"]}]
        chats.append({"messages": msgs})
    ch = load_mrl_dataset(_write_jsonl(tmp_path / "chats.jsonl", chats), **cache)
    assert [episode_turns(r) for r in ch] == [episode_turns(r) for r in records] and ch[0]["system"] == "sys"
    # save_to_disk folders load too.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "disk"))
    assert len(load_mrl_dataset(tmp_path / "disk")) == 5


@pytest.mark.parametrize("rows, message", [
    ([{"query": "Hi.", "answer": "Hello."}, {"query": "Who?"}], r"sft\.jsonl, row 2: the record has no answer"),
    ([{"query": "Hi.", "answer": "Hello."}, {"query": "Hi.", "answer": "  "}],
     r"sft\.jsonl, row 2: the record has an empty answer"),
    ([{"query": "", "answer": "Hello."}], r"sft\.jsonl, row 1: the record has an empty query"),
    ([{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]},
      {"messages": [{"role": "user", "content": "Hi."}]}],
     r"sft\.jsonl, row 2: an interaction of the conversation has no answer"),
])
def test_sft_rows_that_cannot_be_trained_on_are_refused_with_file_and_row(tmp_path, rows, message):
    """A row without an answer used to train on [BOS][Q]query[EOS]; empty answers passed."""
    with pytest.raises(DataFormatError, match=message + r".*fill it in or remove the row"):
        load_sft_dataset(_write_jsonl(tmp_path / "sft.jsonl", rows), cache_dir=str(tmp_path / "cache"))


def test_mrl_episodes_that_cannot_be_trained_on_are_refused_with_file_and_row(tmp_path, dialogues):
    cache = {"cache_dir": str(tmp_path / "cache")}
    good = [{k: r[k] for k in ("query", "answer", "interactions")} for r in dialogues[:3]]
    missing = [*good, {"query": "Hi.", "answer": "Hello."}]  # no interactions key
    with pytest.raises(DataFormatError, match=r"mrl\.jsonl, row 4: the episode has no 'interactions' list"):
        load_mrl_dataset(_write_jsonl(tmp_path / "mrl.jsonl", missing), **cache)
    empty_inner = [*good[:1], {**good[1], "interactions": [*good[1]["interactions"][:1], {"query": "Q?",
                                                                                         "answer": ""}]}]
    with pytest.raises(DataFormatError, match=r"mrl2\.jsonl, row 2: the episode interactions\[1\] has an empty "
                                              r"answer"):
        load_mrl_dataset(_write_jsonl(tmp_path / "mrl2.jsonl", empty_inner), **cache)
    one_turn = [{**good[0], "interactions": []}]  # an episode of one interaction is fine
    assert len(load_mrl_dataset(_write_jsonl(tmp_path / "mrl3.jsonl", one_turn), **cache)) == 1


@pytest.mark.parametrize("text, message", [
    ('{"query": "a", "answer": "b"}\n\n{"query": "c", "answer": "d"}\n{"query": "e", "answer": \n',
     r"bad\.jsonl, row 3 \(line 4\): not valid JSON \(Expecting value at column 26\); fix the line or remove it"),
    ('{"query": "a", "answer": "b"}\n["c", "d"]\n', r"bad\.jsonl, row 2 \(line 2\): expected a JSON object"),
])
def test_bad_json_lines_name_the_file_and_the_1_based_row(tmp_path, text, message):
    """A broken line used to surface as a pyarrow traceback with a 0-based row."""
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataFormatError, match=message):
        load_sft_dataset(path, cache_dir=str(tmp_path / "cache"))


def test_bad_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"query": "a", "answer": "b"},\n  {"query": "c" "answer": "d"}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad\.json, line 3: not valid JSON \(Expecting ',' delimiter"):
        load_sft_dataset(path, cache_dir=str(tmp_path / "cache"))


def test_tokenizing_refuses_records_without_an_answer(tok, dialogues):
    """Data built in memory (or streamed) is checked where it is tokenized, with the dataset's 1-based row."""
    pairs = [{"query": "Hi.", "answer": "Hello."}, {"query": "Hi.", "answer": None}]
    with pytest.raises(DataFormatError, match=r"row 2 of the dataset: the record has no answer"):
        tokenize_sft_dataset(datasets.Dataset.from_list(pairs), tok, 64)
    episodes = [dict(r) for r in dialogues[:2]]
    episodes[1]["interactions"] = [{**t, "answer": ""} if i == 0 else t
                                   for i, t in enumerate(episodes[1]["interactions"])]
    with pytest.raises(DataFormatError, match=r"row 2 of the dataset: the episode interactions\[0\] has an empty"):
        tokenize_mrl_dataset(datasets.Dataset.from_list(episodes), tok, 64)


# ----------------------------------------------------------------------------------------------------
# tokenization


def test_tokenize_datasets(tok, dialogues):
    pre = tokenize_pretraining_dataset(
        datasets.Dataset.from_dict({"text": ["Anna has a red kite."]}), tok, 64
    )
    assert pre[0]["input_ids"] == tok("Anna has a red kite.")["input_ids"]  # [BOS] text [EOS]
    with pytest.raises(InputTooLongError):
        tokenize_pretraining_dataset(datasets.Dataset.from_dict({"text": ["word " * 50]}), tok, 16)
    cut = tokenize_pretraining_dataset(
        datasets.Dataset.from_dict({"text": ["word " * 50]}), tok, 16, truncation=True
    )
    assert len(cut[0]["input_ids"]) == 16 and cut[0]["input_ids"][0] == 2
    pairs = sft_pairs(20, seed=0)
    sft = tokenize_sft_dataset(datasets.Dataset.from_list(pairs), tok, 64)
    for p, row in zip(pairs, sft):
        ref = tokenize_interaction(tok, p["query"], p["answer"], return_labels=True)
        assert row["input_ids"] == ref["input_ids"] and row["labels"] == ref["labels"]
    with pytest.raises(InputTooLongError):
        tokenize_sft_dataset(datasets.Dataset.from_list(pairs), tok, 8)
    mrl = tokenize_mrl_dataset(datasets.Dataset.from_list(dialogues[:10]), tok, 64)
    assert mrl.column_names == ["turn_input_ids", "turn_labels", "num_turns"]
    for r, row in zip(dialogues, mrl):
        turns = episode_turns(r)
        assert row["num_turns"] == len(turns)
        for t, ids in zip(turns, row["turn_input_ids"]):
            assert ids == tokenize_interaction(tok, t["query"], t["answer"])["input_ids"]
    with_sys = datasets.Dataset.from_list(
        [{**dialogues[0], "system": "Be brief."}, {**dialogues[1], "system": None}]
    )
    out = tokenize_mrl_dataset(with_sys, tok, 64)
    assert out[0]["system_input_ids"][:2] == [2, 10] and out[1]["system_input_ids"] == []


# ----------------------------------------------------------------------------------------------------
# collators


def test_mlm_masking_invariants(tok):
    texts = pretraining_texts(64, seed=5)
    feats = [{"input_ids": ids} for ids in tok(texts)["input_ids"]]
    g = torch.Generator().manual_seed(0)
    coll = DataCollatorForRxTMLM.from_tokenizer(tok, generator=g)
    batch = coll(feats)
    clean = DataCollatorForRxTDecoder(pad_token_id=tok.pad_token_id)(feats)["input_ids"]
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    special = torch.isin(clean, torch.tensor(tok.all_special_ids)) | (mask == 0)
    selected = labels != -100
    assert not (selected & special).any()  # never special tokens or padding
    assert torch.equal(ids[special], clean[special])  # specials and pads untouched
    assert torch.equal(labels[selected], clean[selected])
    assert torch.equal(ids[~selected], clean[~selected])
    rate = selected.sum() / (~special).sum()
    assert 0.10 < rate < 0.20
    as_mask = (ids[selected] == tok.mask_token_id).float().mean()
    assert 0.7 < as_mask < 0.9
    assert not torch.isin(
        ids[selected],
        torch.tensor(tok.all_special_ids)[torch.tensor(tok.all_special_ids) != tok.mask_token_id],
    ).any()
    # Reference mode: every selected token becomes [MASK]; short rows still get one.
    ref = DataCollatorForRxTMLM.from_tokenizer(
        tok, mask_replace_prob=1.0, random_replace_prob=0.0, generator=g
    )
    short = [{"input_ids": tok("Hi")["input_ids"]}] * 8
    b = ref(short)
    assert ((b["labels"] != -100).sum(dim=1) == 1).all()
    assert (b["input_ids"][b["labels"] != -100] == tok.mask_token_id).all()
    # Deterministic given a seeded generator.
    c1 = DataCollatorForRxTMLM.from_tokenizer(tok, generator=torch.Generator().manual_seed(1))(feats)
    c2 = DataCollatorForRxTMLM.from_tokenizer(tok, generator=torch.Generator().manual_seed(1))(feats)
    assert torch.equal(c1["input_ids"], c2["input_ids"])
    with pytest.raises(ValueError, match="must be >= 0 and sum to at most 1"):
        DataCollatorForRxTMLM(mask_replace_prob=0.9, random_replace_prob=0.2, vocab_size=100)


def test_decoder_and_joint_collators(tok):
    text = [{"input_ids": ids} for ids in tok(["Anna has a red kite.", "Hi"])["input_ids"]]
    b = DataCollatorForRxTDecoder()(text)
    assert torch.equal(b["labels"][b["attention_mask"] == 1], b["input_ids"][b["attention_mask"] == 1])
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    left = DataCollatorForRxTDecoder(padding_side="left", pad_to_multiple_of=8)(text)
    assert (
        left["input_ids"].shape[1] % 8 == 0
        and left["attention_mask"][1, -1] == 1
        and left["attention_mask"][1, 0] == 0
    )
    sft = tokenize_sft_dataset(datasets.Dataset.from_list(sft_pairs(4, seed=0)), tok, 64)
    feats = [sft[i] for i in range(4)]
    j = DataCollatorForJointLM.from_tokenizer(tok, generator=torch.Generator().manual_seed(0))(feats)
    assert set(j) == {
        "encoder_input_ids",
        "encoder_labels",
        "decoder_input_ids",
        "decoder_labels",
        "attention_mask",
    }
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert j["decoder_input_ids"][i, :n].tolist() == f["input_ids"]
        assert j["decoder_labels"][i, :n].tolist() == f["labels"]  # answer side only
    assert ((j["encoder_labels"] != -100) <= (j["attention_mask"] == 1)).all()
    everything = DataCollatorForJointLM.from_tokenizer(tok, train_on_all_tokens=True)(feats)
    assert torch.equal(everything["decoder_labels"] != -100, everything["attention_mask"] == 1)
    with pytest.raises(InputTooLongError):
        DataCollatorForRxTDecoder(max_length=4)(text)


def test_episode_collator(tok, dialogues):
    ds = tokenize_mrl_dataset(datasets.Dataset.from_list(dialogues[:3]), tok, 64)
    feats = [ds[i] for i in range(3)]
    feats[1] = {
        **feats[1],
        "turn_input_ids": feats[1]["turn_input_ids"][:5],
        "turn_labels": feats[1]["turn_labels"][:5],
    }
    coll = DataCollatorForRxTEpisodes.from_tokenizer(tok)
    b = coll(feats)
    B, N, T = b["input_ids"].shape
    assert (B, N) == (3, 9) and b["turn_mask"].tolist()[1] == [1] * 5 + [0] * 4
    assert (b["attention_mask"][1, 5:] == 0).all() and (b["labels"][1, 5:] == -100).all()
    for i, f in enumerate(feats):
        for k, ids in enumerate(f["turn_input_ids"]):
            assert b["input_ids"][i, k, : len(ids)].tolist() == ids
            assert b["labels"][i, k, : len(ids)].tolist() == f["turn_labels"][k]
            p = int(b["prompt_lengths"][i, k])
            turn = episode_turns(dialogues[i])[k]
            assert tok.decode(ids[:p]) == f"[BOS][Q]{turn['query']}[A]"
    t = select_turn(b, 8)
    assert t["input_ids"].shape[0] == 3 and t["input_ids"].shape[1] == int(
        b["attention_mask"][:, 8].sum(1).max()
    )
    assert t["turn_mask"].tolist() == [1, 0, 1]
    short = coll.__class__(truncate_to_shortest=True)(feats)
    assert short["input_ids"].shape[1] == 5
    with pytest.raises(InputTooLongError):
        coll.__class__(max_length=8)(feats)


def test_reviews_ask_an_earlier_fact_at_every_turn_and_leave_the_dialogues_unchanged():
    plain = memory_dialogues(40, max_distance=5, seed=3, num_turns=6, fact_rate=0.5)
    reviewed = memory_dialogues(40, max_distance=5, seed=3, num_turns=6, fact_rate=0.5, reviews=True)
    assert [{k: v for k, v in r.items() if k != "reviews"} for r in reviewed] == plain
    asked = 0
    for record in reviewed:
        turns = episode_turns(record)
        # a statement turn acknowledges its fact in the canonical form; probes and small talk are questions
        stated = {k: _facts_in(t["answer"]) for k, t in enumerate(turns) if not t["query"].endswith("?")}
        stated = {k: f for k, f in stated.items() if f}
        expected_turns = [k for k in range(1, len(turns) + 1) if any(s < k for s in stated)]
        assert [r["turn"] for r in record["reviews"]] == expected_turns
        for r in record["reviews"]:
            # about a fact stated before the review's turn (the memory then holds turns 0 .. k-1)
            earlier = set().union(*(f for s, f in stated.items() if s < r["turn"]))
            assert any(f.question() == r["query"] and f.answer() == r["answer"] for f in earlier), r
            asked += 1
    assert asked > 60


def test_reviews_are_tokenized_and_collated_per_turn_boundary(tok):
    records = memory_dialogues(3, max_distance=3, seed=1, num_turns=4, fact_rate=1.0, reviews=True)
    ds = tokenize_mrl_dataset(datasets.Dataset.from_list(records), tok, 64)
    assert [len(x) for x in ds["review_input_ids"]] == [5, 5, 5]  # num_turns + 1 slots
    batch = DataCollatorForRxTEpisodes.from_tokenizer(tok)([ds[i] for i in range(3)])
    assert batch["review_input_ids"].shape[:2] == (3, 5)
    for i, record in enumerate(records):
        by_turn = {r["turn"]: r for r in record["reviews"]}
        assert batch["review_mask"][i].tolist() == [int(k in by_turn) for k in range(5)]
        for k, r in by_turn.items():
            enc = tokenize_interaction(tok, r["query"], r["answer"], return_labels=True)
            ids, labels = enc["input_ids"], enc["labels"]
            n = len(ids)
            assert batch["review_input_ids"][i, k, :n].tolist() == ids
            assert batch["review_labels"][i, k, :n].tolist() == labels
            assert int(batch["review_attention_mask"][i, k].sum()) == n
    cut = DataCollatorForRxTEpisodes.from_tokenizer(tok, max_turns=2)([ds[i] for i in range(3)])
    assert cut["review_input_ids"].shape[:2] == (3, 3)  # reviews after turns 0 and 1 stay valid
    bad_records = [{**records[0], "reviews": [{"turn": 5, "query": "Q?", "answer": "A."}]}]
    with pytest.raises(ValueError, match=r"a review's turn must be in 1..4 \(the episode has 4 turns\), got 5"):
        tokenize_mrl_dataset(datasets.Dataset.from_list(bad_records), tok, 64)
