"""`pipeline("text-generation")` on RxT: earlier turns written into a fresh memory, the last user message answered."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TextGenerationPipeline, pipeline
from transformers.utils.chat_template_utils import Chat

from transformers_rxt import (
    RxTTextGenerationPipeline,
    tokenize_interaction,
    tokenize_prompt,
    tokenize_system_prompt,
)

from rxt_factories import story_tokenizer, tiny_model

VOCAB = 300
GREEDY = dict(do_sample=False, max_new_tokens=8)
CHAT = [{"role": "system", "content": "the red fox"},
        {"role": "user", "content": "the cat ran"}, {"role": "assistant", "content": "to the hill"},
        {"role": "user", "content": "the old fox ran"}, {"role": "assistant", "content": "and found a friend"},
        {"role": "user", "content": "and found a stone"}]


@pytest.fixture(scope="module")
def tokenizer():
    return story_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def model():
    model = tiny_model(seed=1, vocab=VOCAB)
    with torch.no_grad():  # tiny_model favours [EOS]; here the answers should have some text to compare
        model.lm_head.bias[model.config.eos_token_id] -= 3.0
    return model


@pytest.fixture(scope="module")
def pipe(model, tokenizer):
    return pipeline("text-generation", model=model, tokenizer=tokenizer)


@torch.no_grad()  # as the pipeline runs (and no autograd graph outlives the test)
def answer_by_hand(model, tokenizer, system, pairs, query, seed, max_new_tokens=8):
    """The same conversation through the model's own API: an explicit STMCache, update_memory, generate."""
    torch.manual_seed(seed)
    stm = model.init_memory(1)
    turns = ([tokenize_system_prompt(tokenizer, system, return_tensors="pt")] if system else []) + [
        tokenize_interaction(tokenizer, q, a, return_tensors="pt") for q, a in pairs]
    for turn in turns:
        model.update_memory(turn["input_ids"], stm=stm)
    prompt = tokenize_prompt(tokenizer, query, return_tensors="pt")
    out = model.generate(**prompt, stm=stm, do_sample=False, max_new_tokens=max_new_tokens, memory_update="none")
    return out[0].tolist(), tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True), stm


def test_the_pipeline_is_registered_for_the_task(pipe):
    assert type(pipe) is RxTTextGenerationPipeline and isinstance(pipe, TextGenerationPipeline)


def test_a_chat_is_answered_from_its_history_written_into_a_fresh_memory(pipe, model, tokenizer, monkeypatch):
    pairs = [("the cat ran", "to the hill"), ("the old fox ran", "and found a friend")]
    ids, text, stm = answer_by_hand(model, tokenizer, "the red fox", pairs, "and found a stone", seed=4)
    read = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **kw: read.append(kw["stm"].memory) or generate(*a, **kw))
    torch.manual_seed(4)
    assert pipe(CHAT, return_tensors=True, **GREEDY) == [{"generated_token_ids": ids}]
    assert torch.equal(read[0], stm.memory)  # the answer read the memory the history wrote, nothing else
    torch.manual_seed(4)
    assert not torch.equal(model.init_memory(1).memory, stm.memory)
    torch.manual_seed(4)
    assert pipe(CHAT, **GREEDY) == [{"generated_text": CHAT + [{"role": "assistant", "content": text}]}]
    torch.manual_seed(4)
    assert pipe(CHAT, return_full_text=False, **GREEDY) == [{"generated_text": text}]
    assert text.strip()


def test_a_plain_string_is_the_first_turn_of_a_fresh_conversation(pipe, model, tokenizer):
    ids, text, _ = answer_by_hand(model, tokenizer, None, [], "the small cat", seed=2)
    torch.manual_seed(2)
    assert pipe("the small cat", return_tensors=True, **GREEDY) == [{"generated_token_ids": ids}]
    torch.manual_seed(2)
    assert pipe("the small cat", **GREEDY) == [{"generated_text": "the small cat" + text}]
    # the pipeline's default of 256 new tokens would not fit the interaction window: the answer may run to its end
    (out,) = pipe("the small cat", return_tensors=True)
    assert len(out["generated_token_ids"]) <= model.config.max_interaction_length


def test_a_batch_of_chats_equals_the_chats_one_by_one(pipe):
    chats = [CHAT, CHAT[1:2], CHAT[:2], CHAT[1:4]]
    torch.manual_seed(7)
    one_by_one = pipe(chats, batch_size=1, **GREEDY)
    torch.manual_seed(7)
    batched = pipe(chats, batch_size=4, **GREEDY)
    assert batched == one_by_one
    assert len({out[0]["generated_text"][-1]["content"] for out in batched}) > 1  # different histories, answers


@pytest.mark.parametrize("messages, error", [
    ([], "the chat is empty"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 1 is a user message where a assistant message must come: user and assistant messages must alternate"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
     "message 0 is a assistant message where a user message must come"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}],
     r"message 1 \(assistant\) has no text content"),
    ([{"role": "user", "content": "  "}], r"message 0 \(user\) has no text content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "the chat ends with an assistant message: RxT answers the last user message"),
    ([{"role": "system", "content": "a"}], "the chat ends with no user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"},
      {"role": "user", "content": "d"}], "message 2 is a system message after the conversation started"),
    ([{"role": "tool", "content": "a"}], "message 0 has role 'tool'"),
])
def test_a_bad_chat_is_refused_before_any_work(pipe, model, monkeypatch, messages, error):
    def no_work(*args, **kwargs):
        raise AssertionError("the model ran before the chat was checked")

    monkeypatch.setattr(model, "init_memory", no_work)
    with pytest.raises(ValueError, match=error):
        pipe(messages, **GREEDY) if messages else pipe.preprocess(Chat([]))


def test_arguments_that_do_not_fit_rxt_are_refused(pipe, model):
    stm = model.init_memory(1)
    for kwargs in (dict(stm=stm), dict(memory_update="sync"), dict(continue_final_message=True),
                   dict(prefix="the")):
        with pytest.raises(ValueError, match="call model.generate\\(..., stm=stm\\) directly"):
            pipe(CHAT, **kwargs, **GREEDY)


def test_a_bare_generate_without_memory_still_raises(model, tokenizer):
    prompt = tokenize_prompt(tokenizer, "the cat", return_tensors="pt")
    message = r"generate needs the conversation state: pass stm=model.init_memory\(batch_size\)"
    with pytest.raises(ValueError, match=message):
        model.generate(prompt["input_ids"], max_new_tokens=3)
    # transformers' own pipeline class (what remote code alone gets) reaches that same error
    with pytest.raises(ValueError, match=message):
        TextGenerationPipeline(model=model, tokenizer=tokenizer)(CHAT[1:2], **GREEDY)


def test_other_models_get_transformers_pipeline_unchanged(tokenizer, tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    pipe = pipeline("text-generation", model=llama, tokenizer=tokenizer)
    plain = TextGenerationPipeline(model=llama, tokenizer=tokenizer)
    for prompt in ("the cat ran", ["the fox", "the old cat ran to"]):
        assert pipe(prompt, **GREEDY) == plain(prompt, **GREEDY)
    pipe.save_pretrained(tmp_path)  # not written into other models' configs as a custom pipeline
    assert "custom_pipelines" not in json.loads((tmp_path / "config.json").read_text())


def test_a_remote_code_model_works_too(model, tokenizer, tmp_path):
    """A checkpoint loaded as remote code has its own copies of the classes (STMCache included). In a subprocess
    so that the dynamic modules go to a temporary HF_HOME."""
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    torch.manual_seed(3)
    expected = pipeline("text-generation", model=model, tokenizer=tokenizer)(CHAT, **GREEDY)
    script = textwrap.dedent(f"""
        import json, torch, transformers_rxt
        from transformers import AutoTokenizer, pipeline
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        path = {str(tmp_path / "model")!r}
        remote = get_class_from_dynamic_module("modeling_rxt.RxTForConversationalGeneration", path)
        model = remote.from_pretrained(path).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        torch.manual_seed(3)
        out = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained(path))(
            json.loads({json.dumps(CHAT)!r}), do_sample=False, max_new_tokens=8)
        print("OUT" + json.dumps(out))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.split("OUT", 1)[1]) == expected
