"""The decoder's cache: memory cross-attention K/V in the cross-attention cache of transformers' EncoderDecoderCache
(`RxTCache`), so that static caches, beams, cropping, batch selection and assisted decoding are transformers' own
cache code; a cache is refused with another memory."""

import functools

import pytest
import torch
from transformers import CompileConfig, DynamicCache, EncoderDecoderCache, LlamaConfig, LlamaForCausalLM, StaticCache

from transformers_rxt import RxTCache

from rxt_factories import tiny_model
from test_generation import _prompts

ATOL = 1e-5


def _model(**kwargs):
    """A tiny model that does not stop early at [EOS] (every test decodes a full answer)."""
    model = tiny_model(**kwargs)
    with torch.no_grad():
        model.lm_head.bias[model.config.eos_token_id] -= 10.0
    return model


def _step(model, ids, stm, cache, mask=None):
    return model(input_ids=ids, attention_mask=mask, stm=stm, past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_the_memory_key_values_live_in_the_cross_attention_cache():
    model = _model(decoder=dict(stateless_layers_config=["dense"]))
    ids, mask = _prompts(model, [9, 6])
    memory = model.init_memory(2, generator=torch.Generator().manual_seed(1)).memory
    cache = _step(model, ids, memory, None, mask).past_key_values
    assert isinstance(cache, RxTCache) and isinstance(cache, EncoderDecoderCache)
    expected = model.decoder.memory_key_values(memory)
    assert len(expected) == model.config.num_memory_layers
    for layer, (key, value) in enumerate(expected):
        assert torch.equal(cache.cross_attention_cache.layers[layer].keys, key)
        assert torch.equal(cache.cross_attention_cache.layers[layer].values, value)
    # the self-attention cache has one layer per decoder layer (the stateless one included), the prompt's length
    assert len(cache.self_attention_cache.layers) == 3 and cache.get_seq_length() == ids.shape[1]
    assert not hasattr(cache, "rxt_memory_kv")


@torch.no_grad()
def test_cached_uncached_and_static_cache_greedy_generation_agree_on_a_padded_batch():
    model = _model(decoder=dict(use_moe=True, num_experts=4, moe_top_k=2, stateless_layers_config=["dense"]))
    ids, mask = _prompts(model, [9, 5, 7])
    stm = model.init_memory(3, generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, memory_update="none", return_dict_in_generate=True,
              output_logits=True)
    runs = {"dynamic": model.generate(ids, attention_mask=mask, stm=stm, **kw),
            "uncached": model.generate(ids, attention_mask=mask, stm=stm, use_cache=False, **kw),
            "static": model.generate(ids, attention_mask=mask, stm=stm, cache_implementation="static", **kw)}
    assert isinstance(runs["static"].past_key_values.self_attention_cache, StaticCache)
    assert isinstance(runs["static"].past_key_values.cross_attention_cache, StaticCache)
    for name in ("uncached", "static"):
        assert torch.equal(runs[name].sequences, runs["dynamic"].sequences), name
        torch.testing.assert_close(torch.stack(runs[name].logits), torch.stack(runs["dynamic"].logits),
                                   rtol=ATOL, atol=ATOL)
    assert runs["dynamic"].sequences.shape[1] == ids.shape[1] + 12


@torch.no_grad()
def test_beam_search_with_a_dynamic_or_static_cache_equals_beam_search_without_a_cache():
    model = _model()
    ids, mask = _prompts(model, [8, 6])
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, memory_update="none",
              return_dict_in_generate=True, output_scores=True)
    uncached = model.generate(ids, attention_mask=mask, stm=stm, use_cache=False, **kw)
    for cache_kw in ({}, {"cache_implementation": "static"}):
        cached = model.generate(ids, attention_mask=mask, stm=stm, **cache_kw, **kw)
        assert torch.equal(cached.sequences, uncached.sequences), cache_kw
        torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=ATOL, atol=ATOL)
    # the two rows answer from their own memories: row 1 alone gives row 1's beams
    alone = model.generate(ids[1:, -6:], stm=stm.select(1), **kw)
    assert torch.equal(alone.sequences, uncached.sequences[2:, -alone.sequences.shape[1]:])


@torch.no_grad()
def test_crop_reorder_and_batch_selection_continue_like_a_fresh_pass():
    model = _model()
    ids, mask = _prompts(model, [12, 9])
    memory = model.init_memory(2, generator=torch.Generator().manual_seed(3)).memory
    fresh = model(input_ids=ids, attention_mask=mask, stm=memory).logits

    def prefill(length):
        return _step(model, ids[:, :length], memory, None, mask[:, :length]).past_key_values

    # crop: prefill 10 tokens, drop the last 3, go on from token 7
    cache = prefill(10)
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(_step(model, ids[:, 7:], memory, cache, mask).logits, fresh[:, 7:],
                               rtol=ATOL, atol=ATOL)
    # beam reordering, batch selection and repetition move the memory K/V rows with the self-attention rows
    swap = torch.tensor([1, 0])
    cache = prefill(7)
    cache.reorder_cache(swap)
    swapped_fresh = model(input_ids=ids[swap], attention_mask=mask[swap], stm=memory[swap]).logits
    torch.testing.assert_close(_step(model, ids[swap, 7:], memory[swap], cache, mask[swap]).logits,
                               swapped_fresh[:, 7:], rtol=ATOL, atol=ATOL)
    cache = prefill(7)
    cache.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(_step(model, ids[1:, 7:], memory[1:], cache, mask[1:]).logits, fresh[1:, 7:],
                               rtol=ATOL, atol=ATOL)
    cache = prefill(7)
    cache.batch_repeat_interleave(2)
    repeated = _step(model, ids[:, 7:].repeat_interleave(2, 0), memory.repeat_interleave(2, 0), cache,
                     mask.repeat_interleave(2, 0)).logits
    torch.testing.assert_close(repeated, fresh[:, 7:].repeat_interleave(2, 0), rtol=ATOL, atol=ATOL)


@torch.no_grad()
def test_a_cache_is_refused_with_another_memory_or_after_the_memory_update():
    model = _model()
    ids, mask = _prompts(model, [9, 9])
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(4))
    cache = _step(model, ids[:, :5], stm.memory, None).past_key_values
    other = model.init_memory(2, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="computed from another STM than the one passed"):
        _step(model, ids[:, 5:6], other.memory, cache)
    with pytest.raises(ValueError, match="computed from another STM"):  # its rows in another order
        _step(model, ids[:, 5:6], stm.memory[torch.tensor([1, 0])], cache)
    # a copy of the same memory is the same memory
    copy_logits = _step(model, ids[:, 5:6], stm.memory.clone(), cache).logits
    fresh = model(input_ids=ids[:, :6], stm=stm.memory).logits[:, -1:]
    torch.testing.assert_close(copy_logits, fresh, rtol=ATOL, atol=ATOL)
    # the same STMCache after its update (in place) holds another memory
    model.update_memory(*_prompts(model, [11, 11], seed=1), stm)
    with pytest.raises(ValueError, match="before its last update"):
        _step(model, ids[:, 6:7], stm.memory, cache)
    # a bare transformers cache passed in is wrapped: its memory K/V are computed from the memory given
    plain = _step(model, ids, stm.memory, DynamicCache()).past_key_values
    assert isinstance(plain, RxTCache) and plain.cross_attention_cache.get_seq_length() == model.config.stm_size
    # a static cross-attention cache holds stm_size slots: encoder states of another length are refused
    static = RxTCache.wrap(StaticCache(config=model.config, max_cache_len=20), model.config)
    encoded = torch.randn(2, model.config.num_memory_layers, 5, model.config.hidden_size)
    with pytest.raises(ValueError, match="static cross-attention cache holds 8 memory slots but the memory has 5"):
        model(input_ids=ids, encoder_memory=encoded, past_key_values=static, use_cache=True)


def _greedy_and_counted_main_steps(model, ids, stm, **kw):
    lengths = []
    forward = model.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.forward = counting
    try:
        return model.generate(ids, stm=stm, max_new_tokens=16, do_sample=False, **kw), lengths
    finally:
        del model.forward


@torch.no_grad()
def test_prompt_lookup_and_assisted_decoding_give_the_greedy_tokens_and_leave_the_memory_to_the_main_model(
        monkeypatch):
    model, assistant = _model(), _model(seed=7)  # the assistant: same memory geometry, other weights
    for m in (model, assistant):  # draft 4 tokens every round, whatever the assistant's confidence
        m.generation_config.update(num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=0.0)
    ids, _ = _prompts(model, [9])
    stm = model.init_memory(1, generator=torch.Generator().manual_seed(6))
    greedy, _ = _greedy_and_counted_main_steps(model, ids, stm.clone(), memory_update="sync")
    lookup, _ = _greedy_and_counted_main_steps(model, ids, stm.clone(), memory_update="sync",
                                                          prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, greedy)

    def no_memory_writes(*args, **kwargs):
        raise AssertionError("the assistant wrote a memory")

    monkeypatch.setattr(assistant, "update_memory", no_memory_writes)
    monkeypatch.setattr(assistant, "compute_memory_update", no_memory_writes)
    for helper in (assistant, model):  # another model (drafts mostly rejected: cropping), the model itself
        shared = stm.clone()
        assisted, steps = _greedy_and_counted_main_steps(model, ids, shared, memory_update="none",
                                                         assistant_model=helper)
        assert torch.equal(assisted, greedy) and torch.equal(shared.memory, stm.memory)
        assert 5 in steps  # the main model verified 4 drafted tokens (+ its own next one) in one pass
    # with the main model's update, the memory is the one plain greedy decoding writes
    shared = stm.clone()
    _greedy_and_counted_main_steps(model, ids, shared, memory_update="sync", assistant_model=assistant)
    expected = stm.clone()
    model.update_memory(*model.interactions_from_generation(greedy, ids.shape[1]), expected)
    torch.testing.assert_close(shared.memory, expected.memory, rtol=0, atol=0)
    # an assistant that does not read an STM is refused by transformers before it drafts (it does not take `stm`)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match=r"model_kwargs` are not used by the model: \['stm'\]"):
        model.generate(ids, stm=stm.clone(), assistant_model=llama, max_new_tokens=4, memory_update="none")


@torch.no_grad()
@pytest.mark.parametrize("decoder", [None, dict(use_moe=True, num_experts=4, moe_top_k=2)], ids=["dense", "moe"])
def test_generate_compiles_the_static_cache_decode_step_into_one_graph(decoder):
    """transformers' automatic `torch.compile` of the decode step (static cache, `compile_config`; on CPU only when
    asked): traced with `fullgraph=True` (no graph break), once for every step and for a second call, with the
    eager tokens. A counting backend that runs the traced graph as is keeps this to seconds; the inductor backend is
    timed by `benchmarks/bench_decode.py --compile`. With MoE, the decode steps, eager and traced, run only the
    chosen experts (the routing read as integers: dynamo's captured scalars in the traced step), never the grouped
    matmul over every expert."""
    model = _model(layers=1, decoder=decoder)
    ids, mask = _prompts(model, [9, 6])
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=6, do_sample=False, memory_update="none")
    eager = model.generate(ids, attention_mask=mask, stm=stm, **kw)
    graphs = []

    def counting_backend(graph_module, example_inputs, **options):
        graphs.append(graph_module)
        return graph_module.forward

    config = CompileConfig(fullgraph=True, backend=counting_backend)
    config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    for _ in range(2):
        compiled = model.generate(ids, attention_mask=mask, stm=stm, cache_implementation="static",
                                  compile_config=config, **kw)
        assert torch.equal(compiled, eager)
    assert len(graphs) == 1
    assert "grouped_mm" not in graphs[0].code and (decoder is None or "item" in graphs[0].code), graphs[0].code
