"""rxlm checkpoint <-> HF model directory.

* `load_rxlm_model(cls, path)` / `load_rxlm_memory_attention(cls, path)`: an rxlm RxTAlpha/RxTBeta checkpoint (or
  a memory-attention component repo) as our model, with identical numbers. `from_rxlm_pretrained` of the model
  classes calls these; the modeling file imports this module only then, so a saved model's code does not need it.
* `convert_rxlm_checkpoint(src, dst)`: an rxlm RxTAlpha/RxTBeta directory (or Hub repo) -> an HF directory
  (weights, config with `auto_map`, the modeling code, tokenizer) that loads with
  `AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)` without this package installed.
* `save_rxlm_checkpoint(model, dst)`: the opposite direction, in the reference's layout (nested configs,
  `decoder.model.*` keys, RoPE/STM buffers). Used to hand models back to rxlm users and to test the loader
  on every configuration, not only on the published fixtures.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils import logging

from ..configuration_rxt import RxTComponentConfig, RxTConfig, RxTMemoryAttentionConfig, RxTMemoryAttentionOptions
from ..modeling_rxt import (
    RxTForConversationalGeneration,
    RxTMemoryAttention,
    flat_rxt_key,
    model_rxt_key,
    raise_on_unaccounted_weights,
    rope_inv_freq,
)

logger = logging.get_logger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ============================================================================================= loading


def load_rxlm_model(path: str, cls: type = RxTForConversationalGeneration, *,
                    torch_dtype: Optional[torch.dtype] = None, **hub_kwargs) -> RxTForConversationalGeneration:
    """A reference (rxlm 0.3.80) RxTAlpha/RxTBeta checkpoint as `cls` (`RxTForConversationalGeneration`), in eval
    mode; see `RxTForConversationalGeneration.from_rxlm_pretrained`."""
    raw_config, weights = _rxlm_load_files(path, **hub_kwargs)
    config = rxlm_config_to_rxt(raw_config, weights)
    model = cls(config)
    _load_exact(model, {model_rxt_key(k): v for k, v in _rxlm_map_full_model(weights, config).items()},
                source=path)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()


def load_rxlm_memory_attention(path: str, cls: type = RxTMemoryAttention, variant: Optional[str] = None,
                               **hub_kwargs) -> RxTMemoryAttention:
    """A reference memory-attention component repo (config.json + model.safetensors, keys `model.*`) as `cls`
    (`RxTMemoryAttention`), in eval mode; `variant` is inferred from the weights when None."""
    raw_config, weights = _rxlm_load_files(path, **hub_kwargs)
    weights = {k[len("model."):] if k.startswith("model.") else k: v for k, v in weights.items()}
    options = _rxlm_memory_attention_config(raw_config, weights, variant, prefix="")
    model = cls(RxTMemoryAttentionConfig(memory_attention_config=options))
    _load_exact(model, _rxlm_map_memory_attention(weights, ""), source=path)
    return model.eval()


_RXLM_COMPONENT_ONLY = {  # reference fields with no effect on softmax-attention checkpoints
    "linear_attn_mode", "linear_attn_expand_k", "linear_attn_expand_v", "linear_attn_use_short_conv",
    "linear_attn_conv_size", "linear_attn_use_gate", "linear_attn_norm_eps", "linear_attn_heads",
    "moe_use_cutlass_grouped_gemm", "is_causal", "use_post_norm",
}


def _rxlm_load_files(path: str, **hub_kwargs) -> tuple[dict, dict]:
    """config.json and the state dict of a reference checkpoint (local directory or Hub repo)."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        weights_file = os.path.join(path, "model.safetensors")
        if not os.path.isfile(weights_file) and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            weights_file = os.path.join(path, "pytorch_model.bin")
    else:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(path, "config.json", **hub_kwargs)
        weights_file = hf_hub_download(path, "model.safetensors", **hub_kwargs)
    for f in (config_file, weights_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: missing {os.path.basename(f)}; an rxlm checkpoint has config.json and "
                                    "model.safetensors (from the reference's save_pretrained/push_to_hub)")
    try:
        with open(config_file) as fh:
            raw_config = json.load(fh)
        weights = (load_file(weights_file) if weights_file.endswith(".safetensors")
                   else torch.load(weights_file, map_location="cpu", weights_only=True))
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read the checkpoint ({error}); the file is corrupt or not an rxlm "
                         "checkpoint") from error
    # `rxlm.compile` wraps FFNs; its `_orig_mod.` segment is not part of the weight's identity.
    weights = {k.replace("._orig_mod", ""): v for k, v in weights.items()}
    return raw_config, weights


def _component_options(raw: dict, cls_fields: set, where: str) -> dict:
    options = {}
    for key, value in (raw or {}).items():
        if key in cls_fields:
            options[key] = value
        elif key not in _RXLM_COMPONENT_ONLY:
            logger.warning(f"rxlm {where}: ignoring unknown option {key}={value!r}")
    return options


def _infer_memory_variant(weights: dict, prefix: str, declared: Optional[str], gated: bool, full_model: bool) -> str:
    """The variant the weights really hold.

    rxlm 0.3.80's RxTAlpha builds self-interlayer for every variant name except 'grouped-self-interlayer'.
    With gated residuals the weights tell (self-interlayer has `interlayer_gate_layers`); with plain-sum gates
    those layers have no parameters, so a full model follows the reference's build rule and a stand-alone
    component follows its declared name (defaulting to the interlayer class).
    """
    has = lambda part: any(k.startswith(prefix + part) for k in weights)  # noqa: E731
    grouped = declared == "grouped-self-interlayer"
    if has("self_attention_layers."):
        return "self"
    if not has("mean_attention_layers."):
        return "simple"
    if has("interlayer_gate_layers."):
        return "grouped-self-interlayer" if grouped else "self-interlayer"
    if gated:  # gates have weights, and no interlayer gate was saved: a genuine interlayer model
        return "interlayer"
    if full_model:
        return "grouped-self-interlayer" if grouped else "self-interlayer"
    if declared in ("self-interlayer", "grouped-self-interlayer"):
        return declared
    logger.warning("memory attention with ungated residuals: interlayer and self-interlayer weights look the "
                   "same; loading as 'interlayer' (pass variant= to choose)")
    return "interlayer"


def _rxlm_memory_attention_config(raw: dict, weights: dict, variant: Optional[str], prefix: str) -> dict:
    fields = {f.name for f in dataclasses.fields(RxTMemoryAttentionOptions)}
    options = _component_options(raw, fields, "memory_attention_config")
    declared = raw.get("variant") or ("grouped-self-interlayer" if "num_groups" in raw else None)
    options["variant"] = variant or _infer_memory_variant(weights, prefix, declared,
                                                          bool(raw.get("use_gated_residual")), full_model=False)
    return options


def rxlm_config_to_rxt(raw: dict, weights: Optional[dict] = None) -> RxTConfig:
    """Translate a reference RxTAlpha/RxTBeta `config.json` into an `RxTConfig` (reference defaults fill gaps)."""
    for key in ("decoder_config", "encoder_config", "memory_attention_config"):
        if key not in raw:
            raise ValueError(f"not an rxlm RxTAlpha/RxTBeta config: missing {key!r} (a component repo? use "
                             "RxTMemoryAttention.from_rxlm_pretrained for memory-attention components)")
    fields = {f.name for f in dataclasses.fields(RxTComponentConfig)}
    decoder = _component_options(raw["decoder_config"], fields, "decoder_config")
    encoder = _component_options(raw["encoder_config"], fields, "encoder_config")
    # The reference encoder never uses cross-attention, whatever its config says.
    encoder["skip_memory_cross_attention"] = True
    declared = raw.get("memory_attention_variant", "interlayer")
    gated = bool(raw["memory_attention_config"].get("use_gated_residual"))
    variant = _infer_memory_variant(weights or {}, "memory_attention.model.", declared, gated, full_model=True)
    if weights is None:
        variant = "grouped-self-interlayer" if declared == "grouped-self-interlayer" else "self-interlayer"
    mem = _rxlm_memory_attention_config(raw["memory_attention_config"], {}, variant, "")
    for legacy in ("decoder", "encoder"):
        opts = decoder if legacy == "decoder" else encoder
        if opts.get("use_moe") and opts.get("use_vectorized_moe") is False:
            # Legacy per-expert modules are stacked into the vectorized layout at load time.
            opts["use_vectorized_moe"] = True
            opts["moe_bias_mode"] = "local"
    tok = raw.get("tokenizer_config") or {}
    beta = "system_prompt_title" in raw or "think_token_id" in tok
    return RxTConfig(
        decoder_config=decoder, encoder_config=encoder, memory_attention_config=mem, stm_init_type="standard",
        bos_token_id=tok.get("bos_token_id", 2), eos_token_id=tok.get("eos_token_id", 3),
        pad_token_id=tok.get("pad_token_id", 0), query_token_id=tok.get("query_token_id", 5),
        answer_token_id=tok.get("answer_token_id", 6), think_token_id=tok.get("think_token_id"),
        tool_call_token_id=tok.get("tool_call_token_id"), tool_use_token_id=tok.get("tool_use_token_id"),
        internal_token_id=tok.get("internal_token_id"), model_variant="beta" if beta else "alpha",
        system_prompt_title=raw.get("system_prompt_title", "SYSTEM INSTRUCTIONS"),
    )


def _stack_legacy_experts(weights: dict, prefix: str, config: RxTComponentConfig) -> dict:
    """Turn legacy per-expert MoE modules (`ff.experts.e.*`) into the stacked in-by-out layout."""
    out = dict(weights)
    layer_prefixes = {k.split("ff.experts.")[0] for k in weights if k.startswith(prefix) and ".ff.experts." in k}
    for lp in sorted(layer_prefixes):
        if lp + "ff.w1" in weights:  # vectorized copy present too (vectorized_moe_from_legacy): use it
            for k in [k for k in out if k.startswith(lp + "ff.experts.") or k.startswith(lp + "ff.shared_experts.")]:
                out.pop(k)
            continue
        fc1 = "fc1.linear" if config.use_gated else "fc1"
        n = config.num_experts
        out[lp + "ff.w1"] = torch.stack([out.pop(f"{lp}ff.experts.{e}.{fc1}.weight").t() for e in range(n)])
        out[lp + "ff.w2"] = torch.stack([out.pop(f"{lp}ff.experts.{e}.fc2.weight").t() for e in range(n)])
        out[lp + "ff.b1"] = torch.stack([out.pop(f"{lp}ff.experts.{e}.{fc1}.bias") for e in range(n)])
        out[lp + "ff.b2"] = torch.stack([out.pop(f"{lp}ff.experts.{e}.fc2.bias") for e in range(n)])
        shared = sorted({int(k[len(lp + "ff.shared_experts."):].split(".")[0])
                         for k in out if k.startswith(lp + "ff.shared_experts.")})
        if len(shared) == 1:
            for k in [k for k in out if k.startswith(lp + "ff.shared_experts.0.")]:
                out[k.replace("ff.shared_experts.0.", "ff.shared_expert.")] = out.pop(k)
        elif shared:
            s_n = len(shared)
            out[lp + "ff.shared_w1"] = torch.stack([out.pop(f"{lp}ff.shared_experts.{s}.{fc1}.weight").t() for s in range(s_n)])
            out[lp + "ff.shared_w2"] = torch.stack([out.pop(f"{lp}ff.shared_experts.{s}.fc2.weight").t() for s in range(s_n)])
            out[lp + "ff.shared_b1"] = torch.stack([out.pop(f"{lp}ff.shared_experts.{s}.{fc1}.bias") for s in range(s_n)])
            out[lp + "ff.shared_b2"] = torch.stack([out.pop(f"{lp}ff.shared_experts.{s}.fc2.bias") for s in range(s_n)])
    return out


def _is_reference_alias(key: str) -> bool:
    """Reference state that has no weight of ours: RoPE tables (recomputed) and the STM (caller-owned state)."""
    return ".rope." in key or key.endswith("stm.memory")


def _rxlm_map_memory_attention(weights: dict, prefix: str) -> dict:
    mapped = {}
    for key, value in weights.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if not _is_reference_alias(rest):
            mapped[rest] = value
    return mapped


def _rxlm_map_full_model(weights: dict, config: RxTConfig) -> dict:
    """Reference keys (`decoder.model.*`, `encoder.model.*`, `memory_attention.model.*`) -> ours."""
    weights = _stack_legacy_experts(weights, "decoder.model.", config.decoder_options)
    weights = _stack_legacy_experts(weights, "encoder.model.", config.encoder_options)
    embeddings = [weights[k] for k in ("encoder.model.embedding.weight", "decoder.model.embedding.weight") if k in weights]
    mapped = {}
    if embeddings:
        if len(embeddings) == 2 and not torch.equal(embeddings[0], embeddings[1]):
            raise ValueError("the checkpoint's decoder and encoder embeddings differ, but RxT shares one embedding "
                             "(the reference ties them with share_components()); refusing to pick one silently")
        mapped["embed_tokens.weight"] = embeddings[0]
    unexpected = []
    for key, value in weights.items():
        if key.endswith("embedding.weight") or _is_reference_alias(key):
            continue
        if key.startswith("decoder.model."):
            mapped["decoder." + key[len("decoder.model."):]] = value
        elif key.startswith("encoder.model."):
            rest = key[len("encoder.model."):]
            # Encoder cross-attention exists in some reference checkpoints but is never used: dead weights.
            if any(part in rest for part in (".memory_cross_attention.", ".norm2.", ".stm_norm.")):
                continue
            mapped["encoder." + rest] = value
        elif key.startswith("memory_attention.model."):
            mapped["memory_attention." + key[len("memory_attention.model."):]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"unexpected weights in the rxlm checkpoint (not decoder/encoder/memory_attention): {unexpected}")
    return mapped



RXLM_CHECKPOINT_FIX = ("config.json and model.safetensors must come from the same rxlm save_pretrained/push_to_hub, "
                       "unedited")



def _load_exact(model: nn.Module, state: dict, source: str) -> None:
    """Load `state` (rxlm weights mapped to our names) into `model`, refusing any missing, unexpected or
    mis-shaped weight."""
    expected = model.state_dict()
    mismatched = [(k, tuple(state[k].shape), tuple(expected[k].shape))
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    raise_on_unaccounted_weights(source, missing=set(expected) - set(state), unexpected=set(state) - set(expected),
                                 mismatched=mismatched, fix=RXLM_CHECKPOINT_FIX)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


# ============================================================================================= conversion


def convert_rxlm_checkpoint(src: str, dst: str, dtype: Optional[torch.dtype] = None) -> RxTForConversationalGeneration:
    """Convert an rxlm checkpoint into an HF model directory at `dst`; returns the loaded model."""
    model = load_rxlm_model(src, torch_dtype=dtype)
    os.makedirs(dst, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer = _load_tokenizer(src)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    return model


def _load_tokenizer(src: str):
    """The checkpoint's tokenizer, with RxT special tokens and chat template, or None when it has none."""
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "tokenizer.json")):
        return None
    try:
        from ..tokenization_rxt import load_rxt_tokenizer
    except ImportError:  # tokenizer helpers not installed: copy the files as they are
        load_rxt_tokenizer = None
    if load_rxt_tokenizer is not None:
        return load_rxt_tokenizer(src)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(src)


def _rxlm_component(options: dict, cls) -> dict:
    """Our component dict in the reference's vocabulary (drop our own fields the reference lacks)."""
    reference_fields = {f.name for f in dataclasses.fields(cls)} - {"variant"}
    return {k: v for k, v in options.items() if k in reference_fields}


def save_rxlm_checkpoint(model: RxTForConversationalGeneration, dst: str, stm: Optional[torch.Tensor] = None) -> None:
    """Write `model` in the reference's RxTAlpha/RxTBeta layout (config.json + model.safetensors)."""
    config: RxTConfig = model.config
    variant = config.memory_attention_config["variant"]
    raw = {
        "decoder_config": _rxlm_component(config.decoder_config, RxTComponentConfig),
        "encoder_config": _rxlm_component(config.encoder_config, RxTComponentConfig),
        "memory_attention_config": _rxlm_component(config.memory_attention_config, RxTMemoryAttentionOptions),
        # rxlm 0.3.80 builds self-interlayer for every name but 'grouped-self-interlayer'.
        "memory_attention_variant": variant if variant == "grouped-self-interlayer" else "interlayer",
        "tokenizer": None,
        "tokenizer_config": {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                            "query_token_id", "answer_token_id")},
    }
    if config.model_variant == "beta":
        raw["system_prompt_title"] = config.system_prompt_title
        for k in ("think_token_id", "tool_call_token_id", "tool_use_token_id", "internal_token_id"):
            raw["tokenizer_config"][k] = getattr(config, k)
    if variant not in ("self-interlayer", "grouped-self-interlayer"):
        raise ValueError(f"a full rxlm RxTAlpha can only hold self-interlayer or grouped memory attention, not {variant!r}")
    not_in_reference = [name for name, used in (
        ("stm_init_type='learned'", config.stm_init_type == "learned"),
        ("residual_gate_slot_status_type='pair'",
         config.memory_attention_config.get("residual_gate_slot_status_type") == "pair"),
        ("residual_gate_write_budget", config.memory_attention_config.get("residual_gate_write_budget") is not None),
        ("fifo_write_slots", config.memory_attention_config.get("fifo_write_slots") is not None),
        ("rope_memory_cross_attention=False", not config.decoder_config.get("rope_memory_cross_attention", True)),
    ) if used]
    if not_in_reference:
        raise ValueError(f"this model uses {', '.join(not_in_reference)}, which the reference (rxlm) cannot hold; "
                         "save it with save_pretrained instead.")
    state = {}
    for key, value in model.state_dict().items():
        key = flat_rxt_key(key)
        if key.endswith("inv_freq"):
            continue
        if key == "embed_tokens.weight":
            state["decoder.model.embedding.weight"] = value
            state["encoder.model.embedding.weight"] = value.clone()
        else:
            component, rest = key.split(".", 1)
            # The reference has no tying: a tied LM head (tie_word_embeddings=True) is saved as its own copy.
            state[f"{component}.model.{rest}"] = value.clone() if key == "decoder.head.weight" else value
    shape = (config.num_memory_layers, 1, config.stm_size, config.hidden_size)
    memory = stm if stm is not None else torch.zeros(shape)
    state["decoder.model.stm.memory"] = memory
    state["memory_attention.model.stm.memory"] = memory.clone()
    seq_len = config.decoder_config["seq_len"]
    for prefix, hd, base in (("decoder.model.layers.0.attention.rope", config.decoder_options.head_dim,
                              config.decoder_config["rope_base"]),
                             ("encoder.model.layers.0.attention.rope", config.encoder_options.head_dim,
                              config.encoder_config["rope_base"]),
                             ("memory_attention.model.attention_layers.0.rope",
                              config.memory_attention_config["embed_dim"] // config.memory_attention_config["att_heads"],
                              config.memory_attention_config["rope_base"])):
        inv = rope_inv_freq(hd, base)
        state[prefix + ".inv_freq"] = inv
        state[prefix + ".cache"] = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(raw, fh, indent=2)
