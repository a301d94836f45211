"""PEFT LoRA on RxT: anchored targets, adapter-only training with a fixed STM, save/reload/merge parity."""

import copy
import json
import re

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from transformers_rxt import RxTForConversationalGeneration  # noqa: E402
from transformers_rxt.hub import rxt_lora_target_modules, rxt_lora_target_parameters  # noqa: E402

from rxt_factories import interaction_batch, tiny_model  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")
STATELESS = dict(stateless_layers_config=["dense"], final_stateless_layers_config=["moe"], dense_layer_dim=40,
                 use_moe=True, num_experts=4, moe_top_k=2)


def adapted_modules(model) -> set:
    return {name.split(".lora_")[0].removeprefix("base_model.model.")
            for name, _ in model.named_parameters() if ".lora_" in name}


def test_default_targets_are_decoder_attention_only():
    model = tiny_model(decoder=STATELESS)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=rxt_lora_target_modules()))
    expected = {f"rxt.decoder.{block}.{i}.{att}.{p}" for block, n in (("layers", 2),) for i in range(n)
                for att in ("attention", "memory_cross_attention") for p in PROJ}
    expected |= {f"rxt.decoder.{block}.0.attention.{p}" for block in ("stateless_layers", "final_stateless_layers")
                 for p in PROJ}
    assert adapted_modules(pm) == expected
    # the suffix-style list PEFT users reach for first would also hit the encoder and the memory attention
    loose = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    assert any(m.startswith(("rxt.encoder.", "rxt.memory_attention.")) for m in adapted_modules(loose))
    # only adapter weights train
    assert all(".lora_" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_other_presets_hit_exactly_their_part():
    gated = tiny_model(decoder=STATELESS)
    plain = tiny_model(decoder=dict(use_gated=False, ff_activation="gelu"), encoder=dict(use_gated=False))
    mem = adapted_modules(get_peft_model(copy.deepcopy(gated), LoraConfig(
        r=2, target_modules=rxt_lora_target_modules(["memory_attention"]))))
    assert mem and all(re.fullmatch(r"rxt\.memory_attention\.(attention_layers|mean_attention_layers)\.\d\.\w+_proj", m)
                       for m in mem) and len(mem) == 2 * 2 * 4
    enc = adapted_modules(get_peft_model(copy.deepcopy(plain), LoraConfig(
        r=2, target_modules=rxt_lora_target_modules(["encoder_attention", "encoder_ffn"], config=plain.config))))
    assert enc == {f"rxt.encoder.layers.{i}.{m}" for i in range(2)
                   for m in [f"attention.{p}" for p in PROJ] + ["ff.fc1", "ff.fc2"]}
    ffn = adapted_modules(get_peft_model(copy.deepcopy(gated), LoraConfig(
        r=2, target_modules=rxt_lora_target_modules(["decoder_ffn"], config=gated.config))))
    # dense stateless layer + the single shared expert of every MoE layer; never the router
    assert "rxt.decoder.stateless_layers.0.ff.fc1.linear" in ffn and "rxt.decoder.layers.1.ff.shared_expert.fc2" in ffn
    assert not any("router" in m for m in ffn) and all(m.startswith("rxt.decoder.") for m in ffn)
    with pytest.raises(ValueError, match="needs config"):
        rxt_lora_target_modules(["decoder_ffn"])
    with pytest.raises(ValueError, match="unknown LoRA part"):
        rxt_lora_target_modules(["decoder_mlp"])


def test_lora_trains_only_adapters_then_saves_reloads_and_merges(tmp_path):
    base = tiny_model(seed=3)
    pristine = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=rxt_lora_target_modules()))
    ids, mask = interaction_batch(vocab=base.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    stm = base.init_memory(2, generator=torch.Generator().manual_seed(0))
    memory = stm.memory.clone()
    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(3):
        pm(input_ids=ids, attention_mask=mask, stm=stm, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    assert torch.equal(stm.memory, memory)  # the STM stayed fixed
    for name, p in pm.base_model.model.named_parameters():
        if ".lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, before[key]), f"base weight {key} changed"
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before)  # every adapter matrix moved (A from step 2 on, once B != 0)

    with torch.no_grad():
        trained = pm(input_ids=ids, attention_mask=mask, stm=stm).logits
        with pm.disable_adapter():
            assert not torch.allclose(pm(input_ids=ids, attention_mask=mask, stm=stm).logits, trained)
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == rxt_lora_target_modules()

    reloaded = PeftModel.from_pretrained(pristine, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask, stm=stm).logits, trained)
    merged = reloaded.merge_and_unload()
    assert type(merged) is RxTForConversationalGeneration
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=mask, stm=stm).logits
    torch.testing.assert_close(merged_logits, trained, rtol=0, atol=1e-5)
    # the encoder and memory attention are bit-identical to the base after the merge
    for name, p in merged.named_parameters():
        if name.startswith(("rxt.encoder.", "rxt.memory_attention.", "rxt.embed_tokens.")):
            assert torch.equal(p, before[name])

    merged.save_pretrained(tmp_path / "merged")
    again = RxTForConversationalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask, stm=stm).logits, merged_logits)


def test_moe_experts_via_target_parameters_merge():
    model = tiny_model(decoder=dict(use_moe=True, num_experts=4, moe_top_k=2))
    names = rxt_lora_target_parameters(model)
    assert names == [f"rxt.decoder.layers.{i}.ff.{w}" for i in range(2) for w in ("w1", "w2")]
    assert rxt_lora_target_parameters(model, "encoder") == []
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=names,
                                          init_lora_weights=False))
    ids, mask = interaction_batch(vocab=model.config.vocab_size)
    stm = model.init_memory(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = pm(input_ids=ids, attention_mask=mask, stm=stm).logits
        with pm.disable_adapter():
            assert not torch.allclose(pm(input_ids=ids, attention_mask=mask, stm=stm).logits, adapted)
        merged = pm.merge_and_unload()(input_ids=ids, attention_mask=mask, stm=stm).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
