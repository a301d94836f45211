"""Behaviour of the RxT model: every configuration option builds and runs, round trips, dtypes, errors."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from transformers import AutoModel, AutoModelForCausalLM

from transformers_rxt import (RxTConfig, RxTForConversationalGeneration, RxTMemoryAttention, RxTMemoryAttentionConfig,
                              RxTModel, STMCache)
from transformers_rxt.conversion import save_rxlm_checkpoint
from transformers_rxt.modeling_rxt import RxTAttention, apply_rope, rope_inv_freq
from transformers_rxt.training.utils import load_rxt_model

from rxt_factories import interaction_batch, tiny_config, tiny_model

ATTENTION = {
    "mha": dict(self_att_type="mha", cross_att_type="mha"),
    "gqa": dict(self_att_type="gqa", cross_att_type="gqa"),
    "mqa": dict(self_att_type="mqa", cross_att_type="mqa"),
    "sqa-sym": dict(att_groups=2, att_query_groups=2),
    "sqa-more-queries": dict(att_groups=1, att_query_groups=2, cross_att_groups=1, cross_att_query_groups=2),
    "sqa-reverse": dict(att_groups=4, att_query_groups=2, cross_att_groups=4, cross_att_query_groups=1),
    "gated": dict(use_gated_attention=True),
    "gated-cross-only": dict(use_gated_attention=False, use_gated_cross_attention=True),
    "stateless": dict(stateless_layers_config=["dense", "moe"], final_stateless_layers_config=["dense"],
                      dense_layer_dim=40),
    "layernorm-headnorm": dict(use_rms_norm=False, use_head_norm=True, head_norm_type="layer_norm"),
    "rms-headnorm": dict(use_head_norm=True, head_norm_type="rms_norm"),
    "dense-ungated": dict(use_gated=False, ff_activation="gelu"),
    "no-out-bias": dict(use_attention_output_bias=False),
}
MOE = {
    "moe-shared1-global": dict(use_moe=True, num_experts=4, moe_top_k=2),
    "moe-noshared-local": dict(use_moe=True, num_experts=4, moe_top_k=1, num_shared_experts=0, moe_bias_mode="local"),
    "moe-shared2-weighted": dict(use_moe=True, num_experts=4, moe_top_k=2, num_shared_experts=2, shared_expert_dim=24,
                                 moe_use_weighted_shared_experts=True, moe_shared_experts_bias_mode="global"),
    "moe-ungated-off": dict(use_moe=True, num_experts=3, moe_top_k=2, use_gated=False, moe_bias_mode="off",
                            moe_shared_experts_bias_mode="off"),
}
MEMORY = {
    "simple": dict(variant="simple"),
    "simple-noresidual": dict(variant="simple", disable_residual=True),
    "self": dict(variant="self", use_gated_residual=True, use_gate_for_self_attention=True),
    "interlayer": dict(variant="interlayer"),
    "self-interlayer": dict(variant="self-interlayer"),
    "grouped": dict(variant="grouped-self-interlayer", num_groups=2),
}
NORMS = ["classic-rms", "rms", "layer", "adaptive", "positional"]
GATES = {
    "off": dict(use_gated_residual=False),
    "static-tanh": dict(use_gated_residual=True, residual_gate_type="static"),
    "static-sigmoid-global": dict(use_gated_residual=True, residual_gate_type="static", residual_per_slot_gate=False,
                                  use_tanh_residual_gate=False),
    "elementwise-tanh": dict(use_gated_residual=True, residual_gate_type="elementwise"),
    "elementwise-linear-status": dict(use_gated_residual=True, residual_gate_type="elementwise",
                                      residual_gate_slot_status_type="linear"),
    "elementwise-pair-status": dict(use_gated_residual=True, residual_gate_type="elementwise",
                                    residual_gate_slot_status_type="pair", use_tanh_residual_gate=False),
    "linear-sigmoid": dict(use_gated_residual=True, residual_gate_type="linear", use_tanh_residual_gate=False),
    "elementwise-write-budget": dict(use_gated_residual=True, residual_gate_type="elementwise",
                                     residual_gate_slot_status_type="linear", use_tanh_residual_gate=False,
                                     residual_gate_write_budget=2.0),
    "linear-global": dict(use_gated_residual=True, residual_gate_type="linear", residual_per_slot_gate=False),
}


def _run_turn(model, seed=0):
    ids, mask = interaction_batch(batch=2, length=12, vocab=model.config.vocab_size, seed=seed)
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, stm=stm).logits
        model.update_memory(ids, mask, stm)
    return logits, stm.memory


def _perturb(model, seed=1):
    """Move every weight off its init, so that round trips cannot pass by re-initialising."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name", list(ATTENTION) + list(MOE))
def test_decoder_options_run_and_survive_rxlm_round_trip(name, tmp_path):
    overrides = {**ATTENTION, **MOE}[name]
    model = _perturb(tiny_model(decoder=overrides, encoder={k: v for k, v in overrides.items()
                                                           if not k.startswith(("cross", "use_gated_cross",
                                                                                "stateless", "final", "dense",
                                                                                "use_head", "head_"))}))
    logits, memory = _run_turn(model)
    assert torch.isfinite(logits).all() and torch.isfinite(memory).all()
    save_rxlm_checkpoint(model, str(tmp_path))
    loaded = RxTForConversationalGeneration.from_rxlm_pretrained(str(tmp_path))
    logits2, memory2 = _run_turn(loaded)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    torch.testing.assert_close(memory2, memory, rtol=0, atol=0)


@pytest.mark.parametrize("variant,norm,gate", [
    *[(v, "classic-rms", "off") for v in MEMORY],
    *[("self-interlayer", n, "static-tanh") for n in NORMS],
    *[("grouped", "rms", g) for g in GATES],
])
def test_memory_attention_options_run_and_round_trip(variant, norm, gate, tmp_path):
    opts = {**MEMORY[variant], "norm_type": norm, **GATES[gate]}
    model = _perturb(tiny_model(memory=opts))
    logits, memory = _run_turn(model)
    assert torch.isfinite(memory).all()
    model.save_pretrained(tmp_path / "hf")
    reloaded = RxTForConversationalGeneration.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_run_turn(reloaded)[1], memory, rtol=0, atol=0)
    if opts.get("residual_gate_slot_status_type") == "pair":
        with pytest.raises(ValueError, match="residual_gate_slot_status_type='pair'.*save_pretrained instead"):
            save_rxlm_checkpoint(model, str(tmp_path / "rxlm"))
    elif opts.get("residual_gate_write_budget") is not None:
        with pytest.raises(ValueError, match="residual_gate_write_budget.*save_pretrained instead"):
            save_rxlm_checkpoint(model, str(tmp_path / "rxlm"))
    elif opts["variant"] in ("self-interlayer", "grouped-self-interlayer"):
        save_rxlm_checkpoint(model, str(tmp_path / "rxlm"))
        loaded = RxTForConversationalGeneration.from_rxlm_pretrained(str(tmp_path / "rxlm"))
        assert loaded.config.memory_attention_config["variant"] == opts["variant"]
        torch.testing.assert_close(_run_turn(loaded)[1], memory, rtol=0, atol=0)


def test_adaptive_norm_differs_between_train_and_eval_and_updates_its_ema():
    model = tiny_model(memory=dict(norm_type="adaptive"))
    norm = model.memory_attention.memory_norm_layers[0]
    x = torch.randn(2, 8, 32) * 3
    eval_out = norm(x)
    norm.train()
    train_out = norm(x)
    assert not torch.allclose(eval_out, train_out)
    assert norm.ema_rms.item() != 1.0


def test_gated_residual_formulas():
    model = tiny_model(memory=dict(use_gated_residual=True, residual_gate_type="static", residual_gate_init=0.5))
    gate = model.memory_attention.residual_gate_layers[0]
    old, new = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    g = torch.tanh(torch.tensor(0.5))
    torch.testing.assert_close(gate(old, new), (1 + g) * new + (1 - g) * old)
    plain = tiny_model().memory_attention.residual_gate_layers[0]
    torch.testing.assert_close(plain(old, new), old + new)


def test_sigmoid_gate_is_the_convex_mix_in_value_gradient_and_promoted_dtype():
    """The sigmoid gate runs as one `torch.lerp`: the same values and gradients as g * new + (1 - g) * old, and
    the dtype that arithmetic promotes to when the memory is fp32 and the update bf16 (autocast)."""
    model = tiny_model(memory=dict(use_gated_residual=True, residual_gate_type="linear", residual_per_slot_gate=True,
                                   use_tanh_residual_gate=False))
    gate = _perturb(model).memory_attention.residual_gate_layers[0]
    g = torch.Generator().manual_seed(3)
    old = torch.randn(2, 8, 32, generator=g, requires_grad=True)
    new = torch.randn(2, 8, 32, generator=g, requires_grad=True)
    out = gate(old, new)
    weight = torch.sigmoid(gate.gate((old + new).mean(-1))).unsqueeze(-1)
    expected = weight * new + (1 - weight) * old
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(out.square().sum(), (old, new, gate.gate.weight))
    expected_grads = torch.autograd.grad(expected.square().sum(), (old, new, gate.gate.weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mixed = gate(old.detach(), new.detach().bfloat16())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, weight.detach() * new.detach().bfloat16() + (1 - weight.detach()) * old.detach(),
                               rtol=0, atol=1e-2)


def test_memory_update_gradients_pass_the_per_layer_writes():
    """The encoder and the memory attention copy each layer into their output as it is made (no list + stack):
    autograd's numerical gradient check of the whole update, with respect to the memory and the interaction's
    embeddings, in float64."""
    model = _perturb(tiny_model(memory=MEMORY["self-interlayer"])).double()
    ids, mask = interaction_batch(batch=2, length=10)
    memory = model.initial_memory_tensor(2, "normal").double().requires_grad_()
    embeddings = model.embed_tokens(ids).detach().requires_grad_()

    def update(memory, embeddings):
        positions = torch.arange(ids.shape[1])
        encoded, _ = model.encoder(embeddings, positions=positions, key_mask=mask.bool()[:, None, None, :])
        return model.memory_attention(memory, encoded, mask)

    assert torch.autograd.gradcheck(update, (memory, embeddings), fast_mode=True)


def test_pair_slot_status_sees_the_old_slot_and_the_update_separately():
    model = tiny_model(memory=dict(use_gated_residual=True, residual_gate_type="elementwise",
                                   residual_gate_slot_status_type="pair", use_tanh_residual_gate=False))
    gate = model.memory_attention.residual_gate_layers[0]
    assert tuple(gate.slot_status.weight.shape) == (1, 64)
    old, new = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    with torch.no_grad():
        gate.slot_status.weight.zero_()
        gate.slot_status.bias.zero_()
        gate.slot_status.weight[0, :32] = 1.0  # status = the old slot's sum: blind to the update
    g = torch.sigmoid(gate.gate * old.sum(-1, keepdim=True))
    torch.testing.assert_close(gate(old, new), g * new + (1 - g) * old)
    # a 'linear' status of old + new could not be a function of the old slot alone
    torch.testing.assert_close(gate(old, new * 3), g * 3 * new + (1 - g) * old)


def test_write_budget_makes_slots_compete_for_one_write():
    opts = dict(use_gated_residual=True, residual_gate_type="elementwise", residual_gate_slot_status_type="linear",
                use_tanh_residual_gate=False)
    model = _perturb(tiny_model(memory={**opts, "residual_gate_write_budget": 2.0}))
    gate = model.memory_attention.residual_gate_layers[0]
    old, new = torch.randn(3, 8, 32), torch.randn(3, 8, 32)
    logits = gate.gate * gate.slot_status(old + new)
    g = torch.clamp(2.0 * torch.softmax(logits, dim=-2), max=1.0)
    torch.testing.assert_close(gate(old, new), g * new + (1 - g) * old)
    assert float(g.detach().sum(dim=-2).max()) <= 2.0 + 1e-6  # at most two slots' worth replaced per write and layer
    # only the write of the new interaction competes; the inter-layer mixing keeps independent gates
    assert model.memory_attention.mean_residual_gate_layers[0].write_budget is None
    for bad, message in [(0.0, r"must be in \(0, stm_size=8\] slots, got 0.0"),
                         (9.0, r"must be in \(0, stm_size=8\] slots, got 9.0")]:
        with pytest.raises(ValueError, match=message):
            tiny_model(memory={**opts, "residual_gate_write_budget": bad})
    with pytest.raises(ValueError, match="residual_gate_write_budget needs per-slot sigmoid gates"):
        tiny_model(memory={**opts, "use_tanh_residual_gate": True, "residual_gate_write_budget": 2.0})


FIFO = dict(use_gated_residual=True, residual_gate_type="elementwise", residual_gate_slot_status_type="linear",
            use_tanh_residual_gate=False, fifo_write_slots=2)


def test_fifo_writes_each_interaction_into_fresh_slots_and_keeps_the_others_exactly(tmp_path):
    model = _perturb(tiny_model(memory=FIFO, stm_init_type="learned"))  # 8 slots: the last 4 interactions
    stm = model.init_memory(2)
    initial = stm.memory.clone()
    written = []
    for turn in range(5):
        ids, mask = interaction_batch(batch=2, length=12, vocab=model.config.vocab_size, seed=turn)
        before = stm.memory.clone()
        with torch.no_grad():
            model.update_memory(ids, mask, stm)
        # the oldest two slots of every layer are dropped, the rest move back unchanged
        torch.testing.assert_close(stm.memory[:, :, 2:], before[:, :, :-2], rtol=0, atol=0)
        assert not torch.allclose(stm.memory[:, :, :2], initial[:, :, :2])  # the fresh slots were written
        written.append(stm.memory[:, :, :2].clone())
    # the first interaction sat in slots 6-7 after the fourth write and is gone after the fifth
    for age, slots in enumerate(reversed(written)):
        if age < 4:
            torch.testing.assert_close(stm.memory[:, :, 2 * age:2 * age + 2], slots, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "hf")
    reloaded = RxTForConversationalGeneration.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_run_turn(reloaded)[1], _run_turn(model)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="fifo_write_slots.*save_pretrained instead"):
        save_rxlm_checkpoint(model, str(tmp_path / "rxlm"))


def test_fifo_sends_a_later_turns_gradient_straight_to_the_write_of_its_fact():
    model = _perturb(tiny_model(memory=FIFO, stm_init_type="learned"))
    ids, mask = interaction_batch(batch=2, length=12, vocab=model.config.vocab_size, seed=0)
    encoded = model.encode(ids, mask)[0].detach().requires_grad_(True)
    after_fact = model.memory_attention(model.initial_memory_tensor(2), encoded, mask)
    memory = after_fact
    for turn in range(1, 4):  # three later writes: the fact's slots move back, untouched
        ids, mask = interaction_batch(batch=2, length=12, vocab=model.config.vocab_size, seed=turn)
        memory = model.memory_attention(memory, model.encode(ids, mask)[0], mask)
    weights = torch.randn(after_fact[:, :, :2].shape)
    (direct,) = torch.autograd.grad((after_fact[:, :, :2] * weights).sum(), encoded, retain_graph=True)
    (later,) = torch.autograd.grad((memory[:, :, 6:8] * weights).sum(), encoded)
    assert float(direct.abs().sum()) > 0
    torch.testing.assert_close(later, direct, rtol=0, atol=0)  # the copies pass the gradient on unchanged


@pytest.mark.parametrize("variant", ["simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer"])
def test_fifo_computes_only_the_fresh_slots_and_equals_writing_every_slot(variant):
    """The FIFO write queries only the fresh slots; the result is what writing all slots of the shifted memory
    and keeping the fresh ones gives (the old way), in every variant, padded rows included."""
    memory = {**FIFO, "variant": variant, "use_gate_for_self_attention": True}
    if variant == "grouped-self-interlayer":
        memory["num_groups"] = 2
    model = _perturb(tiny_model(memory=memory, stm_init_type="learned"))
    attention = model.memory_attention
    ids, mask = interaction_batch(batch=3, length=12, vocab=model.config.vocab_size, seed=4)
    encoded = model.encode(ids, mask)[0]
    stm = attention(model.initial_memory_tensor(3), encoded, mask)  # a written memory, not the initial one
    fresh = attention.initial_memory[:, :2].unsqueeze(0).expand(3, -1, -1, -1)
    shifted = torch.cat([fresh, stm[:, :, :-2]], dim=2)
    every_slot = attention._write(shifted, encoded, mask)
    written = attention(stm, encoded, mask)
    torch.testing.assert_close(written[:, :, :2], every_slot[:, :, :2], rtol=0, atol=1e-6)
    torch.testing.assert_close(written[:, :, 2:], stm[:, :, :-2], rtol=0, atol=0)


def test_fifo_refuses_gates_and_norms_that_look_across_slots():
    for bad, name in [({"residual_gate_type": "linear"}, "residual_gate_type='linear'"),
                      ({"residual_gate_slot_status_type": "mean", "residual_per_slot_gate": False},
                       "residual_per_slot_gate=False"),
                      ({"residual_gate_write_budget": 2.0}, "residual_gate_write_budget"),
                      ({"norm_type": "positional"}, "norm_type='positional'"),
                      ({"norm_type": "adaptive"}, "norm_type='adaptive'")]:
        with pytest.raises(ValueError, match=f"fifo_write_slots writes only the fresh slots, so every gate and norm "
                                             f"must treat each slot on its own; {name} looks across slots"):
            tiny_model(memory={**FIFO, **bad}, stm_init_type="learned")


def test_fifo_is_refused_where_it_cannot_work():
    for bad in (0, 3, 8):
        with pytest.raises(ValueError, match=f"fifo_write_slots must divide stm_size=8 and be smaller, got {bad}"):
            tiny_model(memory={**FIFO, "fifo_write_slots": bad}, stm_init_type="learned")
    with pytest.raises(ValueError, match="fifo_write_slots writes each interaction into fresh slots taken from the "
                                         "learned initial memory; build the model with stm_init_type='learned'"):
        tiny_model(memory=FIFO)


def test_saved_configs_without_the_write_budget_still_load(tmp_path):
    model = _perturb(tiny_model(memory=dict(use_gated_residual=True, residual_gate_type="elementwise")))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for option in ("residual_gate_write_budget", "fifo_write_slots"):  # saved before the options existed
        del config["memory_attention_config"][option]
    for component in ("decoder_config", "encoder_config"):
        del config[component]["rope_memory_cross_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RxTForConversationalGeneration.from_pretrained(tmp_path)
    assert loaded.config.decoder_config["rope_memory_cross_attention"] is True
    assert loaded.config.memory_attention_config["residual_gate_write_budget"] is None
    assert loaded.config.memory_attention_config["fifo_write_slots"] is None
    torch.testing.assert_close(_run_turn(loaded)[1], _run_turn(model)[1], rtol=0, atol=0)
    del config["memory_attention_config"]["residual_gate_type"]  # any other missing option is still refused
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks \['memory_attention_config.residual_gate_type'\]"):
        RxTForConversationalGeneration.from_pretrained(tmp_path)


def test_reference_checkpoint_refuses_options_the_reference_lacks(tmp_path):
    with pytest.raises(ValueError, match="stm_init_type='learned'.*save it with save_pretrained instead"):
        save_rxlm_checkpoint(tiny_model(stm_init_type="learned"), str(tmp_path))


def test_reverse_sqa_tiles_queries_over_kv_heads():
    torch.manual_seed(0)
    attn = RxTAttention(32, 4, num_query_heads=2, num_kv_heads=4, rope=None)
    x = torch.randn(1, 5, 32)
    out = attn(x)
    q = attn.q_proj(x).view(1, 5, 2, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 5, 4, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 5, 4, 8).transpose(1, 2)
    heads = [torch.softmax(q[:, j % 2] @ k[:, j].transpose(-1, -2) / 8 ** 0.5, -1) @ v[:, j] for j in range(4)]
    expected = attn.out_proj(torch.stack(heads, 1).transpose(1, 2).reshape(1, 5, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_rope_rotates_interleaved_pairs():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # pair (x0, x1) = (1, 0)
    inv = rope_inv_freq(4, 10000.0)
    out = apply_rope(x, torch.tensor([3]), inv)
    torch.testing.assert_close(out[0, 0, 0, :2], torch.tensor([torch.cos(torch.tensor(3.0)), torch.sin(torch.tensor(3.0))]))
    assert out[0, 0, 0, 2:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_pairwise_rotation_bit_for_bit(dtype):
    """`x * cos + swapped(x) * sin` computes each pair's rotation (x0 c - x1 s, x1 c + x0 s) with the same roundings."""
    inv = rope_inv_freq(16, 10000.0)
    x = torch.randn(2, 3, 7, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 30, 31, 32]])
    angles = (positions.float()[..., None] * inv).to(dtype)[:, None]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    assert torch.equal(apply_rope(x, positions, inv), expected)


def test_save_pretrained_round_trip_identical_logits_and_rebuilt_buffers(tmp_path):
    model = _perturb(tiny_model(decoder=MOE["moe-shared1-global"]))
    logits, memory = _run_turn(model)
    model.save_pretrained(tmp_path)
    for name in ("configuration_rxt.py", "modeling_rxt.py", "cache_rxt.py", "config.json", "model.safetensors"):
        assert (tmp_path / name).is_file(), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, RxTForConversationalGeneration) and not loaded.training
    for module in loaded.modules():
        if isinstance(module, RxTAttention):
            torch.testing.assert_close(module.inv_freq, rope_inv_freq(module.head_dim, module.rope_base))
    logits2, memory2 = _run_turn(loaded)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    torch.testing.assert_close(memory2, memory, rtol=0, atol=0)


def _linear_weights(model):
    return {name: module.weight for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def test_decode_weight_layout_changes_strides_only_and_saves_the_plain_tensor(tmp_path):
    """`set_decode_weight_layout()` keeps every nn.Linear weight in the memory order of its transpose (single-row
    matmuls run faster on CPU): same values, outputs within float rounding, the same saved file; `False` and a
    reload give the contiguous weights transformers' conventions and FSDP expect. A weight tied to the embedding
    keeps its rows."""
    model = _perturb(tiny_model(decoder=MOE["moe-shared1-global"]))
    weights = _linear_weights(model)
    assert len(weights) > 20 and all(w.is_contiguous() for w in weights.values())  # not the default
    logits, memory = _run_turn(model)
    assert model.set_decode_weight_layout() is model
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in _linear_weights(model).values())
    decode_logits, decode_memory = _run_turn(model)
    torch.testing.assert_close(decode_logits, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(decode_memory, memory, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(saved[name + ".weight"], w) for name, w in _linear_weights(model).items())
    loaded = RxTForConversationalGeneration.from_pretrained(tmp_path)
    assert all(w.is_contiguous() for w in _linear_weights(loaded).values())
    torch.testing.assert_close(_run_turn(loaded)[0], logits, rtol=0, atol=0)
    model.set_decode_weight_layout(False)
    assert all(w.is_contiguous() for w in _linear_weights(model).values())
    torch.testing.assert_close(_run_turn(model)[0], logits, rtol=0, atol=0)
    tied = tiny_model(tie_word_embeddings=True).set_decode_weight_layout()
    assert tied.lm_head.weight is tied.embed_tokens.weight and tied.embed_tokens.weight.is_contiguous()


REMOTE_CODE_FILES = {"configuration_rxt.py", "modeling_rxt.py", "cache_rxt.py"}


def test_remote_code_loads_in_a_process_that_never_imports_the_package(tmp_path):
    """A save copies exactly the modules the model needs (no rxlm loader, no interact layer, no tokenizer code);
    from them alone, a fresh interpreter that cannot import transformers_rxt loads the model and gives the
    package class's logits, generated tokens and memory updates."""
    model = _perturb(tiny_model(decoder=ATTENTION["gated"]))
    model.save_pretrained(tmp_path / "model")
    assert {p.name for p in (tmp_path / "model").glob("*.py")} == REMOTE_CODE_FILES
    RxTMemoryAttention(RxTMemoryAttentionConfig(memory_attention_config=model.config.memory_attention_config)
                       ).save_pretrained(tmp_path / "memattn")
    assert {p.name for p in (tmp_path / "memattn").glob("*.py")} == REMOTE_CODE_FILES
    model.save_pretrained(tmp_path / "broken")  # the same, with one weight missing: refused remotely too
    weights = load_file(tmp_path / "broken" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "lm_head.bias"}, tmp_path / "broken" / "model.safetensors",
              metadata={"format": "pt"})
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, stm=stm).logits
    # two turns of greedy generation, each followed by its memory update, from the same starting memory
    prompts = [(torch.tensor([[2, 5, 30, 31, 32, 6], [0, 0, 2, 5, 33, 6]]), torch.tensor([[1] * 6, [0, 0] + [1] * 4])),
               (torch.tensor([[0, 2, 5, 40, 41, 6], [2, 5, 42, 43, 44, 6]]), torch.tensor([[0] + [1] * 5, [1] * 6]))]
    conversation = stm.clone()
    generated = [model.generate(p, attention_mask=m, stm=conversation, max_new_tokens=6, do_sample=False,
                                memory_update="sync") for p, m in prompts]
    torch.save({"ids": ids, "mask": mask, "stm": stm.memory, "logits": logits, "prompts": prompts,
                "generated": generated, "memory": conversation.memory}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["transformers_rxt"] = None  # any import of the package would fail
        try:
            import transformers_rxt
            raise SystemExit("transformers_rxt is importable")
        except ImportError:
            pass
        from transformers import AutoModel, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            out = model(input_ids=ref["ids"], attention_mask=ref["mask"], stm=ref["stm"]).logits
        print("MAXDIFF", (out - ref["logits"]).abs().max().item())
        stm = type(model.init_memory(1))(ref["stm"].clone())  # the remote code's STMCache
        same = [torch.equal(model.generate(p, attention_mask=m, stm=stm, max_new_tokens=6, do_sample=False,
                                           memory_update="sync"), g)
                for (p, m), g in zip(ref["prompts"], ref["generated"])]
        print("SAME_TOKENS", same, "MEMORY_DIFF", (stm.memory - ref["memory"]).abs().max().item())
        memattn = AutoModel.from_pretrained({str(tmp_path / 'memattn')!r}, trust_remote_code=True)
        print("MEMATTN", type(memattn).__name__)
        for call in (lambda: model.interact(ref["prompts"][0][0][:1], stm=stm),
                     lambda: type(model).from_rxlm_pretrained({str(tmp_path)!r})):
            try:
                call()
            except ImportError as error:
                print("NEEDS_PACKAGE", str(error).split(":")[0])
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / 'broken')!r}, trust_remote_code=True)
        except ValueError as error:
            print("REFUSED", str(error).splitlines()[1])
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MAXDIFF 0.0" in result.stdout
    assert "SAME_TOKENS [True, True] MEMORY_DIFF 0.0" in result.stdout
    assert "MEMATTN RxTMemoryAttention" in result.stdout
    assert result.stdout.count("NEEDS_PACKAGE") == 2, result.stdout
    assert "NEEDS_PACKAGE the rxlm-style helpers (interact, batch_interact, init_stm_state, tokenize_query, " \
           "stringify_token) need the transformers-rxt package" in result.stdout
    assert "NEEDS_PACKAGE loading rxlm checkpoints needs the transformers-rxt package" in result.stdout
    assert "REFUSED   missing weights (1): ['lm_head.bias']" in result.stdout


def test_bfloat16_end_to_end():
    model = tiny_model(decoder=MOE["moe-shared1-global"]).to(torch.bfloat16)
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    stm = model.init_memory(2)
    assert stm.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, stm=stm, labels=ids)
        model.update_memory(ids, mask, stm)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert torch.isfinite(stm.memory.float()).all()


def test_loss_includes_weighted_moe_aux_loss_in_training():
    model = tiny_model(decoder=MOE["moe-shared1-global"]).train()
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    out = model(input_ids=ids, attention_mask=mask, stm=model.init_memory(2), labels=ids.masked_fill(mask == 0, -100))
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.router_aux_loss_coef * out.aux_loss)
    out.loss.backward()
    assert model.decoder.layers[0].ff.router.gate.weight.grad is not None


def test_padding_does_not_change_real_token_logits():
    model = tiny_model()
    ids, mask = interaction_batch(batch=2, length=12, vocab=model.config.vocab_size)
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, stm=stm).logits
        single = model(input_ids=ids[1:, :10], stm=stm.select(1)).logits
        left = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :10]], 1)
        left_mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
        left_logits = model(input_ids=left, attention_mask=left_mask, stm=stm.select(1)).logits
    torch.testing.assert_close(batched[1, :10], single[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_logits[0, 2:], single[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,error,message", [
    (dict(decoder=dict(embed_dim=30)), ValueError, "must divide embed_dim"),
    (dict(decoder=dict(att_groups=3, att_query_groups=2)), ValueError, "multiple of the smaller"),
    (dict(decoder=dict(self_att_type="gqa", att_groups=3)), ValueError, "multiple of att_groups"),
    (dict(encoder=dict(num_layers=3)), ValueError, "num_layers must agree"),
    (dict(decoder=dict(use_moe=True, num_experts=2, moe_top_k=3)), ValueError, "moe_top_k"),
    (dict(memory=dict(variant="grouped-self-interlayer", num_groups=3)), ValueError, "divisible by num_groups"),
    (dict(memory=dict(norm_type="batch")), ValueError, "norm_type"),
    (dict(decoder=dict(self_att_type="hybrid")), NotImplementedError, "linear/hybrid"),
    (dict(decoder=dict(flash=True)), ValueError, "unknown option"),
])
def test_config_errors_name_the_problem(kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**kwargs)


def test_stm_errors():
    model = tiny_model()
    ids, mask = interaction_batch(batch=2, vocab=model.config.vocab_size)
    with pytest.raises(ValueError, match="pass stm="):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="slots"):
        model(input_ids=ids, stm=torch.zeros(2, 2, 5, 32))
    with pytest.raises(ValueError, match="STM batch 3 does not match the input batch 2"):
        model(input_ids=ids, stm=model.init_memory(3))
    with pytest.raises(ValueError, match="layer-first"):
        STMCache(torch.zeros(2, 8, 32))
    with pytest.raises(ValueError, match="written row by row"):
        model.update_memory(ids, mask, model.init_memory(1))
    other = STMCache(torch.zeros(2, 2, 8, 32), {"model_type": "rxt", "layers": 2, "slots": 8, "dim": 32, "x": 1})
    with pytest.raises(ValueError, match="another model"):
        model(input_ids=ids, stm=other)


def test_over_long_input_is_refused_not_truncated():
    model = tiny_model()
    too_long = torch.full((1, model.config.decoder_config["seq_len"] + 1), 20)
    with pytest.raises(ValueError, match="at most 48"):
        model(input_ids=too_long, stm=model.init_memory(1))
    with pytest.raises(ValueError, match="at most 48"):
        model.update_memory(too_long, None, model.init_memory(1))


def test_missing_and_unexpected_weights_are_listed(tmp_path):
    model = tiny_model()
    save_rxlm_checkpoint(model, str(tmp_path))
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("decoder.model.layers.1.ff.fc2.bias")
    weights["decoder.model.layers.0.bogus.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing weights \(1\): \['rxt.decoder.layers.1.ff.fc2.bias'\]"
                                         r".*unexpected weights \(1\): \['rxt.decoder.layers.0.bogus.weight'\]"
                                         r".*Fix: config.json and model.safetensors must come from the same rxlm"):
        RxTForConversationalGeneration.from_rxlm_pretrained(str(tmp_path))


HF_LOADERS = {
    "class": lambda path, **kw: RxTForConversationalGeneration.from_pretrained(path, **kw),
    "auto": lambda path, **kw: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw),
    "load_rxt_model": lambda path, **kw: load_rxt_model(path, **kw),
}


@pytest.mark.parametrize("loader", HF_LOADERS)
def test_hf_checkpoint_missing_or_unexpected_weights_are_refused(loader, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("lm_head.weight")
    weights["rxt.decoder.layers.0.bogus.weight"] = torch.zeros(1)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)refusing to load it with randomly initialised weights"
                                         r".*missing weights \(1\): \['lm_head.weight'\]"
                                         r".*unexpected weights \(1\): \['rxt.decoder.layers.0.bogus.weight'\]"
                                         r".*Fix: config.json and the weights must come from the same save_pretrained"):
        HF_LOADERS[loader](str(tmp_path))


def test_hf_checkpoint_mis_shaped_weights_are_refused_unless_reinitialised_on_purpose(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder_config"]["ff_dim"] = 40  # the weights were trained with 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)weights whose shape differs from the config \(6\): "
                                         r"rxt.decoder.layers.0.ff.fc1.linear.bias checkpoint \(96,\) vs model \(80,\)"
                                         r".*pass ignore_mismatched_sizes=True"):
        RxTForConversationalGeneration.from_pretrained(tmp_path)
    model, info = RxTForConversationalGeneration.from_pretrained(tmp_path, ignore_mismatched_sizes=True,
                                                                 output_loading_info=True)
    assert {name for name, *_ in info["mismatched_keys"]} == {
        f"rxt.decoder.layers.{i}.ff.{w}" for i in (0, 1) for w in ("fc1.linear.weight", "fc1.linear.bias", "fc2.weight")}
    assert not info["missing_keys"] and model.decoder.layers[0].ff.fc2.weight.shape == (32, 40)


@pytest.mark.parametrize("component, key", [("decoder_config", "rope_base"), ("encoder_config", "ff_activation"),
                                            ("memory_attention_config", "variant"), (None, "stm_init_type"),
                                            (None, "decoder_config")])
def test_saved_config_missing_an_option_names_it(component, key, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del (config[component] if component else config)[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    name = f"{component}.{key}" if component else key
    for load in HF_LOADERS.values():
        with pytest.raises(ValueError, match=rf"the saved RxTConfig \(config.json\) lacks \['{name}'\]: a default "
                                             "would silently build a different model"):
            load(str(tmp_path))


def test_memory_attention_component_load_is_checked_too(tmp_path):
    component = tiny_model().memory_attention
    component.save_pretrained(tmp_path)
    loaded = RxTMemoryAttention.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), component.state_dict().values()))
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing weights \(1\): \['{dropped}'\]"):
        RxTMemoryAttention.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["memory_attention_config"]["norm_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"RxTMemoryAttentionConfig \(config.json\) lacks "
                                         r"\['memory_attention_config.norm_type'\]"):
        RxTMemoryAttention.from_pretrained(tmp_path)


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
    save_rxlm_checkpoint(tiny_model(), str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        RxTForConversationalGeneration.from_rxlm_pretrained(str(tmp_path))


def test_embeddings_that_disagree_are_refused(tmp_path):
    save_rxlm_checkpoint(tiny_model(), str(tmp_path))
    weights = load_file(tmp_path / "model.safetensors")
    weights["encoder.model.embedding.weight"] = weights["encoder.model.embedding.weight"] + 1
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="embeddings differ"):
        RxTForConversationalGeneration.from_rxlm_pretrained(str(tmp_path))


def test_memory_attention_component_contract():
    model = tiny_model(memory=MEMORY["interlayer"])
    memattn = model.memory_attention
    assert isinstance(memattn, RxTMemoryAttention)
    memory, encoded = torch.randn(2, 2, 8, 32), torch.randn(2, 2, 10, 32)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    new = memattn(stm=memory, encoded=encoded, attention_mask=mask)
    assert new.shape == memory.shape
    # padded tokens of row 1 must not influence its memory
    encoded2 = encoded.clone()
    encoded2[1, :, 7:] = 99.0
    torch.testing.assert_close(memattn(stm=memory, encoded=encoded2, attention_mask=mask), new)


def test_eager_and_sdpa_attention_agree(tmp_path):
    model = _perturb(tiny_model(decoder=ATTENTION["sqa-reverse"]))
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask, stm=stm).logits
        model.set_attn_implementation("eager")
        assert {m.attn_implementation for m in model.modules() if isinstance(m, RxTAttention)} == {"eager"}
        eager = model(input_ids=ids, attention_mask=mask, stm=stm).logits
    torch.testing.assert_close(eager[mask.bool()], sdpa[mask.bool()], rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert {m.attn_implementation for m in loaded.modules() if isinstance(m, RxTAttention)} == {"eager"}
    with pytest.raises(ValueError, match="supports"):
        model.set_attn_implementation("paged")


# ------------------------------------------------------------------------------------ learned initial memory
def test_learned_initial_memory_is_one_trained_state_for_every_conversation(tmp_path):
    model = tiny_model(stm_init_type="learned")
    initial = model.memory_attention.initial_memory
    assert tuple(initial.shape) == (2, 8, 32) and initial.requires_grad
    a = model.init_memory(3, generator=torch.Generator().manual_seed(1))
    b = model.init_memory(1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.memory[0], a.memory[2]) and torch.equal(a.memory[1], b.memory[0])
    assert torch.equal(b.memory[0], initial.detach()) and not a.memory.requires_grad  # a conversation's state
    # training code gets the differentiable version: a loss on it trains the parameter
    model.initial_memory_tensor(2).sum().backward()
    assert torch.equal(initial.grad, torch.full_like(initial, 2.0))
    model.save_pretrained(tmp_path / "m")
    again = RxTForConversationalGeneration.from_pretrained(tmp_path / "m")
    assert again.config.stm_init_type == "learned"
    assert torch.equal(again.memory_attention.initial_memory, initial)


def test_learned_init_is_refused_for_a_model_without_one():
    model = tiny_model()  # stm_init_type="standard": no initial_memory parameter, as in rxlm checkpoints
    assert model.memory_attention.initial_memory is None
    assert "memory_attention.initial_memory" not in model.state_dict()
    with pytest.raises(ValueError, match="init_type='learned' needs a model built with stm_init_type='learned'"):
        model.init_memory(1, init_type="learned")


def test_stage4_trains_the_learned_initial_memory():
    from transformers_rxt.training.memory_aware import MemoryAwareConfig, RxTForMemoryAwareTraining

    model = tiny_model(stm_init_type="learned").train()
    module = RxTForMemoryAwareTraining.from_rxt(model, MemoryAwareConfig(
        output_dir="unused", backprop_turns=0, use_cpu=True, report_to="none"))
    ids, mask = interaction_batch(batch=2, length=12)
    labels = ids.masked_fill(mask == 0, -100)
    episode = dict(input_ids=torch.stack([ids, ids], 1), attention_mask=torch.stack([mask, mask], 1),
                   labels=torch.stack([labels, labels], 1), turn_mask=torch.ones(2, 2, dtype=torch.long))
    module(**episode).loss.backward()
    grad = model.memory_attention.initial_memory.grad
    assert grad is not None and float(grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------- transformers conventions
def test_resize_token_embeddings_keeps_every_config_in_agreement_and_survives_save_load(tmp_path):
    model = _perturb(tiny_model())
    model.resize_token_embeddings(101)
    cfg = model.config
    assert cfg.vocab_size == cfg.decoder_config["vocab_size"] == cfg.encoder_config["vocab_size"] == 101
    assert model.embed_tokens.weight.shape == (101, 32) and model.lm_head.weight.shape == (101, 32)
    assert model.lm_head.bias.shape == (101,)
    logits, memory = _run_turn(model)
    model.save_pretrained(tmp_path)
    loaded = RxTForConversationalGeneration.from_pretrained(tmp_path)  # a mismatch would raise here
    assert loaded.config.decoder_config["vocab_size"] == loaded.config.encoder_config["vocab_size"] == 101
    logits2, memory2 = _run_turn(loaded)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    torch.testing.assert_close(memory2, memory, rtol=0, atol=0)


def test_tied_word_embeddings_share_one_matrix_through_save_load_resize_and_the_reference_format(tmp_path):
    """tie_word_embeddings=True (not the reference's default) makes the LM head read the shared token embedding:
    one matrix, kept through save/load and resizing; the reference format, which has no tying, gets a copy."""
    assert tiny_model().lm_head.weight is not tiny_model().embed_tokens.weight  # the default stays untied
    model = _perturb(tiny_model(tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    logits, memory = _run_turn(model)
    model.save_pretrained(tmp_path / "hf")
    loaded = RxTForConversationalGeneration.from_pretrained(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    torch.testing.assert_close(_run_turn(loaded)[0], logits, rtol=0, atol=0)
    torch.testing.assert_close(_run_turn(loaded)[1], memory, rtol=0, atol=0)
    save_rxlm_checkpoint(model, str(tmp_path / "rxlm"))
    untied = RxTForConversationalGeneration.from_rxlm_pretrained(str(tmp_path / "rxlm"))
    torch.testing.assert_close(_run_turn(untied)[0], logits, rtol=0, atol=1e-5)
    loaded.resize_token_embeddings(101)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight and loaded.embed_tokens.weight.shape == (101, 32)


def test_hidden_states_are_a_tuple_per_layer_and_return_dict_false_gives_a_tuple():
    model = tiny_model(decoder=ATTENTION["stateless"] | {"use_head_norm": True})
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    stm = model.init_memory(2)
    captured = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
             for layer, _ in model.decoder.ordered_layers()]
    out = model(input_ids=ids, attention_mask=mask, stm=stm, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    hidden = out.hidden_states
    assert isinstance(hidden, tuple) and len(hidden) == model.config.num_hidden_layers + 1 == 6
    torch.testing.assert_close(hidden[0], model.embed_tokens(ids), rtol=0, atol=0)
    for i in range(1, 5):
        torch.testing.assert_close(hidden[i], captured[i - 1], rtol=0, atol=0)
    # the last entry is the head-normed output the LM head reads (transformers' convention)
    torch.testing.assert_close(hidden[-1], model.decoder.head_norm(captured[-1]), rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head(hidden[-1]), out.logits, rtol=0, atol=0)
    assert model(input_ids=ids, attention_mask=mask, stm=stm).hidden_states is None

    model.config.output_hidden_states = True
    assert len(model(input_ids=ids, attention_mask=mask, stm=stm).hidden_states) == 6
    model.config.output_hidden_states = False

    loss, logits = model(input_ids=ids, attention_mask=mask, stm=stm, labels=ids, return_dict=False)[:2]
    reference = model(input_ids=ids, attention_mask=mask, stm=stm, labels=ids)
    assert torch.equal(loss, reference.loss) and torch.equal(logits, reference.logits)
    model.config.return_dict = False
    assert isinstance(model(input_ids=ids, attention_mask=mask, stm=stm), tuple)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = _perturb(tiny_model(decoder=MOE["moe-shared1-global"]))
    assert model.supports_gradient_checkpointing
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 4  # 2 decoder + 2 encoder layers
    ids, mask = interaction_batch(vocab=model.config.vocab_size)

    def loss_and_grads():
        model.zero_grad()
        model.train()
        memory = model.compute_memory_update(ids, mask, model.initial_memory_tensor(2, "zeros"))
        loss = model(input_ids=ids, attention_mask=mask, stm=memory, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    hook = model.decoder.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    loss, grads = loss_and_grads()
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in layers)
    calls.clear()
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == 1  # hooks stay outside the checkpoint ...
    hook.remove()
    recomputed = []
    model.decoder.layers[0].attention.register_forward_pre_hook(lambda *args: recomputed.append(1))
    loss_and_grads()
    assert len(recomputed) == 2  # ... while the layer's insides run again in the backward pass
    assert torch.equal(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_refuses_an_fp32_memory_before_decoding(dtype):
    model = tiny_model().to(dtype)
    ids = torch.tensor([[2, 5, 30, 31, 6]])
    fp32 = STMCache(torch.randn(1, 2, 8, 32))
    decoded = []
    model.decoder.layers[0].register_forward_pre_hook(lambda *args: decoded.append(1))
    message = f"the STM is torch.float32 .* model (is|computes in) {dtype}.*stm.to\\(device=model.device, dtype=model.dtype\\)"
    for call in (lambda: model(input_ids=ids, stm=fp32),
                 lambda: model.generate(ids, stm=fp32, max_new_tokens=3, memory_update="sync"),
                 lambda: model.generate(ids, stm=fp32, max_new_tokens=3, memory_update="none"),
                 lambda: model.update_memory(torch.tensor([[2, 5, 30, 6, 40, 3]]), stm=fp32)):
        with pytest.raises(ValueError, match=message):
            call()
    assert decoded == [] and fp32.memory.dtype == torch.float32
    good = fp32.to(dtype=dtype)  # the documented fix
    model.generate(ids, stm=good, max_new_tokens=3, memory_update="sync")
    assert decoded and good.memory.dtype == dtype and torch.isfinite(good.memory.float()).all()


# ------------------------------------------------------------------------------------------- base model / Auto classes
OLD_CHECKPOINT = os.path.join(os.path.dirname(__file__), "fixtures", "rxt-main-5f01f82")


def test_a_checkpoint_saved_before_the_base_model_existed_loads_with_identical_numbers(tmp_path):
    """tests/fixtures/rxt-main-5f01f82: saved by the code of commit 5f01f82 (flat keys, LM head `decoder.head.*`)."""
    old_keys = load_file(os.path.join(OLD_CHECKPOINT, "model.safetensors"))
    assert "decoder.head.weight" in old_keys and "embed_tokens.weight" in old_keys
    expected = load_file(os.path.join(OLD_CHECKPOINT, "expected.safetensors"))
    ids, mask = expected["input_ids"], expected["attention_mask"]

    def outputs(model):
        stm = STMCache(expected["stm"].clone())
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, stm=stm).logits
            model.update_memory(ids, mask, stm)
        return logits, stm.memory

    model = AutoModelForCausalLM.from_pretrained(OLD_CHECKPOINT)
    assert type(model) is RxTForConversationalGeneration
    # every stored tensor is loaded bit for bit under today's name, and nothing else is in the model
    state = model.state_dict()
    renamed = {("lm_head." + k[len("decoder.head."):]) if k.startswith("decoder.head.") else "rxt." + k: v
               for k, v in old_keys.items()}
    assert set(renamed) == set(state)
    for name, value in renamed.items():
        assert torch.equal(state[name], value), name
    logits, new_stm = outputs(model)
    # The numbers 5f01f82's code computed on the machine that saved the fixture: another CPU's matmul kernels
    # may sum in another order (6e-8 on an AVX-512 box), so across machines they agree to float32 rounding.
    torch.testing.assert_close(logits, expected["logits"])
    torch.testing.assert_close(new_stm, expected["new_stm"])

    def check(other):  # on this machine: the same numbers to the bit
        other_logits, other_stm = outputs(other)
        torch.testing.assert_close(other_logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(other_stm, new_stm, rtol=0, atol=0)

    # re-saved under today's names, and loaded again
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"lm_head.weight", "lm_head.bias", "rxt.embed_tokens.weight"} <= keys
    assert all(k.startswith(("rxt.", "lm_head.")) for k in keys)
    check(RxTForConversationalGeneration.from_pretrained(tmp_path))
    # the base model loads from either, without the head
    for path in (OLD_CHECKPOINT, tmp_path):
        base = AutoModel.from_pretrained(path)
        assert type(base) is RxTModel and not hasattr(base, "lm_head")
        with torch.no_grad():
            hidden = base(input_ids=ids, attention_mask=mask, stm=STMCache(expected["stm"].clone())).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), logits, rtol=0, atol=0)


def test_base_model_is_the_decoder_encoder_and_memory_attention_without_the_lm_head(tmp_path):
    model = _perturb(tiny_model(decoder=ATTENTION["stateless"]))
    assert model.base_model_prefix == "rxt" and model.base_model is model.rxt
    assert isinstance(model.rxt, RxTModel) and model.rxt.get_output_embeddings() is None
    assert (model.embed_tokens, model.decoder, model.encoder, model.memory_attention) == (
        model.rxt.embed_tokens, model.rxt.decoder, model.rxt.encoder, model.rxt.memory_attention)
    assert sum(p.numel() for p in model.parameters()) == (sum(p.numel() for p in model.rxt.parameters())
                                                         + sum(p.numel() for p in model.lm_head.parameters()))
    assert type(AutoModel.from_config(model.config)) is RxTModel
    assert type(AutoModelForCausalLM.from_config(model.config)) is RxTForConversationalGeneration
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, stm=stm, output_hidden_states=True)
        base_out = base(input_ids=ids, attention_mask=mask, stm=stm, output_hidden_states=True)
        # the base model keeps the memory methods: same update as the LM model
        other = STMCache(stm.memory.clone())
        base.update_memory(ids, mask, other)
        model.update_memory(ids, mask, stm)
    torch.testing.assert_close(base_out.last_hidden_state, out.hidden_states[-1], rtol=0, atol=0)
    assert len(base_out.hidden_states) == len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(other.memory, stm.memory, rtol=0, atol=0)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_rxt.RxTModel"


def test_memory_cross_attention_without_rope_reads_the_memory_by_content_alone(tmp_path):
    ids, mask = interaction_batch(batch=2, length=12, vocab=96, seed=3, pad_rows=False)
    positions = torch.arange(12).expand(2, -1)

    def shifted_logits(model):
        stm = model.init_memory(2, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return [model(input_ids=ids, attention_mask=mask, stm=stm, position_ids=positions + shift).logits
                    for shift in (0, 7)]

    # self-attention RoPE is relative, so only the memory read can depend on where the sequence starts
    reference = _perturb(tiny_model())
    at_0, at_7 = shifted_logits(reference)
    assert not torch.allclose(at_0, at_7, atol=1e-4)
    content = _perturb(tiny_model(decoder=dict(rope_memory_cross_attention=False)))
    at_0, at_7 = shifted_logits(content)
    torch.testing.assert_close(at_0, at_7, atol=1e-5, rtol=1e-5)
    content.save_pretrained(tmp_path / "hf")
    reloaded = RxTForConversationalGeneration.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(shifted_logits(reloaded)[1], at_7, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rope_memory_cross_attention=False.*save_pretrained instead"):
        save_rxlm_checkpoint(content, str(tmp_path / "rxlm"))
