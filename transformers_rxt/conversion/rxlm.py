"""rxlm checkpoint <-> HF model directory.

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

from ..configuration_rxt import RxTComponentConfig, RxTConfig, RxTMemoryAttentionOptions
from ..modeling_rxt import RxTForConversationalGeneration, flat_rxt_key, rope_inv_freq

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert_rxlm_checkpoint(src: str, dst: str, dtype: Optional[torch.dtype] = None) -> RxTForConversationalGeneration:
    """Convert an rxlm checkpoint into an HF model directory at `dst`; returns the loaded model."""
    model = RxTForConversationalGeneration.from_rxlm_pretrained(src, torch_dtype=dtype)
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
            state[f"{component}.model.{rest}"] = value
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
