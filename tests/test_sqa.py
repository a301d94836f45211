"""Sparse Query Attention for stock decoder-only models (transformers_rxt.sqa)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from transformers_rxt.sqa import (
    SQA_VARIANTS,
    SQAAttention,
    convert_to_sqa,
    register_sqa_attention,
    sqa_attention_forward,
    sqa_config,
    sqa_head_counts,
    theoretical_speedup,
)


register_sqa_attention()

VOCAB = 97
CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def tiny_config(arch: str = "llama", heads: int = 8, kv_heads: int = 2, **kwargs):
    extra = {"hidden_size": 64}
    if arch == "mistral":
        extra["sliding_window"] = 4  # shorter than the test sequences, so the window matters
    if arch == "qwen2":
        extra.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)  # layer 1 slides
    extra.update(kwargs)
    return CONFIG_CLASSES[arch](
        vocab_size=VOCAB,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def build(config, attn_implementation: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def twin(model, attn_implementation: str):
    """Same weights, other attention implementation."""
    other = AutoModelForCausalLM.from_config(model.config, attn_implementation=attn_implementation)
    other.load_state_dict(model.state_dict())
    return other.eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


# -------------------------------------------------------------------------------------------------
# registration


def test_registered_in_both_interfaces():
    register_sqa_attention()  # idempotent
    assert ALL_ATTENTION_FUNCTIONS["sqa"] is sqa_attention_forward
    # Without the mask entry transformers builds no mask and padding is silently ignored.
    assert "sqa" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


# -------------------------------------------------------------------------------------------------
# equivalence


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_full_heads_equals_sdpa(arch, kv_heads):
    """With H_q = H (MHA or GQA) "sqa" is numerically the stock SDPA path, sliding windows included."""
    model = build(tiny_config(arch, kv_heads=kv_heads), "sqa")
    ref = twin(model, "sdpa")
    x = ids(2, 11)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in row 1
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(model(x, **kw).logits, ref(x, **kw).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("variant", SQA_VARIANTS)
def test_sqa_geometry_matches_stock_kernels(arch, variant):
    cfg = sqa_config(tiny_config(arch), variant)
    model = build(cfg, "sqa")
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        out = model(x, attention_mask=mask).logits
        real = mask.bool()  # fully masked (padding) query rows are kernel-specific garbage
        for impl in ("sdpa", "eager"):
            ref = twin(model, impl)(x, attention_mask=mask).logits
            torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_equals_unpadded(side):
    cfg = sqa_config(tiny_config("mistral"), "sqa")
    model = build(cfg, "sqa")
    long, short = ids(1, 9, seed=2), ids(1, 5, seed=3)
    pad = torch.zeros(1, 4, dtype=torch.long)
    if side == "left":
        batch = torch.cat([long, torch.cat([pad, short], 1)])
        mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    else:
        batch = torch.cat([long, torch.cat([short, pad], 1)])
        mask = torch.cat([torch.ones(1, 9), torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], 1)]).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, position_ids=position_ids).logits
        alone_long = model(long).logits
        alone_short = model(short).logits
    torch.testing.assert_close(padded[0], alone_long[0], atol=1e-5, rtol=1e-5)
    real = mask[1].bool()
    torch.testing.assert_close(padded[1][real], alone_short[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_cached_generation_equals_uncached(arch):
    cfg = sqa_config(tiny_config(arch), "sqa")
    model = build(cfg, "sqa")
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    x[1, :2] = 0
    gen = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(x, use_cache=True, **gen)
        uncached = model.generate(x, use_cache=False, **gen)
        stock = twin(model, "sdpa").generate(x, use_cache=True, **gen)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, stock)


def test_decode_step_logits_match_full_forward():
    """The single-token (packed grouped heads) path gives the same logits as the full forward."""
    cfg = sqa_config(tiny_config("llama"), "sqa")  # 4 query heads per 2 K/V heads -> grouped decode
    model = build(cfg, "sqa")
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(x, attention_mask=mask, position_ids=pos).logits[:, -1]
        pre = model(x[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True)
        step = model(
            x[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], past_key_values=pre.past_key_values
        ).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- save /
# load


def test_save_load_round_trip(tmp_path):
    cfg = sqa_config(tiny_config("qwen2"), "xsqa")
    model = build(cfg, "sqa")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sqa").eval()
    assert loaded.config._attn_implementation == "sqa"
    assert loaded.config.sqa_variant == "xsqa"
    assert loaded.config.sqa_nominal_heads == 8
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads, loaded.config.head_dim) == (
        2,
        2,
        8,
    )
    x = ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    # The geometry is stock: the same checkpoint loads with plain SDPA too.
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_from_config_with_attn_implementation():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sqa")
    assert model.config._attn_implementation == "sqa"
    # sqa_config stores the implementation itself.
    model = AutoModelForCausalLM.from_config(sqa_config(tiny_config("llama"), "ssqa"))
    assert model.config._attn_implementation == "sqa"


# ------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("variant,expected", [("sqa", (8, 4)), ("ssqa", (8, 8)), ("xsqa", (4, 4))])
def test_sqa_config_geometry(arch, variant, expected):
    base = tiny_config(arch, heads=16, kv_heads=4, hidden_size=256)
    cfg = sqa_config(base, variant)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == expected
    assert cfg.head_dim == 16  # hidden / H, not hidden / H_q
    assert cfg.sqa_variant == variant and cfg.sqa_nominal_heads == 16
    assert cfg._attn_implementation == "sqa"
    assert theoretical_speedup(cfg) == 16 / expected[0]
    assert base.num_attention_heads == 16 and not hasattr(base, "sqa_variant")  # a copy
    if arch == "mistral":
        assert cfg.sliding_window == 4
    attn = AutoModelForCausalLM.from_config(cfg).model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (expected[0] * 16, 256)
    assert attn.k_proj.weight.shape == (expected[1] * 16, 256)
    assert attn.o_proj.weight.shape == (256, expected[0] * 16)
    # Re-applying to an SQA config starts from the nominal H again.
    assert sqa_config(cfg, "xsqa").num_attention_heads == 4


def test_sqa_config_overrides_and_errors():
    base = tiny_config("llama")
    assert sqa_head_counts(8, "xsqa", num_key_value_heads=1) == (2, 1)  # xSMQA
    cfg = sqa_config(base, "sqa", num_query_heads=4, num_key_value_heads=1)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 1)
    with pytest.raises(ValueError, match="Unknown SQA variant"):
        sqa_config(base, "gqa")
    with pytest.raises(ValueError, match="reverse SQA"):
        sqa_config(base, "sqa", num_query_heads=2, num_key_value_heads=4)
    with pytest.raises(ValueError, match="not a multiple"):
        sqa_config(base, "sqa", num_query_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rejects the SQA geometry"):
        sqa_config(base, "sqa", num_query_heads=6, num_key_value_heads=2)  # 64 % 6 != 0 (LlamaConfig check)
    with pytest.raises(ValueError, match="does not divide"):
        sqa_config(tiny_config("llama", heads=2, kv_heads=2, hidden_size=64), "xsqa")
    with pytest.raises(ValueError, match="at most"):
        sqa_config(base, "sqa", num_query_heads=16, num_key_value_heads=2)


# ------------------------------------------------------------------------------------------------- reverse
# SQA


def _reference_attention(q, k, v, causal=True):
    """Plain softmax attention, queries tiled to the K/V heads, outputs averaged back per query head."""
    h_q, h_kv = q.shape[1], k.shape[1]
    tiles = h_kv // h_q
    qt = q.repeat(1, tiles, 1, 1)
    scores = qt @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        t = q.shape[2]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    out = scores.softmax(-1) @ v  # [B, H_kv, T, D]
    b, _, t, d = out.shape
    return out.reshape(b, tiles, h_q, t, d).mean(1).transpose(1, 2)


def test_reverse_sqa_kernel_and_model():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = sqa_attention_forward(module, q, k, v, None, scaling=8**-0.5)
    assert out.shape == (2, 5, 2, 8)
    torch.testing.assert_close(out, _reference_attention(q, k, v), atol=1e-5, rtol=1e-5)

    cfg = sqa_config(
        tiny_config("llama"), "sqa", num_query_heads=2, num_key_value_heads=4, allow_reverse=True
    )
    model = build(cfg, "sqa")
    x = ids(2, 6)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            model.generate(x, use_cache=True, **gen), model.generate(x, use_cache=False, **gen)
        )
    with pytest.raises(ValueError, match="only with attn_implementation='sqa'"):
        sqa_config(tiny_config("llama"), "sqa", 2, 4, attn_implementation="sdpa", allow_reverse=True)


# ------------------------------------------------------------------------------------------------- conversion


def test_convert_identity_and_kv_duplication_are_exact():
    model = build(tiny_config("qwen2", use_sliding_window=False), "sdpa")
    x = ids(2, 8)
    with torch.no_grad():
        ref = model(x).logits
    old_config = model.config
    # H_q = H and H_kv doubled (2 -> 4 by duplication): the function is unchanged.
    convert_to_sqa(model, "sqa", num_query_heads=8, num_key_value_heads=4)
    assert (
        old_config.num_key_value_heads == 2 and model.config is not old_config
    )  # no shared-config surprises
    assert model.model.layers[0].self_attn.config is model.config
    assert model.config._attn_implementation == "sqa"
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (32, 64) and attn.k_proj.bias.shape == (32,)
    assert attn.num_key_value_groups == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["select", "pool"])
@pytest.mark.parametrize("variant", SQA_VARIANTS)
def test_convert_shapes_and_round_trip(tmp_path, method, variant):
    model = build(tiny_config("llama", kv_heads=8), "sdpa")  # MHA source
    convert_to_sqa(model, variant, method=method)
    h_q, h_kv = sqa_head_counts(8, variant)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.sqa_variant) == (
        h_q,
        h_kv,
        8,
        variant,
    )
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (h_q * 8, 64) and attn.o_proj.weight.shape == (64, h_q * 8)
    x = ids(2, 8)
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sqa").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, out)


def test_convert_select_keeps_heads():
    model = build(tiny_config("llama", kv_heads=8), "sdpa")
    attn = model.model.layers[0].self_attn
    q_old, o_old = attn.q_proj.weight.clone(), attn.o_proj.weight.clone()
    convert_to_sqa(model, "ssqa", method="select")  # 8 -> 4 query heads: blocks {0,1},{2,3},... keep 0,2,4,6
    attn = model.model.layers[0].self_attn
    q_new, o_new = attn.q_proj.weight, attn.o_proj.weight
    for i, j in enumerate([0, 2, 4, 6]):
        torch.testing.assert_close(q_new[i * 8 : (i + 1) * 8], q_old[j * 8 : (j + 1) * 8])
        torch.testing.assert_close(o_new[:, i * 8 : (i + 1) * 8], o_old[:, j * 8 : (j + 1) * 8])


def test_convert_errors():
    model = build(tiny_config("llama", kv_heads=8), "sdpa")
    with pytest.raises(ValueError, match="method"):
        convert_to_sqa(model, method="average")
    with pytest.raises(ValueError, match="reverse SQA"):
        convert_to_sqa(model, num_query_heads=2, num_key_value_heads=4)


# ------------------------------------------------------------------------------------------------- ecosystem


def test_bf16_matches_sdpa():
    model = build(sqa_config(tiny_config("llama"), "sqa"), "sqa").to(torch.bfloat16)
    ref = twin(model, "sdpa").to(torch.bfloat16)
    x = ids(2, 8)
    with torch.no_grad():
        out = model(x).logits
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(out.float(), ref(x).logits.float(), atol=2e-2, rtol=2e-2)


def test_peft_lora_trains():
    peft = pytest.importorskip("peft")
    model = build(sqa_config(tiny_config("llama"), "xsqa"), "sqa").train()
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")
    )
    x = ids(2, 8)
    loss = lora(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_trainer_runs(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tiny(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x = ids(1, 12, seed=i)[0]
            return {"input_ids": x, "labels": x}

    model = build(sqa_config(tiny_config("mistral"), "sqa"), "sqa")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tiny())
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_torch_compile_traces_without_graph_breaks():
    """fullgraph tracing through the "sqa" kernel (aot_eager: no C++ build, so it stays fast on CPU)."""
    model = build(sqa_config(tiny_config("llama"), "sqa"), "sqa")
    x = ids(2, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- SQAAttention


def swap_in_sqa_attention(model):
    """Every decoder layer's stock attention module replaced by an SQAAttention holding its weights."""
    for layer in model.model.layers:
        layer.self_attn = SQAAttention.from_attention(layer.self_attn)
    return model


def padded_batch():
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in row 1
    return x, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("variant", ["sqa", "xsqa", "reverse"])
def test_sqa_attention_module_equals_convert_to_sqa(arch, variant):
    """convert_to_sqa + attn_implementation="sqa" on stock modules == SQAAttention swapped into the model."""
    import copy

    base = build(tiny_config(arch, kv_heads=8, attention_bias=True) if arch == "llama" else tiny_config(arch, kv_heads=8),
                 "sdpa")
    if variant == "reverse":  # H_q=2 < H_kv=4: only the "sqa" kernel runs it
        stock = build(sqa_config(base.config, "sqa", 2, 4, allow_reverse=True), "sqa", seed=3)
    else:
        stock = convert_to_sqa(copy.deepcopy(base), variant)
    swapped = swap_in_sqa_attention(copy.deepcopy(stock))
    attn = swapped.model.layers[1].self_attn
    assert isinstance(attn, SQAAttention) and attn.num_heads == stock.config.num_attention_heads
    assert attn.num_key_value_heads == stock.config.num_key_value_heads
    assert (attn.q_proj.bias is not None) == (arch != "mistral") and (attn.o_proj.bias is not None) == (arch == "llama")
    if arch == "qwen2":
        assert [m.self_attn.sliding_window for m in swapped.model.layers] == [None, 4]
    x, mask = padded_batch()
    with torch.no_grad():
        want = stock(x, attention_mask=mask).logits
        got = swapped(x, attention_mask=mask).logits
        assert torch.equal(got, want)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(swapped.generate(x, attention_mask=mask, **gen), stock.generate(x, attention_mask=mask, **gen))


def test_sqa_attention_trains_and_generates_with_cache():
    cfg = sqa_config(tiny_config("llama"), "sqa")
    model = swap_in_sqa_attention(build(cfg, "sqa")).train()
    x = ids(2, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(x, use_cache=True, **gen), model.generate(x, use_cache=False, **gen))


def test_sqa_attention_errors():
    model = build(tiny_config("llama"), "sdpa")
    with pytest.raises(ValueError, match="no q_proj/k_proj/v_proj/o_proj"):
        SQAAttention.from_attention(model.model.layers[0].mlp)
    attn = SQAAttention(model.config, 0)
    hidden = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="needs the 4-D mask"):
        attn(hidden, attention_mask=torch.ones(1, 3))
    bad = sqa_config(tiny_config("llama"), "sqa")  # 4 query heads, 2 K/V heads
    with pytest.raises(RuntimeError, match="size mismatch for q_proj.weight"):
        SQAAttention.from_attention(model.model.layers[0].self_attn, bad)
