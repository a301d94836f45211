"""Tokenizer (stage 0), chat template and interaction helpers."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from transformers_rxt.data.synthetic import pretraining_texts, sft_pairs
from transformers_rxt.tokenization_rxt import (
    RXT_ALPHA_TOKEN_IDS,
    RXT_BETA_TOKEN_IDS,
    RXT_CHAT_TEMPLATE,
    RXT_SPECIAL_TOKEN_IDS,
    RXT_SPECIAL_TOKENS,
    InputTooLongError,
    apply_rxt_chat_template,
    format_tool_calls,
    load_rxt_tokenizer,
    messages_to_interactions,
    pad_sequences,
    parse_interaction_text,
    rxt_token_ids,
    tokenize_interaction,
    tokenize_interactions,
    tokenize_prompt,
    tokenize_prompts,
    tokenize_queries,
    tokenize_query,
    tokenize_system_prompt,
    tokenize_tool_result,
    train_rxt_tokenizer,
)

FIXTURE = "rxt-alpha-tiny"


@pytest.fixture(scope="module")
def tok():
    texts = pretraining_texts(1500, seed=0) + [
        p["query"] + " " + p["answer"] for p in sft_pairs(1500, seed=0)
    ]
    return train_rxt_tokenizer(texts, vocab_size=1024)


@pytest.fixture(scope="module")
def golden(parity_fixtures):
    from safetensors.torch import load_file

    d = parity_fixtures / FIXTURE
    return d, json.loads((d / "golden.json").read_text()), load_file(str(d / "golden.safetensors"))


# ----------------------------------------------------------------------------------------------------
# constants


def test_special_token_layout():
    assert RXT_SPECIAL_TOKENS == (
        "[PAD]",
        "[UNK]",
        "[BOS]",
        "[EOS]",
        "[MASK]",
        "[Q]",
        "[A]",
        "[T]",
        "[C]",
        "[U]",
        "[I]",
    )
    assert RXT_SPECIAL_TOKEN_IDS["[A]"] == 6 and RXT_SPECIAL_TOKEN_IDS["[I]"] == 10
    assert RXT_ALPHA_TOKEN_IDS == {
        "bos_token_id": 2,
        "eos_token_id": 3,
        "answer_token_id": 6,
        "query_token_id": 5,
        "pad_token_id": 0,
    }
    assert RXT_BETA_TOKEN_IDS["think_token_id"] == 7 and RXT_BETA_TOKEN_IDS["internal_token_id"] == 10


# ---------------------------------------------------------------------------------------------------- fixture
# parity


def test_fixture_ids_match_reference(golden):
    d, g, t = golden
    tokenizer = load_rxt_tokenizer(d)
    assert rxt_token_ids(tokenizer) == RXT_BETA_TOKEN_IDS
    for k in ("turn1", "turn2", "turn3"):
        q, a = g["turns"][k]["query"], g["turns"][k]["answer_for_teacher_forcing"]
        full = tokenize_interaction(tokenizer, q, a, return_tensors="pt")
        assert torch.equal(full["input_ids"], t[f"{k}.tf.input_ids"])
        assert torch.equal(full["attention_mask"], t[f"{k}.tf.attention_mask"])
        query = tokenize_query(tokenizer, q, 64, return_tensors="pt")
        assert torch.equal(query["input_ids"], t[f"{k}.query.input_ids"])
        # The chat template renders the same ids; the generation prompt is the query plus [A].
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert tokenizer.apply_chat_template(msgs)["input_ids"] == full["input_ids"][0].tolist()
        assert tokenizer.apply_chat_template(msgs[:1])["input_ids"] == query["input_ids"][0].tolist()
        prompt = tokenize_prompt(tokenizer, q)["input_ids"]
        assert prompt == query["input_ids"][0].tolist() + [6]
        assert tokenizer.apply_chat_template(msgs[:1], add_generation_prompt=True)["input_ids"] == prompt
        assert tokenizer.decode(full["input_ids"][0]) == f"[BOS][Q]{q}[A]{a}[EOS]"
    stm = tokenize_interaction(
        tokenizer,
        "Hello, who are you?",
        "I am a small reactive model. My name is Iris and I have a green owl.",
        64,
    )
    assert stm["input_ids"] == t["stm_init.input_ids"][0].tolist()
    batch = tokenize_queries(tokenizer, g["turns"]["batch"]["queries"], 28, padding="max_length")
    assert torch.equal(batch["input_ids"], t["batch.query.input_ids"])
    assert torch.equal(batch["attention_mask"], t["batch.query.attention_mask"])


def test_load_bare_reference_tokenizer_json(golden, tmp_path):
    d, g, t = golden
    shutil.copy(d / "tokenizer.json", tmp_path / "tokenizer.json")
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        tokenizer = load_rxt_tokenizer(source)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 3, 0)
        assert tokenizer.mask_token_id == 4 and tokenizer.chat_template == RXT_CHAT_TEMPLATE
        q, a = g["turns"]["turn1"]["query"], g["turns"]["turn1"]["answer_for_teacher_forcing"]
        ids = tokenize_interaction(tokenizer, q, a)["input_ids"]
        assert ids == t["turn1.tf.input_ids"][0].tolist()
        # A ByteLevel decoder was attached: no 'Ġ' in the output.
        assert tokenizer.decode(ids, skip_special_tokens=True) == q + a


# ----------------------------------------------------------------------------------------------------
# training


def test_trained_tokenizer_layout_and_decode(tok):
    assert tok.convert_tokens_to_ids(list(RXT_SPECIAL_TOKENS)) == list(range(11))
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert rxt_token_ids(tok) == RXT_BETA_TOKEN_IDS
    assert len(tok) <= 1024
    for text in ("Anna's kite is red.", "  Two  spaces, tabs\tand\nnewlines ", "Zoë's café — naïve 🙂"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level decoder, nothing unknown
        assert 1 not in ids
    assert tok("Hi")["input_ids"][0] == 2 and tok("Hi")["input_ids"][-1] == 3  # [BOS] text [EOS]
    ids = tokenize_interaction(tok, "What colour is Anna's kite?", "Anna's kite is red.")["input_ids"]
    assert tok.decode(ids) == "[BOS][Q]What colour is Anna's kite?[A]Anna's kite is red.[EOS]"
    assert tok.decode(ids, skip_special_tokens=True) == "What colour is Anna's kite?Anna's kite is red."


def test_trained_tokenizer_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    text = "How many apples does Ben have? Ben has 7 apples."
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    for loaded in (
        PreTrainedTokenizerFast.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
        load_rxt_tokenizer(tmp_path),
    ):
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.chat_template == tok.chat_template == RXT_CHAT_TEMPLATE
        assert loaded.apply_chat_template(msgs)["input_ids"] == tok.apply_chat_template(msgs)["input_ids"]
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.mask_token) == (
            "[BOS]",
            "[EOS]",
            "[PAD]",
            "[MASK]",
        )
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text


def test_train_from_dataset_files_and_dicts(tmp_path):
    import datasets

    texts = pretraining_texts(300, seed=1)
    a = train_rxt_tokenizer(datasets.Dataset.from_dict({"body": texts}), 400, text_column="body")
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(texts), encoding="utf-8")
    b = train_rxt_tokenizer(files=[f], vocab_size=400)
    c = train_rxt_tokenizer(({"text": t} for t in texts), 400, extra_special_tokens=("[CLS]", "[SEP]"))
    for t in (a, b, c):
        assert t.convert_tokens_to_ids(list(RXT_SPECIAL_TOKENS)) == list(range(11))
    assert c.convert_tokens_to_ids(["[CLS]", "[SEP]"]) == [11, 12]
    assert a("Anna has a red kite.")["input_ids"] == b("Anna has a red kite.")["input_ids"]
    with pytest.raises(ValueError, match="too small"):
        train_rxt_tokenizer(texts, 200)


# ---------------------------------------------------------------------------------------------------- chat
# template


def render(tokenizer, msgs, **kw):
    return tokenizer.apply_chat_template(msgs, tokenize=False, **kw)


def test_chat_template_alpha(tok):
    user = [{"role": "user", "content": "Where is Tom?"}]
    assert render(tok, user, add_generation_prompt=True) == "[BOS][Q]Where is Tom?[A]"
    assert render(tok, user) == "[BOS][Q]Where is Tom?"
    turns = user + [
        {"role": "assistant", "content": "Tom is at the park."},
        {"role": "user", "content": "How old is Tom?"},
        {"role": "assistant", "content": "Tom is 9 years old."},
    ]
    # Training data: every turn back to back, each a complete interaction.
    assert render(tok, turns) == (
        "[BOS][Q]Where is Tom?[A]Tom is at the park.[EOS][BOS][Q]How old is Tom?[A]Tom is 9 years old.[EOS]"
    )
    ids = tok.apply_chat_template(turns)["input_ids"]
    expected = (
        tokenize_interaction(tok, "Where is Tom?", "Tom is at the park.")["input_ids"]
        + tokenize_interaction(tok, "How old is Tom?", "Tom is 9 years old.")["input_ids"]
    )
    assert ids == expected
    assert (
        tok.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
        == tokenize_prompt(tok, "Where is Tom?")["input_ids"]
    )
    # assistant_masks mark exactly the trained (answer-side) tokens.
    out = tok.apply_chat_template(turns[:2], return_assistant_tokens_mask=True)
    labels = tokenize_interaction(tok, "Where is Tom?", "Tom is at the park.", return_labels=True)["labels"]
    assert out["assistant_masks"] == [int(x != -100) for x in labels]


def test_chat_template_system_and_beta(tok):
    sys_msg = [{"role": "system", "content": "You are RxT."}]
    assert render(tok, sys_msg) == "[BOS][I]SYSTEM INSTRUCTIONS\n\nYou are RxT.[EOS]"
    assert render(tok, sys_msg, system_format="query") == "[BOS][Q]SYSTEM INSTRUCTIONS[A]You are RxT.[EOS]"
    assert render(tok, sys_msg, system_prompt_title="") == "[BOS][I]You are RxT.[EOS]"
    assert (
        tok.apply_chat_template(sys_msg)["input_ids"]
        == tokenize_system_prompt(tok, "You are RxT.")["input_ids"]
    )
    assert (
        tok.apply_chat_template(sys_msg, system_format="query")["input_ids"]
        == tokenize_system_prompt(tok, "You are RxT.", style="query")["input_ids"]
    )
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"who": "Anna"}}}
    msgs = [
        {"role": "user", "content": "Where is Anna?", "internal": "Use tools."},
        {"role": "assistant", "reasoning_content": "Need a lookup.", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "park"},
        {"role": "assistant", "thinking": "Got it.", "content": "Anna is at the park."},
    ]
    text = render(tok, msgs)
    assert text == (
        "[BOS][I]Use tools.[Q]Where is Anna?[T]Need a lookup."
        '[C]{"name": "lookup", "arguments": {"who": "Anna"}}[EOS]'
        "[BOS][U]park[T]Got it.[A]Anna is at the park.[EOS]"
    )
    system, interactions = messages_to_interactions(msgs)
    assert system is None and len(interactions) == 2
    assert interactions[0]["tool_call"] == format_tool_calls([call]) and interactions[0]["answer"] is None
    ids = []
    for it in interactions:
        ids += tokenize_interaction(tok, **it)["input_ids"]
    assert tok.apply_chat_template(msgs)["input_ids"] == ids
    # An internal-role message opens the interaction; thinking modes pick the generation marker.
    pre = [{"role": "internal", "content": "Be short."}, {"role": "user", "content": "Hi"}]
    assert render(tok, pre, add_generation_prompt=True) == "[BOS][I]Be short.[Q]Hi[A]"
    assert render(tok, pre[1:], add_generation_prompt=True, thinking_mode="extended") == "[BOS][Q]Hi[T]"
    assert render(tok, pre[1:], add_generation_prompt=True, thinking_mode="auto") == "[BOS][Q]Hi"
    assert render(tok, pre[1:], add_generation_prompt=True, enable_thinking=True) == "[BOS][Q]Hi[T]"
    assert (
        tokenize_prompt(tok, "Hi", internal="Be short.")["input_ids"]
        == tok.apply_chat_template(pre, add_generation_prompt=True)["input_ids"]
    )
    assert tokenize_prompt(tok, "Hi", thinking_mode="extended")["input_ids"][-1] == 7
    assert tokenize_prompt(tok, tool_use="42")["input_ids"][:2] == [2, 9]
    assert tokenize_tool_result(tok, "42", internal="x")["input_ids"][:3] == [
        2,
        10,
        tok.convert_tokens_to_ids("x"),
    ]


def test_chat_template_rejects_malformed(tok):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="must answer"):
        render(tok, [{"role": "assistant", "content": "Hi"}])
    with pytest.raises(TemplateError, match="two user/tool messages"):
        render(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="add_generation_prompt"):
        render(
            tok,
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            add_generation_prompt=True,
        )
    with pytest.raises(ValueError, match="two user/tool messages in a row"):
        messages_to_interactions([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_apply_rxt_chat_template_without_template(golden):
    d, _, _ = golden
    tokenizer = PreTrainedTokenizerFast.from_pretrained(d)  # the fixture's own files: no chat template
    assert not tokenizer.chat_template
    out = apply_rxt_chat_template(tokenizer, [{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    assert out["input_ids"] == [2, 5, 52, 85, 13, 6]


# ---------------------------------------------------------------------------------------------------- helpers


def test_parse_interaction_text():
    assert parse_interaction_text("[BOS][Q]Hi[A]Hello[EOS]") == {
        "internal": None, "query": "Hi", "tool_use": None,
        "think": None, "answer": "Hello", "tool_call": None,
    }  # fmt: skip
    beta = parse_interaction_text("[I]x[U]42[T]hm[A]ok[C]call")
    assert (beta["internal"], beta["tool_use"], beta["think"], beta["answer"], beta["tool_call"]) == (
        "x",
        "42",
        "hm",
        "ok",
        "call",
    )
    with pytest.raises(ValueError, match=r"interaction text has no \[Q\] or \[U\] marker"):
        parse_interaction_text("[A]no query")


def test_batches_and_padding(tok):
    prompts = tokenize_prompts(tok, ["Hi", "Where is Anna today?"])
    assert prompts["input_ids"].shape[0] == 2
    assert prompts["attention_mask"][0, 0] == 0 and prompts["attention_mask"][0, -1] == 1  # left padded
    assert (prompts["input_ids"][:, -1] == 6).all()
    one = tokenize_prompt(tok, "Hi")["input_ids"]
    assert prompts["input_ids"][0, -len(one) :].tolist() == one
    batch = tokenize_interactions(
        tok, ["Hi", "Where is Anna?"], ["Hello!", "Anna is at the park."], return_labels=True
    )
    assert batch["attention_mask"][0, 0] == 1 and batch["attention_mask"][0, -1] == 0  # right padded
    single = tokenize_interaction(tok, "Hi", "Hello!", return_labels=True)
    n = len(single["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == single["input_ids"]
    assert batch["labels"][0, :n].tolist() == single["labels"]
    assert (batch["labels"][0, n:] == -100).all() and (batch["input_ids"][0, n:] == 0).all()
    # Labels: -100 on [BOS][Q]query, trained from [A] through [EOS].
    a = single["input_ids"].index(6)
    assert all(x == -100 for x in single["labels"][:a]) and single["labels"][a:] == single["input_ids"][a:]
    recs = tokenize_interactions(tok, [{"query": "Hi", "answer": "Hello!"}])
    assert recs["input_ids"][0].tolist() == single["input_ids"]
    padded = pad_sequences(
        [[5, 6], [7]], padding="max_length", max_length=4, padding_side="left", return_tensors=None
    )
    assert padded["input_ids"] == [[0, 0, 5, 6], [0, 0, 0, 7]]
    assert pad_sequences([[1, 2, 3]], pad_to_multiple_of=4)["input_ids"].shape == (1, 4)


def test_over_long_input_errors_and_explicit_truncation(tok):
    long_q = "Anna has a red kite and a blue ball. " * 10
    with pytest.raises(InputTooLongError, match=r"max_length=16.*truncation=True") as e:
        tokenize_query(tok, long_q, max_length=16)
    assert "query:" in str(e.value)
    with pytest.raises(InputTooLongError, match="interaction"):
        tokenize_interaction(tok, long_q, "ok", max_length=16)
    with pytest.raises(InputTooLongError):
        tokenize_prompts(tok, ["hi", long_q], max_length=16)
    cut = tokenize_prompt(tok, long_q, max_length=16, truncation=True)["input_ids"]
    assert len(cut) == 16 and cut[:2] == [2, 5] and cut[-1] == 6
    cut = tokenize_interaction(tok, long_q, long_q, max_length=20, truncation=True)["input_ids"]
    assert len(cut) == 20 and cut[0] == 2 and cut[-1] == 3 and 6 in cut
    # The tokenizer's own model_max_length is the default limit when it is a real one.
    limited = train_rxt_tokenizer(pretraining_texts(100, seed=3), 300, model_max_length=12)
    with pytest.raises(InputTooLongError):
        tokenize_query(limited, long_q)
    # Marker strings typed by a user can be kept as text, like sanitize_control_tokens=True.
    msgs = [{"role": "user", "content": "say [A] now"}]
    safe = tokenize_prompt(tok, "say [A] now", split_special_tokens=True)["input_ids"]
    assert safe.count(6) == 1 and safe[-1] == 6
    assert (
        safe
        == tok.apply_chat_template(msgs, add_generation_prompt=True, sanitize_control_tokens=True)[
            "input_ids"
        ]
    )
    assert tokenize_prompt(tok, "say [A] now")["input_ids"].count(6) == 2
    with pytest.raises(ValueError, match="not both"):
        tokenize_interaction(tok, "q", "a", tool_use="u")
