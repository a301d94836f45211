"""PEFT (LoRA) target presets for RxT models.

PEFT treats a *string* `target_modules` as one regular expression that must match a module's full name
(`re.fullmatch`), while a *list* matches by name suffix. Suffixes are too loose for RxT: `q_proj` exists in
the decoder self-attention, the memory cross-attention, the encoder and the memory attention. The presets
below are therefore anchored full-name regexes, one per part of the model:

Parts (`N` is a layer index; every target is an `nn.Linear`):

- `decoder_self_attention`: `decoder.{layers,stateless_layers,final_stateless_layers}.N.attention.{q,k,v,out}_proj`
- `decoder_cross_attention`: `decoder.layers.N.memory_cross_attention.{q,k,v,out}_proj` (reads the STM)
- `decoder_ffn`: dense FFNs `ff.fc1` (or `ff.fc1.linear` when gated) and `ff.fc2`, and the same in the single
  shared expert of MoE layers (`ff.shared_expert.*`; two or more shared experts are stacked parameters)
- `encoder_attention`: `encoder.layers.N.attention.{q,k,v,out}_proj`
- `encoder_ffn`: `encoder.layers.N.ff.fc1[.linear]`, `encoder.layers.N.ff.fc2`
- `memory_attention`: `memory_attention.{attention_layers,mean_attention_layers,self_attention_layers}.N.*_proj`

Routed MoE experts are stacked `nn.Parameter`s (`ff.w1` [E, D, 2F], `ff.w2` [E, F, D]), not Linear layers;
PEFT reaches them through `LoraConfig(target_parameters=...)` (see :func:`rxt_lora_target_parameters`). The
router (`ff.router.gate`) is never targeted: adapting it changes which experts run.

Adapting the memory path (encoder, memory attention) changes what is written into the STM, so an adapter
trained with it must be trained on multi-turn data (memory-aware training); decoder-only adapters can be
trained on single interactions with a fixed STM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from ..modeling_rxt import flat_rxt_key

__all__ = ["RXT_LORA_PARTS", "rxt_lora_target_modules", "rxt_lora_target_parameters"]

_PROJ = r"(?:q_proj|k_proj|v_proj|out_proj)"
_DEC_LAYERS = r"decoder\.(?:layers|stateless_layers|final_stateless_layers)\.\d+"
RXT_LORA_PARTS = {
    "decoder_self_attention": rf"{_DEC_LAYERS}\.attention\.{_PROJ}",
    "decoder_cross_attention": rf"decoder\.layers\.\d+\.memory_cross_attention\.{_PROJ}",
    "encoder_attention": rf"encoder\.layers\.\d+\.attention\.{_PROJ}",
    "memory_attention":
        rf"memory_attention\.(?:attention_layers|mean_attention_layers|self_attention_layers)\.\d+\.{_PROJ}",
}
_FFN_PARTS = {"decoder_ffn": (_DEC_LAYERS, "decoder_config"),
              "encoder_ffn": (r"encoder\.layers\.\d+", "encoder_config")}


def _ffn(prefix: str, gated: bool) -> str:
    # `ff.fc1` is a Linear in plain FFNs but a gated unit (not a Linear; PEFT would refuse it) wrapping
    # `ff.fc1.linear` in gated (SwiGLU) ones, so the config decides which name to target.
    fc1 = r"fc1\.linear" if gated else r"fc1"
    # dense FFN, or the single shared expert of an MoE layer (same layout)
    return rf"{prefix}\.ff\.(?:shared_expert\.)?(?:{fc1}|fc2)"


def rxt_lora_target_modules(parts: Sequence[str] = ("decoder_self_attention", "decoder_cross_attention"),
                            config: Optional[Any] = None) -> str:
    """An anchored regex for `LoraConfig(target_modules=...)` covering the chosen parts of an RxT model.

    Args:
        parts: names from `RXT_LORA_PARTS` plus "decoder_ffn" / "encoder_ffn". Default: the decoder's self- and
            memory cross-attention (the usual chat fine-tune; encoder and memory attention stay untouched).
        config: the model's `RxTConfig`; needed for the FFN parts (gated and plain FFNs name their input
            projection differently).
    """
    if isinstance(parts, str):
        parts = (parts,)
    patterns = []
    for part in parts:
        if part in RXT_LORA_PARTS:
            patterns.append(RXT_LORA_PARTS[part])
        elif part in _FFN_PARTS:
            if config is None:
                raise ValueError(f"LoRA part {part!r} needs config= (the model's RxTConfig)")
            prefix, key = _FFN_PARTS[part]
            patterns.append(_ffn(prefix, bool(getattr(config, key)["use_gated"])))
        else:
            raise ValueError(f"unknown LoRA part {part!r}; expected one of "
                             f"{sorted(RXT_LORA_PARTS) + sorted(_FFN_PARTS)}")
    if not patterns:
        raise ValueError("choose at least one LoRA part")
    # `rxt.` is the base model's attribute in RxTForConversationalGeneration; RxTModel's names lack it.
    return "|".join(rf"(?:rxt\.)?(?:{p})" for p in patterns)


def rxt_lora_target_parameters(model: Any, component: str = "decoder") -> list[str]:
    """Names of the stacked routed-expert weights (`ff.w1`, `ff.w2`) of one component, for
    `LoraConfig(target_parameters=...)`. Empty when the component has no MoE layers."""
    if component not in ("decoder", "encoder"):
        raise ValueError("component must be 'decoder' or 'encoder'")
    names = []
    for name, _ in model.named_parameters():
        if flat_rxt_key(name).startswith(f"{component}.") and (name.endswith(".ff.w1") or name.endswith(".ff.w2")):
            names.append(name)
    return names
