"""Attention through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`), for every RxT attention."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from transformers_rxt import RxTConfig, RxTForConversationalGeneration, RxTMemoryAttention
from transformers_rxt.modeling_rxt import RxTAttention

from rxt_factories import interaction_batch, tiny_config, tiny_model

# grouped self-attention, reverse-SQA cross-attention, a stateless layer, the self-interlayer memory attention
SHAPES = dict(decoder=dict(att_groups=2, att_query_groups=4, cross_att_groups=4, cross_att_query_groups=2,
                           stateless_layers_config=["dense"]),
              memory=dict(variant="self-interlayer"))


def outputs(model, ids, mask, stm):
    """Teacher-forced logits of the real tokens and the memory update of a padded batch."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, stm=stm).logits[mask.bool()]
        return logits, model.compute_memory_update(ids, mask, stm.memory)


@pytest.fixture(scope="module")
def batch():
    model = tiny_model(seed=2, **SHAPES)
    with torch.no_grad():  # move every weight off its init
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    return model, ids, mask, model.init_memory(2, generator=torch.Generator().manual_seed(0))


def test_every_attention_goes_through_the_interface(batch):
    """A function registered in transformers' AttentionInterface runs every RxT attention: decoder self-attention,
    memory cross-attention, encoder and memory attention, with the model's numbers."""
    model, ids, mask, stm = batch
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(module)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("rxt_test_spy", spy)
    try:
        model.set_attn_implementation("sdpa")
        expected = outputs(model, ids, mask, stm)
        model.set_attn_implementation("rxt_test_spy")
        got = outputs(model, ids, mask, stm)
    finally:
        model.set_attn_implementation("sdpa")
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop("rxt_test_spy")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    attention_modules = {m for m in model.modules() if isinstance(m, RxTAttention)}
    # each of them once (the decoder in the forward pass, the encoder and memory attention in the update)
    assert set(calls) == attention_modules and len(calls) == len(attention_modules) == 11


@pytest.mark.parametrize("impl", ["eager", "sqa"])
def test_each_attention_function_gives_the_sdpa_numbers(batch, impl):
    model, ids, mask, stm = batch
    model.set_attn_implementation("sdpa")
    expected = outputs(model, ids, mask, stm)
    model.set_attn_implementation(impl)
    try:
        assert {m.attn_implementation for m in model.modules() if isinstance(m, RxTAttention)} == {impl}
        got = outputs(model, ids, mask, stm)
    finally:
        model.set_attn_implementation("sdpa")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flex_attention_gives_the_sdpa_numbers_with_both_kinds_of_mask():
    """flex_attention on the two mask kinds RxT builds, at module level (flex compiles a kernel per shape: the
    whole model would cost minutes of CPU): a left-padded causal self-attention with grouped K/V, and a reverse-SQA
    attention from memory slots to padded keys (memory attention)."""
    torch.manual_seed(0)
    self_attention = RxTAttention(32, 4, 4, 2, rope=None).eval()
    memory_attention = RxTAttention(32, 4, 2, 4, rope=None).eval()
    hidden, slots = torch.randn(2, 12, 32), torch.randn(2, 8, 32)
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, :4] = False
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    causal |= torch.eye(12, dtype=torch.bool)  # a padded query row sees itself (as the model's mask)
    calls = [(self_attention, dict(hidden=hidden, mask=causal)),
             (memory_attention, dict(hidden=slots, kv_states=hidden, mask=real[:, None, None, :]))]
    for module, kwargs in calls:
        results = {}
        for impl in ("sdpa", "flex_attention"):
            module.config = SimpleNamespace(_attn_implementation=impl)
            with torch.no_grad():
                results[impl] = module(**kwargs)
        torch.testing.assert_close(results["flex_attention"], results["sdpa"], rtol=1e-5, atol=1e-5)


def test_an_unknown_attention_is_refused_at_config_and_model_construction(tmp_path):
    message = 'Specified `attn_implementation="bogus"` is not supported by RxT: it supports'
    with pytest.raises(ValueError, match=message):
        tiny_config(attn_implementation="bogus")
    with pytest.raises(ValueError, match="not supported"):
        RxTConfig.from_dict({**tiny_config().to_dict(), "attn_implementation": "bogus"})
    config = tiny_config()
    config._attn_implementation = "bogus"
    with pytest.raises(ValueError, match='Specified `attn_implementation="bogus"` is not supported'):
        RxTForConversationalGeneration(config)
    model = tiny_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='Specified `attn_implementation="bogus"` is not supported'):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="bogus")
    for name in ("bogus", "paged|eager"):  # paged kernels need a paged cache, which RxT's decoder does not use
        with pytest.raises(ValueError, match=f'Specified `attn_implementation="{name.replace("|", ".")}"` is not'):
            model.set_attn_implementation(name)
    assert model.config._attn_implementation == "sdpa"
    # a name transformers knows but this machine cannot run is refused by transformers' own check, before use
    with pytest.raises(ImportError, match="FlashAttention2"):
        model.set_attn_implementation("flash_attention_2")
    assert model.config._attn_implementation == "sdpa"


def test_a_memory_attention_component_follows_its_config():
    component = tiny_model().memory_attention
    standalone = RxTMemoryAttention(type(component.config)(
        memory_attention_config=component.config.memory_attention_config, attn_implementation="eager"))
    assert {m.attn_implementation for m in standalone.modules() if isinstance(m, RxTAttention)} == {"eager"}
    full = RxTForConversationalGeneration(tiny_config(attn_implementation="eager"))
    assert full.memory_attention.config._attn_implementation == "eager"
