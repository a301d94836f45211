"""Configuration of the Reactive Transformer (RxT).

The option names follow the reference implementation (rxlm 0.3.80) so that its `config.json` files map
one to one; the defaults are the reference's defaults. Three components make an RxT model:

* the **decoder** (`RxTComponentConfig`): self-attention + memory cross-attention + FFN/MoE, LM head;
* the **encoder** (`RxTComponentConfig`): bidirectional layers whose per-layer outputs are the encoded
  data (ED) written into memory;
* the **memory attention** (`RxTMemoryAttentionConfig`): writes ED into the Short-Term Memory (STM).

`RxTConfig` stores the two component configs as plain dicts (so `config.json` stays readable and the
reference's nested layout is kept) and validates everything on construction.

This file is copied next to the weights by `save_pretrained` (remote code): it imports only the
standard library and transformers.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional

from transformers import PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTENTION_TYPES = ("mha", "gqa", "mqa", "sqa")
FFN_ACTIVATIONS = ("relu", "gelu", "swish", "silu", "sigmoid", "linear", "tanh")
MEMORY_NORM_TYPES = ("classic-rms", "rms", "layer", "adaptive", "positional")
RESIDUAL_GATE_TYPES = ("static", "elementwise", "linear")
MEMORY_ATTENTION_VARIANTS = ("simple", "self", "interlayer", "self-interlayer", "grouped-self-interlayer")
STM_INIT_TYPES = ("standard", "normal", "uniform", "ones", "zeros", "learned")
MOE_BIAS_MODES = ("global", "local", "off")


def check_attn_implementation(name: Optional[str]) -> None:
    """Refuse an `attn_implementation` RxT cannot run, naming the ones it can.

    RxT runs "eager" and every function registered in transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`):
    "sdpa" (default), "flash_attention_2" (with flash-attn installed), "flex_attention" (where torch has it), the
    project's "sqa" kernel (registered by `import transformers_rxt`) and any function registered by the user. The
    paged implementations need a paged cache, which RxT's decoder does not use. Whether an installed package or the
    device can run the name is checked by transformers when the model is built.
    """
    if name is None or isinstance(name, dict):  # None: the default (sdpa); a dict addresses sub-configs
        return
    valid = ["eager"] + [key for key in ALL_ATTENTION_FUNCTIONS.valid_keys() if not key.startswith("paged")]
    if name not in valid:
        hint = " (register it with `import transformers_rxt`)" if name == "sqa" else ""
        raise ValueError(f'Specified `attn_implementation="{name}"` is not supported by RxT{hint}: it supports '
                         f"{valid} (the functions registered in transformers' AttentionInterface, and 'eager')")


# Reference options we refuse loudly instead of silently building something else.
UNSUPPORTED_ATTENTION_TYPES = {
    "hybrid": "linear/hybrid attention needs the optional `fla` kernels and is not part of softmax RxT checkpoints",
    "gma": "experimental grouped-MoE attention is not supported",
    "dma": "experimental deep-MoE attention is not supported",
}


def resolve_heads(att_type: str, att_heads: int, groups: Optional[int], query_groups: Optional[int]) -> tuple[int, int]:
    """Return `(num_query_heads, num_kv_heads)` for one attention, as the reference derives them."""
    if att_type == "mha":
        return att_heads, att_heads
    if att_type == "gqa":
        return att_heads, groups or 1
    if att_type == "mqa":
        return att_heads, 1
    # sqa: the reference requires the query groups; we read a missing value as "all heads" (plain MHA width).
    return (query_groups or att_heads), (groups or 1)


def check_attention(where: str, att_type: str, att_heads: int, embed_dim: int, groups, query_groups) -> None:
    """Validate one attention's geometry, naming the offending fields."""
    if att_type in UNSUPPORTED_ATTENTION_TYPES:
        raise NotImplementedError(f"{where}: attention type {att_type!r}: {UNSUPPORTED_ATTENTION_TYPES[att_type]}.")
    if att_type not in ATTENTION_TYPES:
        raise ValueError(f"{where}: unknown attention type {att_type!r}; expected one of {ATTENTION_TYPES}.")
    if att_heads <= 0 or embed_dim % att_heads != 0:
        raise ValueError(
            f"{where}: att_heads={att_heads} must divide embed_dim={embed_dim} (the head width is embed_dim // att_heads)."
        )
    hq, hkv = resolve_heads(att_type, att_heads, groups, query_groups)
    if hq <= 0 or hkv <= 0:
        raise ValueError(f"{where}: query heads ({hq}) and key/value heads ({hkv}) must be positive.")
    if att_type == "gqa" and att_heads % hkv != 0:
        raise ValueError(f"{where}: gqa needs att_heads={att_heads} to be a multiple of att_groups={hkv}.")
    if max(hq, hkv) % min(hq, hkv) != 0:
        raise ValueError(
            f"{where}: {att_type} with {hq} query heads and {hkv} key/value heads: the larger count must be a "
            "multiple of the smaller (key/value heads are shared by groups of queries, or queries are tiled "
            "over key/value heads when there are fewer query heads)."
        )


@dataclass
class RxTComponentConfig:
    """Options of the decoder or the encoder (reference `RxTComponentConfig`, rxlm 0.3.80 defaults)."""

    num_layers: int = 12
    vocab_size: int = 20000
    embed_dim: int = 512
    ff_dim: int = 1536
    att_heads: int = 16
    seq_len: int = 1024
    stm_size: int = 1024
    use_flash_attention: bool = False
    use_gated: bool = True
    ff_activation: str = "swish"
    ff_dropout: float = 0.0
    att_dropout: float = 0.0
    use_rms_norm: bool = True
    att_groups: int = 1
    use_moe: bool = False
    num_experts: int = 1
    num_shared_experts: int = 1
    shared_expert_dim: Optional[int] = None
    moe_top_k: int = 1
    self_att_type: str = "sqa"
    cross_att_type: str = "sqa"
    att_query_groups: Optional[int] = None
    cross_att_groups: Optional[int] = None
    cross_att_query_groups: Optional[int] = None
    use_head_norm: bool = False
    init_identity_norm: bool = False
    skip_memory_cross_attention: bool = False
    stateless_layers_config: Optional[list] = None
    final_stateless_layers_config: Optional[list] = None
    dense_layer_dim: int = 1536
    use_nope: bool = False
    head_norm_type: str = "layer_norm"
    router_amp: bool = False
    router_dtype: str = "float32"
    use_vectorized_moe: bool = True
    moe_grouped_gemm: bool = True
    moe_bias_mode: str = "global"
    moe_shared_experts_bias_mode: str = "local"
    moe_use_weighted_shared_experts: bool = False
    use_gated_attention: bool = False
    gated_attention_activation: str = "sigmoid"
    use_gated_cross_attention: Optional[bool] = None
    use_attention_output_bias: bool = True
    legacy_stm_in_encoder: bool = False
    rope_base: float = 10000.0
    # Not in the reference when False: the reference rotates the memory cross-attention's queries by their
    # token position (the memory has no positions, its keys are not rotated), so the same question scores the
    # slots differently at every position; False reads the memory by content alone.
    rope_memory_cross_attention: bool = True
    # Reference fields that only matter for hybrid/linear attention or legacy layouts; kept so that reference
    # configs round-trip, validated below.
    attn_layer_types: Optional[list] = None
    stateless_attn_layer_types: Optional[list] = None
    final_stateless_attn_layer_types: Optional[list] = None
    vectorized_moe_from_legacy: bool = False

    def __post_init__(self) -> None:
        where = "component config"
        check_attention(f"{where} self-attention", self.self_att_type, self.att_heads, self.embed_dim,
                        self.att_groups, self.att_query_groups)
        if self.has_cross_attention:
            check_attention(f"{where} memory cross-attention", self.cross_att_type, self.att_heads, self.embed_dim,
                            self.cross_att_groups or self.att_groups,
                            self.cross_att_query_groups or self.att_query_groups)
        if self.ff_activation not in FFN_ACTIVATIONS:
            raise ValueError(f"ff_activation={self.ff_activation!r} is not one of {FFN_ACTIVATIONS}.")
        if self.head_norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"head_norm_type={self.head_norm_type!r}; expected 'layer_norm' or 'rms_norm'.")
        if self.embed_dim // self.att_heads % 2 != 0 and not self.use_nope:
            raise ValueError(f"RoPE needs an even head width; embed_dim/att_heads = {self.embed_dim // self.att_heads}.")
        if self.use_moe:
            if not 1 <= self.moe_top_k <= self.num_experts:
                raise ValueError(f"moe_top_k={self.moe_top_k} must be between 1 and num_experts={self.num_experts}.")
            for name in ("moe_bias_mode", "moe_shared_experts_bias_mode"):
                if getattr(self, name) not in MOE_BIAS_MODES:
                    raise ValueError(f"{name}={getattr(self, name)!r} is not one of {MOE_BIAS_MODES}.")
            if not self.use_vectorized_moe:
                raise NotImplementedError(
                    "use_vectorized_moe=False (legacy per-expert modules): convert the checkpoint with "
                    "`from_rxlm_pretrained`, which stacks legacy experts into the vectorized layout."
                )
        for name in ("stateless_layers_config", "final_stateless_layers_config"):
            kinds = getattr(self, name) or []
            bad = [k for k in kinds if k not in ("dense", "moe")]
            if bad:
                raise ValueError(f"{name} entries must be 'dense' or 'moe', got {bad}.")
        for name in ("attn_layer_types", "stateless_attn_layer_types", "final_stateless_attn_layer_types"):
            kinds = getattr(self, name) or []
            bad = [k for k in kinds if k not in ATTENTION_TYPES]
            if bad:
                raise NotImplementedError(f"{name}: per-layer types {bad} (linear attention) are not supported.")

    @property
    def has_cross_attention(self) -> bool:
        return not self.skip_memory_cross_attention

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.att_heads

    def self_attention_heads(self) -> tuple[int, int]:
        return resolve_heads(self.self_att_type, self.att_heads, self.att_groups, self.att_query_groups)

    def cross_attention_heads(self) -> tuple[int, int]:
        return resolve_heads(self.cross_att_type, self.att_heads, self.cross_att_groups or self.att_groups,
                             self.cross_att_query_groups or self.att_query_groups)

    @property
    def gated_cross_attention(self) -> bool:
        return self.use_gated_attention if self.use_gated_cross_attention is None else self.use_gated_cross_attention


@dataclass
class RxTMemoryAttentionOptions:
    """Options of the memory attention (reference memory-attention component, rxlm 0.3.80 defaults).

    `variant` is what the weights really are. The reference's `RxTAlpha` builds self-interlayer memory
    attention for every variant name except 'grouped-self-interlayer'; `from_rxlm_pretrained` resolves that.
    """

    variant: str = "self-interlayer"
    num_layers: int = 12
    embed_dim: int = 512
    att_heads: int = 16
    seq_len: int = 1024
    stm_size: int = 1024
    use_flash_attention: bool = False
    att_dropout: float = 0.0
    att_groups: int = 1
    att_type: str = "sqa"
    att_query_groups: Optional[int] = None
    norm_type: str = "classic-rms"
    norm_init_gate: float = -2.0
    norm_per_dim_scale: bool = False
    norm_decay: float = 0.9
    use_gated_residual: bool = False
    residual_per_slot_gate: bool = True
    residual_gate_init: float = 3.0
    residual_gate_type: str = "static"
    residual_gate_slot_status_type: str = "mean"
    # Not in the reference (None = its behaviour): the slots compete for each write, G = min(1, budget x
    # softmax over slots of the gate logits), so one interaction replaces about `budget` slots' worth in all.
    residual_gate_write_budget: Optional[float] = None
    # Not in the reference (None = its behaviour): every write shifts the memory by this many slots per layer:
    # the oldest slots are dropped and the new interaction is written into fresh slots (the learned initial
    # memory's first slots), reading the rest of the memory as context. The memory then holds the last
    # stm_size / fifo_write_slots interactions, each in slots of its own that later writes do not touch.
    fifo_write_slots: Optional[int] = None
    use_tanh_residual_gate: bool = True
    rope_base: float = 10000.0
    # interlayer / self-interlayer / grouped
    interlayer_att_dropout: float = 0.0
    interlayer_att_groups: int = 1
    interlayer_att_type: str = "sqa"
    interlayer_att_query_groups: Optional[int] = None
    num_groups: int = 1
    # self
    self_att_dropout: float = 0.0
    self_att_groups: int = 1
    self_att_type: str = "sqa"
    self_att_query_groups: Optional[int] = None
    use_gate_for_self_attention: bool = False
    # simple
    disable_residual: bool = False
    # reference-only fields, accepted for round trips
    att_experts: Optional[int] = None
    att_query_experts: Optional[int] = None
    interlayer_att_experts: Optional[int] = None
    interlayer_att_query_experts: Optional[int] = None
    self_att_experts: Optional[int] = None
    self_att_query_experts: Optional[int] = None
    debug_mode: bool = False
    debug_interval: int = 10

    def __post_init__(self) -> None:
        where = f"memory attention ({self.variant})"
        if self.variant not in MEMORY_ATTENTION_VARIANTS:
            raise ValueError(f"memory attention variant {self.variant!r} is not one of {MEMORY_ATTENTION_VARIANTS}.")
        check_attention(f"{where} main attention", self.att_type, self.att_heads, self.embed_dim,
                        self.att_groups, self.att_query_groups)
        if self.variant in ("interlayer", "self-interlayer", "grouped-self-interlayer"):
            check_attention(f"{where} interlayer attention", self.interlayer_att_type, self.att_heads,
                            self.embed_dim, self.interlayer_att_groups, self.interlayer_att_query_groups)
        if self.variant == "self":
            check_attention(f"{where} self attention", self.self_att_type, self.att_heads, self.embed_dim,
                            self.self_att_groups, self.self_att_query_groups)
        if self.variant == "grouped-self-interlayer" and (self.num_groups < 1 or self.num_layers % self.num_groups):
            raise ValueError(f"{where}: num_layers={self.num_layers} must be divisible by num_groups={self.num_groups}.")
        if self.norm_type not in MEMORY_NORM_TYPES:
            raise ValueError(f"{where}: norm_type={self.norm_type!r} is not one of {MEMORY_NORM_TYPES}.")
        if self.residual_gate_type not in RESIDUAL_GATE_TYPES:
            raise ValueError(f"{where}: residual_gate_type={self.residual_gate_type!r} is not one of {RESIDUAL_GATE_TYPES}.")
        if self.residual_gate_slot_status_type not in ("mean", "linear", "pair"):
            raise ValueError(f"{where}: residual_gate_slot_status_type must be 'mean', 'linear' or 'pair', got "
                             f"{self.residual_gate_slot_status_type!r}.")
        if self.residual_gate_slot_status_type in ("linear", "pair") and not self.residual_per_slot_gate:
            raise ValueError(f"{where}: a {self.residual_gate_slot_status_type!r} slot status needs "
                             "residual_per_slot_gate=True.")

        if self.residual_gate_write_budget is not None:
            budget = self.residual_gate_write_budget
            if not 0 < budget <= self.stm_size:
                raise ValueError(f"{where}: residual_gate_write_budget must be in (0, stm_size={self.stm_size}] slots, "
                                 f"got {budget}.")
            if not (self.use_gated_residual and self.residual_per_slot_gate and not self.use_tanh_residual_gate
                    and self.residual_gate_type in ("elementwise", "linear")):
                raise ValueError(f"{where}: residual_gate_write_budget needs per-slot sigmoid gates: "
                                 "use_gated_residual=True, residual_per_slot_gate=True, use_tanh_residual_gate=False "
                                 "and residual_gate_type 'elementwise' or 'linear'.")

        if self.fifo_write_slots is not None and not (
                0 < self.fifo_write_slots < self.stm_size and self.stm_size % self.fifo_write_slots == 0):
            raise ValueError(f"{where}: fifo_write_slots must divide stm_size={self.stm_size} and be smaller, got "
                             f"{self.fifo_write_slots}.")
        if self.fifo_write_slots is not None:
            # Only the fresh slots are computed, so a gate or norm that looks across slots would see a part of them.
            across = [name for name, mixes in (
                ("residual_gate_type='linear'", self.use_gated_residual and self.residual_gate_type == "linear"),
                ("residual_per_slot_gate=False", self.use_gated_residual and self.residual_gate_type == "elementwise"
                 and not self.residual_per_slot_gate),
                ("residual_gate_write_budget", self.residual_gate_write_budget is not None),
                (f"norm_type={self.norm_type!r}", self.norm_type in ("positional", "adaptive"))) if mixes]
            if across:
                raise ValueError(f"{where}: fifo_write_slots writes only the fresh slots, so every gate and norm must "
                                 f"treat each slot on its own; {', '.join(across)} looks across slots. Use static or "
                                 "per-slot elementwise gates and a 'classic-rms', 'rms' or 'layer' norm.")

    def heads(self, kind: str = "main") -> tuple[int, int]:
        prefix = {"main": "att", "interlayer": "interlayer_att", "self": "self_att"}[kind]
        return resolve_heads(getattr(self, f"{prefix}_type"), self.att_heads, getattr(self, f"{prefix}_groups"),
                             getattr(self, f"{prefix}_query_groups"))


def _component_dict(value: Any, cls) -> dict:
    """Fill a (possibly partial) component dict with defaults and validate it."""
    if value is None:
        value = {}
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}. Known options: {sorted(known)}.")
    return dataclasses.asdict(cls(**value))


# Options added after models were saved without them, whose default is the behaviour those models were trained
# with: a config.json that lacks one of these loads with the default.
OPTIONS_WITH_SAFE_DEFAULTS = frozenset({"memory_attention_config.residual_gate_write_budget",
                                        "memory_attention_config.fifo_write_slots",
                                        "decoder_config.rope_memory_cross_attention",
                                        "encoder_config.rope_memory_cross_attention"})


def require_every_option(config_class, config_dict: dict) -> None:
    """Refuse a saved config (config.json) that lacks an option of `config_class`.

    `save_pretrained` writes every option, and a missing one would silently take today's default: a
    different `rope_base` or `ff_activation` changes the outputs, a different `embed_dim` only fails later on
    the weights' shapes. The constructor still fills defaults: that is for building new models.
    """
    params = inspect.signature(config_class.__init__).parameters
    missing = [name for name, p in params.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
               and name not in config_dict]
    for key, options_class in config_class.component_options.items():
        component = config_dict.get(key)
        if isinstance(component, dict):
            missing += [f"{key}.{f.name}" for f in dataclasses.fields(options_class) if f.name not in component]
    missing = [name for name in missing if name not in OPTIONS_WITH_SAFE_DEFAULTS]
    if missing:
        raise ValueError(
            f"the saved {config_class.__name__} (config.json) lacks {missing}: a default would silently build a "
            "different model. Add these keys with the values the weights were trained with (save_pretrained "
            "writes them all), or build the config in code, where missing options take the defaults."
        )


class RxTMemoryAttentionConfig(PretrainedConfig):
    """Config of a stand-alone memory-attention model (`RxTMemoryAttention`), e.g. a stage-3 component repo."""

    model_type = "rxt_memory_attention"
    _auto_class = "AutoConfig"  # save_pretrained copies this file next to the weights
    component_options = {"memory_attention_config": RxTMemoryAttentionOptions}

    def __init__(self, memory_attention_config: Optional[dict] = None, stm_init_type: str = "standard", **kwargs):
        self.memory_attention_config = _component_dict(memory_attention_config, RxTMemoryAttentionOptions)
        if stm_init_type not in STM_INIT_TYPES:
            raise ValueError(f"stm_init_type={stm_init_type!r} is not one of {STM_INIT_TYPES}.")
        self.stm_init_type = stm_init_type
        check_attn_implementation(kwargs.get("attn_implementation"))
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config: every option must be there (`require_every_option`)."""
        require_every_option(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    @property
    def memory_attention_options(self) -> RxTMemoryAttentionOptions:
        return RxTMemoryAttentionOptions(**self.memory_attention_config)


class RxTConfig(PretrainedConfig):
    r"""Configuration of [`RxTForConversationalGeneration`].

    Args:
        decoder_config (`dict`): decoder options ([`RxTComponentConfig`] fields; missing keys take the defaults).
        encoder_config (`dict`): encoder options ([`RxTComponentConfig`] fields). Encoders should set
            `skip_memory_cross_attention=True`.
        memory_attention_config (`dict`): memory-attention options ([`RxTMemoryAttentionOptions`] fields,
            including `variant`).
        stm_init_type (`str`): how `init_memory` fills a fresh STM: "standard" N(0, 1) (the reference),
            "normal" N(0, 0.02), "uniform" U[0, 0.02), "ones" or "zeros"; or "learned" (not in the reference):
            a trained initial memory, the memory attention's `initial_memory` parameter [L, S, D], the same for
            every new conversation, so that each slot can learn what to look for in the first interaction
            instead of starting from per-conversation noise.
        bos_token_id, eos_token_id, pad_token_id, query_token_id, answer_token_id (`int`): the interaction markers.
        think_token_id, tool_call_token_id, tool_use_token_id, internal_token_id (`int`, *optional*): RxTBeta markers.
        model_variant (`str`): "alpha" or "beta" (beta adds thinking/tool/internal markers and a system prompt title).
        router_aux_loss_coef (`float`): weight of the MoE load-balancing loss added to the LM loss in training.
    """

    model_type = "rxt"
    _auto_class = "AutoConfig"  # save_pretrained copies this file next to the weights
    keys_to_ignore_at_inference = ["past_key_values"]
    component_options = {"decoder_config": RxTComponentConfig, "encoder_config": RxTComponentConfig,
                         "memory_attention_config": RxTMemoryAttentionOptions}

    def __init__(
        self,
        decoder_config: Optional[dict] = None,
        encoder_config: Optional[dict] = None,
        memory_attention_config: Optional[dict] = None,
        stm_init_type: str = "standard",
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        pad_token_id: int = 0,
        query_token_id: int = 5,
        answer_token_id: int = 6,
        think_token_id: Optional[int] = None,
        tool_call_token_id: Optional[int] = None,
        tool_use_token_id: Optional[int] = None,
        internal_token_id: Optional[int] = None,
        model_variant: str = "alpha",
        system_prompt_title: str = "SYSTEM INSTRUCTIONS",
        router_aux_loss_coef: float = 0.01,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        encoder_defaults = {"skip_memory_cross_attention": True}
        if isinstance(encoder_config, dict):
            encoder_defaults.update(encoder_config)
            encoder_config = encoder_defaults
        elif encoder_config is None:
            encoder_config = encoder_defaults
        self.decoder_config = _component_dict(decoder_config, RxTComponentConfig)
        self.encoder_config = _component_dict(encoder_config, RxTComponentConfig)
        self.memory_attention_config = _component_dict(memory_attention_config, RxTMemoryAttentionOptions)
        if stm_init_type not in STM_INIT_TYPES:
            raise ValueError(f"stm_init_type={stm_init_type!r} is not one of {STM_INIT_TYPES}.")
        if model_variant not in ("alpha", "beta"):
            raise ValueError(f"model_variant={model_variant!r}; expected 'alpha' or 'beta'.")
        self.stm_init_type = stm_init_type
        self.query_token_id = query_token_id
        self.answer_token_id = answer_token_id
        self.think_token_id = think_token_id
        self.tool_call_token_id = tool_call_token_id
        self.tool_use_token_id = tool_use_token_id
        self.internal_token_id = internal_token_id
        self.model_variant = model_variant
        self.system_prompt_title = system_prompt_title
        self.router_aux_loss_coef = router_aux_loss_coef
        self.initializer_range = initializer_range
        self._check_components()

        dec = self.decoder_options
        # Standard names other HF code reads (generation utilities, DynamicCache, peft, accelerate).
        self.vocab_size = dec.vocab_size
        self.hidden_size = dec.embed_dim
        self.num_attention_heads = dec.att_heads
        self.num_key_value_heads = dec.self_attention_heads()[1]
        self.head_dim = dec.head_dim
        self.num_hidden_layers = self.num_decoder_self_attention_layers
        self.max_position_embeddings = dec.seq_len
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.setdefault("is_encoder_decoder", False)
        check_attn_implementation(kwargs.get("attn_implementation"))
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config: every option must be there (`require_every_option`)."""
        require_every_option(cls, config_dict)
        return super().from_dict(config_dict, **kwargs)

    def __setattr__(self, key, value):
        # The decoder and encoder share one embedding: a new `vocab_size` (`resize_token_embeddings` sets it) is
        # written into both component configs, so that the saved config rebuilds the resized model.
        if key == "vocab_size" and "decoder_config" in self.__dict__ and value is not None:
            self.decoder_config["vocab_size"] = value
            self.encoder_config["vocab_size"] = value
        super().__setattr__(key, value)

    # ----------------------------------------------------------------------------------------- views
    # Not named `decoder`/`encoder`: transformers' get_text_config() would take them for nested HF configs.
    @property
    def decoder_options(self) -> RxTComponentConfig:
        return RxTComponentConfig(**self.decoder_config)

    @property
    def encoder_options(self) -> RxTComponentConfig:
        return RxTComponentConfig(**self.encoder_config)

    @property
    def memory_attention_options(self) -> RxTMemoryAttentionOptions:
        return RxTMemoryAttentionOptions(**self.memory_attention_config)

    @property
    def num_memory_layers(self) -> int:
        return self.decoder_config["num_layers"]

    @property
    def stm_size(self) -> int:
        return self.memory_attention_config["stm_size"]

    @property
    def num_decoder_self_attention_layers(self) -> int:
        dec = self.decoder_config
        return len(dec["stateless_layers_config"] or []) + dec["num_layers"] + len(dec["final_stateless_layers_config"] or [])

    @property
    def max_interaction_length(self) -> int:
        """The longest `[BOS][Q]query[A]answer[EOS]` the decoder and encoder accept."""
        return min(self.decoder_config["seq_len"], self.encoder_config["seq_len"])

    def _check_components(self) -> None:
        dec, enc, mem = self.decoder_options, self.encoder_options, self.memory_attention_options
        if not dec.has_cross_attention:
            raise ValueError("decoder_config: the decoder needs memory cross-attention (skip_memory_cross_attention=False).")
        checks = {
            "num_layers": (dec.num_layers, enc.num_layers, mem.num_layers),
            "embed_dim": (dec.embed_dim, enc.embed_dim, mem.embed_dim),
        }
        for name, (d, e, m) in checks.items():
            if not d == e == m:
                raise ValueError(
                    f"{name} must agree across components: decoder={d}, encoder={e}, memory attention={m} "
                    "(each memory layer i is read by decoder layer i and written from encoder layer i)."
                )
        if dec.vocab_size != enc.vocab_size:
            raise ValueError(f"vocab_size must agree (shared embedding): decoder={dec.vocab_size}, encoder={enc.vocab_size}.")
        # The decoder's own stm_size is unused once the memory is shared; align it for clarity.
        self.decoder_config["stm_size"] = mem.stm_size
        special = {k: getattr(self, k) for k in ("query_token_id", "answer_token_id", "think_token_id",
                                                 "tool_call_token_id", "tool_use_token_id", "internal_token_id")}
        for name, value in special.items():
            if value is not None and not 0 <= value < dec.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary (size {dec.vocab_size}).")
