"""RAML v1.0 model cards for Reactive Transformer checkpoints.

Every RxT model trained with this package is published under the Reactive AI Model & Architecture License
(RAML) v1.0, behind a gated access form (non-commercial use). :func:`build_model_card` renders that card from
the *real* model: the architecture list and the parameter counts are read from the config and the modules,
never typed by hand, so a card cannot drift from the checkpoint it describes.

The card has two halves:

* YAML metadata (what the Hub reads): licence fields, pipeline tag, library, tags, datasets, languages and the
  ``extra_gated_*`` form;
* a Markdown body rendered from the Jinja template ``model_cards/rxt_raml_card.md.jinja``: architecture,
  parameter counts, training stages, evaluation results, usage and the licence notice.

Nothing here talks to the network; pushing lives in :mod:`transformers_rxt.hub.push`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from huggingface_hub import ModelCard, ModelCardData

__all__ = [
    "GATED_DESCRIPTIONS",
    "RAML_LICENSE_NAME",
    "RAML_LICENSE_TITLE",
    "RAML_LICENSE_URL",
    "RXT_CARD_TAGS",
    "RxTCardValidationError",
    "build_model_card",
    "count_parameters",
    "describe_architecture",
    "gating_metadata",
    "license_pointer_text",
    "load_training_stages",
    "stage_record_from_trainer_state",
    "validate_model_card",
]

RAML_LICENSE_NAME = "raml-v1.0"
RAML_LICENSE_TITLE = "Reactive AI Model & Architecture License (RAML) v1.0"
# The licensor publishes the licence text in its framework repository; we link to it rather than copy it.
RAML_LICENSE_URL = "https://github.com/RxAI-dev/rxlm/blob/main/MODELS_LICENSE.md"
RAML_COMMERCIAL_CONTACT = "licensing@rxai.dev"
RAML_PATENT_NOTE = "pending patent #P.453260"

# `transformers` (not the reference's own library) is what loads these repos, so the Hub's "Use this model"
# button shows the right snippet; the package tag says which plugin wrote the code files.
CARD_LIBRARY_NAME = "transformers"
RXT_CARD_TAGS = (
    "RxT",
    "ReactiveTransformer",
    "Event-Driven",
    "MemorySystem",
    "ShortTermMemory",
    "Real-Time",
    "ReactiveLanguageModel",
    "transformers-rxt",
    "custom_code",
)
# Marker comment in the body; validation uses it to check that the licence section survived hand edits.
LICENSE_SECTION_MARKER = "<!-- rxt-card: licence notice -->"
DEFAULT_TEMPLATE_NAME = "rxt_raml_card.md.jinja"
STAGES_FILE = "rxt_training_stages.json"

# Human descriptions of the curriculum stage names the trainers use (unknown names are shown as given).
STAGE_DESCRIPTIONS = {
    "tokenizer": "tokenizer training (byte-level BPE with the RxT special tokens)",
    "joint-pretraining": "joint LM pre-training: decoder (autoregressive) and encoder (masked LM) together, "
                         "the decoder reading the encoder's states through memory cross-attention",
    "joint-lm": "joint LM training (pre-training or interaction SFT): decoder and encoder together",
    "joint-sft": "joint interaction SFT: the joint objective on single query/answer interactions",
    "interaction-sft": "joint interaction SFT: the joint objective on single query/answer interactions",
    "memory-attention-pretraining": "self-supervised memory-attention pre-training (cosine loss against "
                                    "weighted means of old memory and new encoded data)",
    "self-supervised-memory-attention": "self-supervised memory-attention pre-training (cosine loss against "
                                        "weighted means of old memory and new encoded data)",
    "supervised-memory-aware": "supervised memory-aware training (SMAT): the decoder answers from the memory "
                               "written by earlier interactions",
    "smat": "supervised memory-aware training (SMAT): the decoder answers from the memory written by earlier "
            "interactions",
    "mrl": "memory reinforcement learning (MRL) on multi-step retention curricula",
    "dmpo": "DMPO: memory-aware preference optimisation (accepted vs rejected answers) on multi-turn episodes",
    "lora": "LoRA fine-tuning (adapter merged into the weights)",
}


class RxTCardValidationError(ValueError):
    """A model card is missing a RAML v1.0 field (or has a wrong value); the message lists every problem."""


# What the access form tells a visitor about approval; it must match the repository's gating mode.
GATED_DESCRIPTIONS = {
    "auto": "Access is granted automatically as soon as you accept the licence terms.",
    "manual": "Access is granted once the authors of this repository have reviewed your request.",
}


# ============================================================================================== metadata
def _check_gating_mode(gated: Any) -> str:
    if gated not in GATED_DESCRIPTIONS:
        raise ValueError(f"gated={gated!r}: an RxT model card describes a gated repository, 'auto' (access on "
                         "accepting the licence) or 'manual' (the authors review each request)")
    return gated


def gating_metadata(gated: str = "auto") -> dict[str, Any]:
    """The YAML keys that turn the Hub's access-request form into a RAML v1.0 acceptance form.

    `gated: true` documents the intent in the card; the Hub only gates a repo once its *setting* is on
    (:func:`transformers_rxt.hub.push_rxt_to_hub` does that with ``HfApi.update_repo_settings``).
    `gated` is that setting's mode, "auto" or "manual": the form's description says which one applies.
    """
    gated = _check_gating_mode(gated)
    prompt = (
        f"This model is distributed under the [{RAML_LICENSE_TITLE}]({RAML_LICENSE_URL}). You may use it free "
        "of charge for non-commercial purposes only, such as research and education. The Reactive Transformer "
        f"architecture is covered by a {RAML_PATENT_NOTE} of Reactive AI; commercial use needs a separate "
        f"licence from Reactive AI ({RAML_COMMERCIAL_CONTACT})."
    )
    return {
        "gated": True,
        "extra_gated_prompt": prompt,
        "extra_gated_fields": {
            "Company": "text",
            "Country": "country",
            "I want to use this model for": {
                "type": "select",
                "options": ["Research", "Education", {"label": "Other", "value": "other"}],
            },
            "I agree to use this model for non-commercial purposes only": "checkbox",
        },
        "extra_gated_heading": f"Accept the {RAML_LICENSE_TITLE} to access this model",
        "extra_gated_description": GATED_DESCRIPTIONS[gated],
        "extra_gated_button_content": "Accept the RAML v1.0 terms",
    }


def license_pointer_text(model_name: str = "this model") -> str:
    """Content of the `LICENSE` file placed in a model repository (a pointer to RAML v1.0, not its text)."""
    return (
        f"The weights and configuration of {model_name} are licensed under the\n"
        f"{RAML_LICENSE_TITLE}.\n\n"
        f"Full licence text: {RAML_LICENSE_URL}\n\n"
        "In short (the licence text prevails): use is permitted for non-commercial purposes such as research\n"
        "and education; derivative models must be shared under the same licence; commercial use requires a\n"
        f"licence from Reactive AI ({RAML_COMMERCIAL_CONTACT}). The Reactive Transformer architecture is the\n"
        f"subject of a {RAML_PATENT_NOTE}.\n\n"
        "The Python files in this repository (configuration_rxt.py, modeling_rxt.py, ...) come from the\n"
        "transformers-rxt package and are licensed separately under the Apache License 2.0.\n"
    )


# ============================================================================================== model facts
def _resolve_model(model: Any):
    """Return `(model_or_None, config)` for a model, a config, or a model directory."""
    if isinstance(model, (str, os.PathLike)):
        from ..configuration_rxt import RxTConfig

        return None, RxTConfig.from_pretrained(str(model))
    if isinstance(model, torch.nn.Module):
        if hasattr(model, "get_base_model"):  # a peft wrapper: describe the model underneath
            model = model.get_base_model()
        return model, model.config
    if getattr(model, "model_type", None) == "rxt":
        return None, model
    raise TypeError(
        "expected an RxTForConversationalGeneration, an RxTConfig or a model directory, "
        f"got {type(model).__name__}"
    )


def _meta_model(config):
    """Build the model on the meta device: exact parameter shapes, no memory, no weights."""
    from ..modeling_rxt import RxTForConversationalGeneration

    with torch.device("meta"):
        return RxTForConversationalGeneration(config)


def _is_moe(module: torch.nn.Module) -> bool:
    # Duck-typed so that models loaded through remote code (another class object) are recognised too.
    return all(hasattr(module, a) for a in ("num_experts", "top_k", "w1", "w2")) and isinstance(
        getattr(module, "w1"), torch.nn.Parameter)


def _inactive_expert_parameters(module: torch.nn.Module) -> int:
    """Routed-expert parameters a token does not use in this MoE layer: (E - top_k) experts' worth."""
    inactive = 0
    for moe in module.modules():
        if not _is_moe(moe):
            continue
        routed = moe.w1.numel() + moe.w2.numel()
        for name in ("b1", "b2"):  # per-expert biases ("local" bias mode)
            if isinstance(getattr(moe, name, None), torch.nn.Parameter):
                routed += getattr(moe, name).numel()
        per_expert = routed // moe.num_experts
        inactive += per_expert * (moe.num_experts - moe.top_k)
    return inactive


def count_parameters(model: Any) -> dict[str, dict[str, int]]:
    """Parameter counts per component, with the *active* count next to each total.

    Components: ``embedding`` (shared by decoder and encoder), ``decoder`` (layers, head norm and LM head),
    ``encoder``, ``memory_attention``, and ``total`` (every distinct parameter once). In a Mixture-of-Experts
    layer a token runs through ``moe_top_k`` routed experts plus the shared experts, so only those are counted
    as active: the other ``num_experts - moe_top_k`` routed experts are subtracted. Dense parts are always
    active. ``decoder_path`` is what one generated token touches (embedding + active decoder); the encoder
    and memory attention run once per interaction, after the answer.

    `model` may be a model, an `RxTConfig` or a model directory (counted on the meta device, no weights read).
    """
    module, config = _resolve_model(model)
    if module is None:
        module = _meta_model(config)
    parts = {
        "embedding": module.embed_tokens,
        # the LM head is the LM model's `lm_head`, outside the decoder module (a base RxTModel has none)
        "decoder": nn.ModuleList([module.decoder] + ([module.lm_head] if hasattr(module, "lm_head") else [])),
        "encoder": module.encoder,
        "memory_attention": module.memory_attention,
    }
    counts: dict[str, dict[str, int]] = {}
    for name, part in parts.items():
        total = sum(p.numel() for p in part.parameters())
        counts[name] = {"total": total, "active": total - _inactive_expert_parameters(part)}
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    counts["total"] = {"total": total, "active": total - _inactive_expert_parameters(module)}
    counts["decoder_path"] = {
        "total": counts["embedding"]["total"] + counts["decoder"]["total"],
        "active": counts["embedding"]["active"] + counts["decoder"]["active"],
    }
    return counts


def _attention_info(att_type: str, att_heads: int, query_heads: int, kv_heads: int, gated: bool = False) -> dict:
    if att_type == "sqa":
        if query_heads == kv_heads == att_heads:
            label = "Sparse Query Attention with all heads (MHA-equivalent)"
        elif query_heads == kv_heads:
            label = "symmetric Sparse Query Attention (sSQA)"
        elif query_heads < kv_heads:
            label = "reverse Sparse Query Attention (fewer query than key/value heads)"
        else:
            label = "Sparse Query Attention (SQA)"
    else:
        label = {"mha": "multi-head attention (MHA)", "gqa": "grouped-query attention (GQA)",
                 "mqa": "multi-query attention (MQA)"}[att_type]
    return {"type": att_type, "label": label, "heads": att_heads, "query_heads": query_heads,
            "kv_heads": kv_heads, "gated": bool(gated)}


def _ffn_label(gated: bool, activation: str) -> str:
    if not gated:
        return f"{activation} feed-forward"
    if activation in ("silu", "swish"):
        return "SwiGLU feed-forward"
    if activation == "gelu":
        return "GeGLU feed-forward"
    return f"gated ({activation}) feed-forward"


def _component_info(opts, *, decoder: bool) -> dict:
    hq, hkv = opts.self_attention_heads()
    info: dict[str, Any] = {
        "layers": opts.num_layers,
        "self_attention": _attention_info(opts.self_att_type, opts.att_heads, hq, hkv, opts.use_gated_attention),
        "norm": "RMSNorm" if opts.use_rms_norm else "LayerNorm",
        "seq_len": opts.seq_len,
    }
    if decoder:
        cq, ckv = opts.cross_attention_heads()
        info["cross_attention"] = _attention_info(opts.cross_att_type, opts.att_heads, cq, ckv,
                                                  opts.gated_cross_attention)
        info["stateless_layers"] = list(opts.stateless_layers_config or [])
        info["final_stateless_layers"] = list(opts.final_stateless_layers_config or [])
        info["head_norm"] = ({"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}[opts.head_norm_type]
                             if opts.use_head_norm else None)
        info["dense_layer_dim"] = opts.dense_layer_dim if "dense" in (
            info["stateless_layers"] + info["final_stateless_layers"]) else None
    ffn: dict[str, Any] = {"label": _ffn_label(opts.use_gated, opts.ff_activation), "dim": opts.ff_dim,
                           "activation": opts.ff_activation, "gated": opts.use_gated, "moe": opts.use_moe}
    if opts.use_moe:
        ffn.update(experts=opts.num_experts, active_experts=opts.moe_top_k, shared_experts=opts.num_shared_experts,
                   shared_expert_dim=(opts.shared_expert_dim or opts.ff_dim) if opts.num_shared_experts else None)
    info["ffn"] = ffn
    return info


def _memory_attention_info(mem) -> dict:
    labels = {
        "simple": "Simple Memory Attention",
        "self": "Self Memory Attention",
        "interlayer": "Interlayer Memory Attention",
        "self-interlayer": "Gated Self/Interlayer Memory Attention",
        "grouped-self-interlayer": f"Grouped Self/Interlayer Memory Attention ({mem.num_groups} groups)",
    }
    hq, hkv = mem.heads("main")
    attentions = {"memory write": _attention_info(mem.att_type, mem.att_heads, hq, hkv)}
    if mem.variant in ("interlayer", "self-interlayer", "grouped-self-interlayer"):
        attentions["interlayer"] = _attention_info(mem.interlayer_att_type, mem.att_heads, *mem.heads("interlayer"))
    if mem.variant == "self":
        attentions["self"] = _attention_info(mem.self_att_type, mem.att_heads, *mem.heads("self"))
    if mem.variant == "simple" and mem.disable_residual:
        gate = "none: the update replaces the old memory (residual disabled)"
    elif not mem.use_gated_residual:
        gate = "none: plain residual (old memory + update)"
    else:
        activation = "tanh" if mem.use_tanh_residual_gate else "sigmoid"
        kind = mem.residual_gate_type
        scope = "per STM slot" if mem.residual_per_slot_gate else "shared by all slots"
        gate = f"{kind} residual gate with {activation} activation ({scope}"
        if mem.residual_gate_type != "static":
            status = {"linear": "a learned projection of old + update",
                      "pair": "a learned projection of old and update side by side"}.get(
                mem.residual_gate_slot_status_type, "the mean over dim")
            gate += f", slot status from {status}"
        gate += f", init {mem.residual_gate_init:g})"
    norm = {"classic-rms": "RMSNorm", "rms": "gated RMS memory norm", "layer": "gated LayerNorm memory norm",
            "adaptive": "adaptive (EMA) RMS memory norm", "positional": "positional (per-slot EMA) memory norm"}
    return {"variant": mem.variant, "label": labels[mem.variant], "attentions": attentions, "residual_gate": gate,
            "norm": norm[mem.norm_type], "layers": mem.num_layers}


def _layer_norms(dec, enc) -> str:
    names = ["RMSNorm" if opts.use_rms_norm else "LayerNorm" for opts in (dec, enc)]
    if names[0] == names[1]:
        return f"{names[0]} in the decoder and encoder layers"
    return f"{names[0]} in the decoder layers, {names[1]} in the encoder layers"


def describe_architecture(model: Any) -> dict[str, Any]:
    """Every architecture number the card shows, read from the config (a model, a config or a model dir).

    The structure is plain data (ints, strings, dicts) so tests and other tools can compare it with the config.
    """
    _, config = _resolve_model(model)
    dec, enc, mem = config.decoder_options, config.encoder_options, config.memory_attention_options
    if dec.use_nope:
        rope = "none (NoPE)"
    else:
        rope = (f"RoPE (base {dec.rope_base:g}) on self-attention (queries and keys), memory cross-attention "
                "(queries only: memory slots carry no position) and memory attention (keys only)")
    return {
        "model_variant": config.model_variant,
        "dim": config.hidden_size,
        "att_heads": dec.att_heads,
        "head_dim": dec.head_dim,
        "memory_layers": config.num_memory_layers,
        "decoder_layers": config.num_decoder_self_attention_layers,
        "decoder": _component_info(dec, decoder=True),
        "encoder": _component_info(enc, decoder=False),
        "memory_attention": _memory_attention_info(mem),
        "rope": rope,
        "norm": _layer_norms(dec, enc),
        "vocab_size": config.vocab_size,
        "interaction_length": config.max_interaction_length,
        "stm": {"layers": config.num_memory_layers, "slots": config.stm_size, "dim": config.hidden_size},
        "stm_init": config.stm_init_type,
    }


# ============================================================================================== training stages
def stage_record_from_trainer_state(state: Union[str, os.PathLike, Mapping[str, Any]], stage: Optional[str] = None,
                                    dataset: Union[str, Sequence[str], None] = None) -> dict[str, Any]:
    """One stage record from a Trainer's `trainer_state.json` (a path, its directory, or the loaded dict).

    Reads the steps, epochs, input tokens seen (when the Trainer counted them) and the last logged training
    loss. `stage` names the curriculum stage (e.g. "joint-pretraining"); the Trainer does not record it.
    """
    if not isinstance(state, Mapping):
        path = Path(state)
        if path.is_dir():
            path = path / "trainer_state.json"
        state = json.loads(path.read_text(encoding="utf-8"))
    record: dict[str, Any] = {"stage": stage or state.get("rxt_stage") or "training"}
    if dataset:
        record["dataset"] = dataset
    if state.get("global_step"):
        record["steps"] = int(state["global_step"])
    if state.get("epoch"):
        record["epochs"] = round(float(state["epoch"]), 2)
    # Trainer counts tokens when `include_num_input_tokens_seen` is on; the stage trainers log `train_tokens`.
    history = state.get("log_history", [])
    tokens = state.get("num_input_tokens_seen") or next(
        (entry["train_tokens"] for entry in reversed(history) if entry.get("train_tokens")), None)
    if tokens:
        record["tokens"] = int(tokens)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    if losses:
        record["final_loss"] = round(float(losses[-1]), 4)
    return record


def load_training_stages(model_dir: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The stage records kept in a model directory.

    `rxt_training_stages.json` (a list of records, appended to by each stage) wins; otherwise a single record
    is derived from `trainer_state.json`; otherwise the list is empty.
    """
    path = Path(model_dir)
    history = path / STAGES_FILE
    if history.is_file():
        records = json.loads(history.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{history} must hold a JSON list of stage records")
        return records
    if (path / "trainer_state.json").is_file():
        return [stage_record_from_trainer_state(path)]
    return []


def _normalise_stages(stages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for i, record in enumerate(stages):
        if not isinstance(record, Mapping) or not record.get("stage"):
            raise ValueError(f"stage record {i} must be a mapping with a 'stage' name, got {record!r}")
        row = dict(record)
        datasets = row.get("dataset") or row.get("datasets")
        if isinstance(datasets, str):
            datasets = [datasets]
        row["datasets"] = list(datasets or [])
        row["description"] = row.get("description") or STAGE_DESCRIPTIONS.get(str(row["stage"]), "")
        for key in ("steps", "tokens"):
            if row.get(key) is not None:
                row[f"{key}_text"] = f"{int(row[key]):,}"
        rows.append(row)
    return rows


def _normalise_eval(eval_results: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Split evaluation results into memory retention (by distance), TensorBLEU reward and other metrics."""
    if not eval_results:
        return {}
    results = dict(eval_results)
    out: dict[str, Any] = {}
    retention = results.pop("memory_retention", None)
    if retention:
        if not isinstance(retention, Mapping):
            raise ValueError("eval_results['memory_retention'] must map a distance (interactions back) to an accuracy")
        out["memory_retention"] = sorted(((int(k), float(v)) for k, v in retention.items()))
    reward = results.pop("tensorbleu_reward", None)
    if reward is not None:
        out["tensorbleu_reward"] = float(reward)
    out["other"] = [(str(k), v) for k, v in results.items()]
    return out


# ============================================================================================== rendering
def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _template_path(template_path: Union[str, os.PathLike, None]) -> Path:
    """Explicit path > $RXT_CARD_TEMPLATE > packaged copy > the repository's `model_cards/` folder."""
    candidates = []
    if template_path is not None:
        candidates.append(Path(template_path))
    elif os.environ.get("RXT_CARD_TEMPLATE"):
        candidates.append(Path(os.environ["RXT_CARD_TEMPLATE"]))
    else:
        here = Path(__file__).resolve().parent
        candidates += [here / "templates" / DEFAULT_TEMPLATE_NAME,
                       here.parents[1] / "model_cards" / DEFAULT_TEMPLATE_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"RxT model-card template not found (looked at {[str(c) for c in candidates]})")


def _tokenizer_info(tokenizer: Any) -> Optional[dict[str, Any]]:
    if tokenizer is None:
        return None
    return {"size": len(tokenizer),
            "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def build_model_card(
    model: Any,
    *,
    repo_id: Optional[str] = None,
    tokenizer: Any = None,
    stages: Optional[Iterable[Mapping[str, Any]]] = None,
    eval_results: Optional[Mapping[str, Any]] = None,
    datasets: Union[str, Sequence[str], None] = None,
    language: Union[str, Sequence[str], None] = ("en",),
    base_model: Union[str, Sequence[str], None] = None,
    model_name: Optional[str] = None,
    description: Optional[str] = None,
    tags: Sequence[str] = (),
    template_path: Union[str, os.PathLike, None] = None,
    gated: str = "auto",
) -> ModelCard:
    """Render the RAML v1.0 model card of an RxT model.

    Args:
        model: an `RxTForConversationalGeneration`, its `RxTConfig`, or a saved model directory. Parameter counts
            come from the modules (built on the meta device when only a config is given).
        repo_id: the Hub repository (`namespace/name`); used in the title and the usage snippet.
        tokenizer: the model's tokenizer (its size and chat template are mentioned).
        stages: training stage records, in order, e.g. ``[{"stage": "joint-pretraining", "dataset": "org/ds",
            "steps": 1000, "tokens": 2_000_000}]``. When None and `model` was loaded from (or is) a directory,
            the records are read from `rxt_training_stages.json` / `trainer_state.json` there.
        eval_results: e.g. ``{"memory_retention": {1: 0.91, 4: 0.63}, "tensorbleu_reward": 0.42, "ppl": 3.1}``:
            retention accuracy by distance (interactions back), the TensorBLEU reward, and any other metric.
        datasets: Hub dataset ids for the YAML `datasets:` field (default: those named by the stage records).
        language: ISO codes for `language:`.
        base_model: the Hub id(s) this model was trained from (YAML `base_model:`).
        model_name, description: title and opening paragraph (defaults are derived from `repo_id`).
        tags: extra tags, added after the standard RxT tags.
        template_path: a custom Jinja template (default: the packaged RAML template).
        gated: the gating mode of the repository the card is for, "auto" or "manual" (see `gating_metadata`).

    Returns:
        a `huggingface_hub.ModelCard`; `card.save("README.md")` writes it. It passes :func:`validate_model_card`.
    """
    gated = _check_gating_mode(gated)
    module, config = _resolve_model(model)
    if stages is None:
        source = model if isinstance(model, (str, os.PathLike)) else getattr(module, "name_or_path", "") or ""
        stages = load_training_stages(source) if source and Path(source).is_dir() else []
    stage_rows = _normalise_stages(stages)
    if datasets is None:
        datasets = [d for row in stage_rows for d in row["datasets"] if "/" in d]
    elif isinstance(datasets, str):
        datasets = [datasets]
    datasets = list(dict.fromkeys(datasets))  # keep order, drop repeats
    if isinstance(language, str):
        language = [language]
    arch = describe_architecture(config)
    tag_list = list(RXT_CARD_TAGS)
    if "sqa" in {arch["decoder"]["self_attention"]["type"], arch["decoder"]["cross_attention"]["type"]}:
        tag_list.append("SparseQueryAttention")
    if arch["decoder"]["ffn"]["moe"] or arch["encoder"]["ffn"]["moe"]:
        tag_list.append("MixtureOfExperts")
    tag_list += [t for t in tags if t not in tag_list]

    card_data = ModelCardData(
        base_model=base_model or None,
        datasets=datasets or None,
        language=list(language) if language else None,
        library_name=CARD_LIBRARY_NAME,
        license="other",
        license_name=RAML_LICENSE_NAME,
        license_link=RAML_LICENSE_URL,
        pipeline_tag="text-generation",
        tags=tag_list,
        **gating_metadata(gated),
    )

    counts = count_parameters(module if module is not None else config)
    labels = {"embedding": "Embedding (shared by decoder and encoder)", "decoder": "Decoder (incl. LM head)",
              "encoder": "Encoder", "memory_attention": "Memory attention", "total": "**Total**"}
    param_rows = [{"name": labels[k], "total": counts[k]["total"], "active": counts[k]["active"],
                   "total_text": f"{counts[k]['total']:,} ({_human(counts[k]['total'])})",
                   "active_text": f"{counts[k]['active']:,} ({_human(counts[k]['active'])})"} for k in labels]

    name = model_name or (repo_id.split("/")[-1] if repo_id else "RxT model")
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    template = env.from_string(_template_path(template_path).read_text(encoding="utf-8"))
    content = template.render(
        card_data=card_data.to_yaml(),
        model_name=name,
        repo_id=repo_id or "<namespace>/<model-name>",
        description=description,
        arch=arch,
        params=param_rows,
        decoder_path=counts["decoder_path"],
        human=_human,
        has_moe=counts["total"]["total"] != counts["total"]["active"],
        stages=stage_rows,
        evaluation=_normalise_eval(eval_results),
        tokenizer=_tokenizer_info(tokenizer),
        license_title=RAML_LICENSE_TITLE,
        license_url=RAML_LICENSE_URL,
        license_name=RAML_LICENSE_NAME,
        commercial_contact=RAML_COMMERCIAL_CONTACT,
        patent_note=RAML_PATENT_NOTE,
        license_marker=LICENSE_SECTION_MARKER,
    )
    card = ModelCard(content)
    validate_model_card(card, gated=gated)
    return card


# ============================================================================================== validation
def validate_model_card(card: Union[ModelCard, str, os.PathLike], gated: Optional[str] = None) -> ModelCard:
    """Check that a card (object, Markdown text, or README path) carries the RAML v1.0 metadata and notice.

    With `gated` ("auto" or "manual", the repository's gating mode), the access form must also describe that
    mode (`extra_gated_description`), so that the card and the repository settings agree. Purely local: the Hub's own YAML validation needs the network and is left to the Hub. Raises
    :class:`RxTCardValidationError` listing every problem; returns the card when it passes.
    """
    if not isinstance(card, ModelCard):
        # A path (PathLike, or a one-line string) is read; any other string is the card's Markdown itself.
        is_path = isinstance(card, os.PathLike) or ("\n" not in card and not card.startswith("---"))
        text = Path(card).read_text(encoding="utf-8") if is_path else card
        try:
            card = ModelCard(text)
        except Exception as error:  # noqa: BLE001 - any YAML/format failure is a validation failure
            raise RxTCardValidationError(f"the model card could not be parsed: {error}") from error
    data = card.data.to_dict()
    problems = []
    expected = {"license": "other", "license_name": RAML_LICENSE_NAME, "pipeline_tag": "text-generation",
                "gated": True}
    for key, value in expected.items():
        if data.get(key) != value:
            problems.append(f"{key} must be {value!r} (got {data.get(key)!r})")
    for key in ("license_link", "library_name", "extra_gated_prompt", "extra_gated_heading",
                "extra_gated_description", "extra_gated_button_content", "language"):
        if not data.get(key):
            problems.append(f"{key} is missing")
    if data.get("extra_gated_prompt") and "RAML" not in str(data["extra_gated_prompt"]):
        problems.append("extra_gated_prompt must name the RAML v1.0 licence")
    missing_tags = [t for t in ("RxT", "ReactiveTransformer", "ShortTermMemory") if t not in (data.get("tags") or [])]
    if missing_tags:
        problems.append(f"tags {missing_tags} are missing")
    fields = data.get("extra_gated_fields")
    if not isinstance(fields, Mapping):
        problems.append("extra_gated_fields is missing")
    else:
        kinds = {k: (v.get("type") if isinstance(v, Mapping) else v) for k, v in fields.items()}
        if "checkbox" not in kinds.values():
            problems.append("extra_gated_fields needs the non-commercial-use checkbox")
        if "country" not in kinds.values():
            problems.append("extra_gated_fields needs a country field")
        if not any("compan" in k.lower() for k in kinds):
            problems.append("extra_gated_fields needs a company field")
        selects = [v for v in fields.values() if isinstance(v, Mapping) and v.get("type") == "select"]
        options = {(o.get("label") if isinstance(o, Mapping) else o) for s in selects for o in s.get("options", [])}
        if not {"Research", "Education", "Other"} <= options:
            problems.append("extra_gated_fields needs a purpose select with Research, Education and Other")
    if gated is not None and data.get("extra_gated_description") != GATED_DESCRIPTIONS[_check_gating_mode(gated)]:
        problems.append(f"extra_gated_description must be {GATED_DESCRIPTIONS[gated]!r}, as the repository is "
                        f"gated={gated!r} (got {data.get('extra_gated_description')!r}); rebuild the card with "
                        f"build_model_card(..., gated={gated!r})")
    if LICENSE_SECTION_MARKER not in card.text:
        problems.append("the body has no licence notice section")
    if problems:
        raise RxTCardValidationError("the model card is not a valid RAML v1.0 card:\n- " + "\n- ".join(problems))
    return card

