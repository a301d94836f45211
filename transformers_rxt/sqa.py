"""Sparse Query Attention (SQA) for ordinary decoder-only transformers models.

SQA (arXiv 2510.01817) keeps the head width of a model with ``H`` heads (``head_dim = hidden_size / H``) but
uses only ``H_q < H`` query heads, and ``H_kv`` key/value heads. The attention-score and value FLOPs scale
with ``H_q``, so training, prefill and encoding get up to ``H / H_q`` faster. GQA/MQA only shrink K/V and save
nothing there.

The paper's variants, for a baseline with ``H`` heads:

| variant | query heads ``H_q`` | key/value heads ``H_kv`` | attention FLOPs vs MHA/GQA |
|---|---|---|---|
| ``"sqa"``  | H / 2 | H / 4 | 1/2 |
| ``"ssqa"`` | H / 2 | H / 2 | 1/2 |
| ``"xsqa"`` | H / 4 | H / 4 | 1/4 |

Stock Llama, Qwen2 and Mistral attention already build ``q_proj``/``o_proj`` from ``num_attention_heads`` and
an explicit ``head_dim``, so SQA is a *config* change (:func:`sqa_config`) plus, for a pretrained checkpoint,
weight surgery (:func:`convert_to_sqa`). The registered ``attn_implementation="sqa"`` kernel
(:func:`sqa_attention_forward`) runs the projected q/k/v with the best available kernel: FlashAttention when
installed and usable, else PyTorch SDPA with native grouped K/V (no ``repeat_kv`` copies).

This file is also shipped as remote code, so it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging


try:  # optional: FlashAttention 2 (CUDA, fp16/bf16 only)
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a broken CUDA build; SDPA is always there
    _flash_attn_func = None


logger = logging.get_logger(__name__)

SQA_ATTN_IMPLEMENTATION = "sqa"
SQA_VARIANTS = ("sqa", "ssqa", "xsqa")

# (query-head divisor, key/value-head divisor) of the nominal head count H, per the SQA paper.
_VARIANT_DIVISORS: dict[str, tuple[int, int]] = {"sqa": (2, 4), "ssqa": (2, 2), "xsqa": (4, 4)}

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------------------
# Attention function
# ------------------------------------------------------------------------------------------------------------


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # very old torch
        return False


def _sdpa_can_use_native_gqa(query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether ``F.scaled_dot_product_attention(..., enable_gqa=True)`` keeps a fast kernel.

    On CPU the flash kernel takes grouped K/V with or without a mask (measured: no slower than repeated K/V).
    On CUDA, a grouped call *with* an explicit mask falls back to the slow math kernel, so there a copy of K/V
    (``repeat_kv``) plus the memory-efficient kernel is the faster choice; transformers' own SDPA path makes
    the same call.
    """
    if query.device.type == "cuda":
        return attention_mask is None
    return True


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, H_kv, T, D]`` -> ``[B, H_kv * n_rep, T, D]``: each K/V head repeated for its query heads."""
    if n_rep == 1:
        return hidden_states
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def _flash_usable(
    query: torch.Tensor, attention_mask: torch.Tensor | None, output_attentions: bool, kwargs: dict[str, Any]
) -> bool:
    # FlashAttention is used only for the unmasked case (pure causal prefill/training, or single-token
    # decoding without padding). Padded batches arrive as SDPA's 4D boolean mask (the mask registered for
    # "sqa" is `sdpa_mask`) and go to SDPA, which is exact for them.
    return (
        _flash_attn_func is not None
        and attention_mask is None
        and not output_attentions
        and query.is_cuda
        and query.dtype in _FLASH_DTYPES
        and query.shape[-1] <= 256
        and kwargs.get("cu_seq_lens_q") is None
    )


def sqa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for any query/key-value head geometry, registered as ``attn_implementation="sqa"``.

    Follows the transformers attention-function contract used by Llama, Qwen2, Mistral and most decoder
    models.

    Args:
        module: the calling attention module (only ``is_causal`` is read from it).
        query: ``[B, H_q, T_q, D]``, after RoPE.
        key, value: ``[B, H_kv, T_kv, D]``, after RoPE and after the KV-cache update.
        attention_mask: ``None`` (pure causal, or no mask at all when ``T_q == 1``), a boolean
            ``[B, 1, T_q, T_kv]`` mask with True = attend (built by ``sdpa_mask``, which is registered for
            "sqa"), or an additive float mask of the same shape. Padding and sliding windows are encoded in
            it.
        scaling: softmax scale, ``head_dim ** -0.5`` by default.
        dropout: attention dropout probability (the caller passes 0.0 in eval mode).
        is_causal: overrides ``module.is_causal``.
        sliding_window: window size of the layer (Mistral/Qwen2). SDPA gets the window through the mask; the
            flash path passes it to the kernel.

    Head geometries:
        * ``H_q % H_kv == 0`` (MHA, GQA, MQA, SQA, sSQA, xSQA): each K/V head serves ``H_q / H_kv`` query
          heads, grouped natively by the kernel.
        * ``H_kv % H_q == 0`` with ``H_q < H_kv`` (reverse SQA): the query heads are tiled ``H_kv / H_q``
          times (expanded head ``j`` uses query head ``j mod H_q`` and K/V head ``j``), attention runs with
          ``H_kv`` heads, and the ``H_kv / H_q`` outputs of each query head are averaged back to ``H_q`` heads
          so that the stock ``o_proj`` (input width ``H_q * D``) still fits. Stock ``sdpa``/``eager`` cannot
          run this geometry (their ``num_key_value_groups = H_q // H_kv`` is 0).

    Returns:
        ``(attn_output, None)`` with ``attn_output`` of shape ``[B, T_q, H_q, D]``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError('attn_implementation="sqa" does not support `softcap`; use "eager" for such models.')
    if kwargs.get("position_bias") is not None:
        raise ValueError('attn_implementation="sqa" does not support `position_bias`; use "sdpa" or "eager".')
    if kwargs.get("cache") is not None:
        raise ValueError(
            'attn_implementation="sqa" does not support paged caches (continuous batching); use "sdpa" '
            "there. The SQA geometry itself runs with stock kernels as long as query heads >= key/value "
            "heads."
        )
    output_attentions = bool(kwargs.get("output_attentions", False))
    if output_attentions:
        logger.warning_once(
            'attn_implementation="sqa" does not return attention weights; use "eager" for them.'
        )

    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if scaling is None:
        scaling = head_dim**-0.5
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)

    # Reverse SQA: tile the queries so that there is one query head per K/V head.
    tiles = 1
    if num_q_heads < num_kv_heads:
        if num_kv_heads % num_q_heads != 0:
            raise ValueError(
                f"SQA attention needs one head count to divide the other, got {num_q_heads} query heads and "
                f"{num_kv_heads} key/value heads."
            )
        tiles = num_kv_heads // num_q_heads
        query = query.repeat(1, tiles, 1, 1)
    elif num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"SQA attention needs the query heads ({num_q_heads}) to be a multiple of the key/value heads "
            f"({num_kv_heads}) (or, for reverse SQA, the other way round)."
        )
    groups = query.shape[1] // num_kv_heads

    # SDPA's `is_causal` is aligned top-left and flash's bottom-right: both equal the model's causal mask only
    # when T_q == T_kv. A mask-free prefill with T_kv > T_q only happens with an empty static cache, whose
    # extra slots are future positions, so they can be dropped (transformers' SDPA path does the same).
    causal = bool(is_causal and q_len > 1 and attention_mask is None)
    if causal and key.shape[2] > q_len:
        key = key[:, :, :q_len]
        value = value[:, :, :q_len]

    if _flash_usable(query, attention_mask, output_attentions, kwargs):
        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        out = _flash_attn_func(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            dropout_p=dropout,
            softmax_scale=scaling,
            causal=causal,
            window_size=window,
        )  # [B, T_q, H, D]; flash-attn groups K/V heads natively
    else:
        sdpa_kwargs: dict[str, Any] = {}
        packed = False
        if groups > 1:
            mask_shared = attention_mask is None or attention_mask.shape[1] == 1
            if q_len == 1 and mask_shared and not _is_compiling():
                # Decoding: fold each group of query heads into the "sequence" dimension, so attention runs on
                # the H_kv K/V heads directly, with neither a K/V copy nor the masked-GQA slow path.
                query = query.reshape(batch, num_kv_heads, groups, head_dim)
                packed = True
            elif _sdpa_can_use_native_gqa(query, attention_mask):
                sdpa_kwargs["enable_gqa"] = True
            else:
                key = _repeat_kv(key, groups)
                value = _repeat_kv(value, groups)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal,
            **sdpa_kwargs,
        )
        if packed:
            out = out.reshape(batch, num_kv_heads * groups, 1, head_dim)
        out = out.transpose(1, 2)  # [B, T_q, H, D]

    if tiles > 1:
        # Tiled head j = t * H_q + i belongs to query head i.
        out = out.reshape(batch, q_len, tiles, num_q_heads, head_dim).mean(dim=2)
    return out.contiguous(), None


def register_sqa_attention(name: str = SQA_ATTN_IMPLEMENTATION) -> None:
    """Registers :func:`sqa_attention_forward` as ``attn_implementation=name`` (default ``"sqa"``).

    Registers both the attention function and its mask builder: transformers builds no attention mask at all
    for an implementation missing from ``AttentionMaskInterface``, which would silently ignore padding. The
    mask is SDPA's (boolean ``[B, 1, T_q, T_kv]``, or ``None`` when SDPA's ``is_causal`` is exact). Safe to
    call any number of times.
    """
    AttentionInterface.register(name, sqa_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)


# ------------------------------------------------------------------------------------------------------------
# Attention module
# ------------------------------------------------------------------------------------------------------------


def _default_biases(config: Any) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias) of the stock attention module of ``config``'s model type."""
    if getattr(config, "model_type", None) == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))  # Llama: one flag for all four; Mistral: none
    return bias, bias


class SQAAttention(nn.Module):
    """Sparse Query Attention module, a drop-in for Llama/Qwen2/Mistral's attention modules.

    Same constructor (``config, layer_idx``), parameters (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, so
    checkpoints load either way), forward signature and return value as ``LlamaAttention``; ``H_q =
    config.num_attention_heads`` query heads and ``H_kv = config.num_key_value_heads`` key/value heads of width
    ``config.head_dim``, any geometry :func:`sqa_attention_forward` takes, reverse SQA (``H_q < H_kv``)
    included. The attention itself always runs through the registered ``"sqa"`` kernel, so this module,
    ``attn_implementation="sqa"`` on a stock model and :func:`convert_to_sqa` compute the same thing.

    The model builds the attention mask for its own ``attn_implementation``: use ``"sqa"`` (or ``"sdpa"`` /
    ``"eager"``, whose 4-D masks the kernel also takes), not a flash implementation's 2-D padding mask.

    Args:
        config: the decoder config, usually from :func:`sqa_config` (which sets the head counts and
            ``head_dim``).
        layer_idx: index of the layer (KV-cache slot, and Qwen2's per-layer sliding window).
        qkv_bias, o_proj_bias: projection biases; by default those of the stock module of the config's model
            type (Qwen2: q/k/v only; Llama: ``attention_bias``; Mistral: none).
    """

    def __init__(self, config: Any, layer_idx: int, qkv_bias: bool | None = None, o_proj_bias: bool | None = None):
        super().__init__()
        default_qkv, default_o = _default_biases(config)
        qkv_bias = default_qkv if qkv_bias is None else qkv_bias
        o_proj_bias = default_o if o_proj_bias is None else o_proj_bias
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = _head_dim(config)
        self.num_heads = int(config.num_attention_heads)
        self.num_key_value_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        sqa_head_counts(self.num_heads, "sqa", self.num_heads, self.num_key_value_heads, allow_reverse=True)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0))
        self.is_causal = True
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:  # Qwen2: a window only on "sliding_attention" layers
            self.sliding_window = config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
        else:  # Mistral: every layer; Llama: no window
            self.sliding_window = getattr(config, "sliding_window", None)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_proj_bias)
        register_sqa_attention()

    @classmethod
    def from_attention(cls, module: nn.Module, config: Any | None = None) -> "SQAAttention":
        """An ``SQAAttention`` holding ``module``'s weights (same geometry), for swapping it in place.

        ``config`` defaults to ``module.config``; the biases, device and dtype follow ``module``.
        """
        if not _is_attention_module(module):
            raise ValueError(f"{type(module).__name__} has no q_proj/k_proj/v_proj/o_proj linears to take over.")
        config = config if config is not None else module.config
        new = cls(config, module.layer_idx, qkv_bias=module.q_proj.bias is not None,
                  o_proj_bias=module.o_proj.bias is not None)
        new.to(device=module.q_proj.weight.device, dtype=module.q_proj.weight.dtype)
        new.load_state_dict(module.state_dict())  # strict: a geometry mismatch is an error naming the tensors
        return new.train(module.training)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """``LlamaAttention.forward``'s contract: ``hidden_states [B, T, hidden]`` -> ``([B, T, hidden], None)``."""
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError(
                f"SQAAttention got a {attention_mask.dim()}-D attention mask; it needs the 4-D mask that "
                "transformers builds for attn_implementation='sqa' (or 'sdpa'/'eager'). Call "
                "model.set_attn_implementation('sqa') first."
            )
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        kwargs.setdefault("sliding_window", self.sliding_window)
        out, weights = ALL_ATTENTION_FUNCTIONS[SQA_ATTN_IMPLEMENTATION](
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


# ------------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------------


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _nominal_heads(config: Any) -> int:
    """The baseline head count H. An SQA config remembers it; otherwise it is ``num_attention_heads``."""
    nominal = getattr(config, "sqa_nominal_heads", None)
    return int(nominal) if nominal else int(config.num_attention_heads)


def sqa_head_counts(
    num_heads: int,
    variant: str = "sqa",
    num_query_heads: int | None = None,
    num_key_value_heads: int | None = None,
    allow_reverse: bool = False,
) -> tuple[int, int]:
    """Returns ``(H_q, H_kv)`` of an SQA variant for a baseline with ``num_heads`` heads, checked.

    Explicit ``num_query_heads`` / ``num_key_value_heads`` override the variant's defaults.

    Raises:
        ValueError: for an unknown variant, a head count the variant's fractions do not divide, or a geometry
        that
            the stock Llama/Qwen2/Mistral attention cannot run (see :func:`sqa_config`).
    """
    variant = variant.lower()
    if variant not in _VARIANT_DIVISORS:
        raise ValueError(f"Unknown SQA variant {variant!r}; choose one of {SQA_VARIANTS}.")
    q_div, kv_div = _VARIANT_DIVISORS[variant]
    for count, div, what in ((num_query_heads, q_div, "query"), (num_key_value_heads, kv_div, "key/value")):
        if count is None and num_heads % div != 0:
            raise ValueError(
                f"Variant {variant!r} uses H/{div} {what} heads, but the model has H={num_heads} heads, "
                f"which {div} does not divide. Pass `num_query_heads` and `num_key_value_heads` explicitly."
            )
    h_q = int(num_query_heads) if num_query_heads is not None else num_heads // q_div
    h_kv = int(num_key_value_heads) if num_key_value_heads is not None else num_heads // kv_div

    if h_q < 1 or h_kv < 1:
        raise ValueError(f"SQA needs at least one query and one key/value head, got H_q={h_q}, H_kv={h_kv}.")
    if h_q > num_heads:
        raise ValueError(f"SQA uses at most H={num_heads} query heads, got H_q={h_q}.")
    if h_q < h_kv:
        if not allow_reverse:
            raise ValueError(
                f"H_q={h_q} query heads is fewer than H_kv={h_kv} key/value heads (reverse SQA). The stock "
                "Llama/Qwen2/Mistral attention computes num_key_value_groups = H_q // H_kv = 0, so the "
                "'sdpa', 'eager' and flash kernels fail on it, and the extra key/value heads would add no "
                "attention FLOPs saving anyway. Use H_kv <= H_q (e.g. variant='ssqa' for H_q == H_kv), or "
                "pass allow_reverse=True to run it with attn_implementation='sqa' only, which tiles the "
                "queries."
            )
        if h_kv % h_q != 0:
            raise ValueError(f"Reverse SQA needs H_kv ({h_kv}) to be a multiple of H_q ({h_q}).")
    elif h_q % h_kv != 0:
        raise ValueError(
            f"H_q={h_q} query heads is not a multiple of H_kv={h_kv} key/value heads. Each key/value head "
            "must serve the same number of query heads (stock modules use num_key_value_groups = "
            "H_q // H_kv, SDPA and FlashAttention require divisibility). Choose H_kv among the divisors of "
            "H_q."
        )
    return h_q, h_kv


def sqa_config(
    config: Any,
    variant: str = "sqa",
    num_query_heads: int | None = None,
    num_key_value_heads: int | None = None,
    attn_implementation: str | None = SQA_ATTN_IMPLEMENTATION,
    allow_reverse: bool = False,
) -> Any:
    """Returns a copy of a Llama/Qwen2/Mistral(-style) config with Sparse Query Attention geometry.

    The copy has ``num_attention_heads = H_q`` and ``num_key_value_heads = H_kv`` (see the module docstring
    for each variant), an explicit ``head_dim`` equal to the original one (``hidden_size / H``), so the head
    width and RoPE stay as in the baseline, and records ``sqa_variant`` and ``sqa_nominal_heads`` (H). Both
    extra fields round-trip through ``save_pretrained``/``from_pretrained``.

    Args:
        config: a decoder config with ``hidden_size``, ``num_attention_heads`` and ``num_key_value_heads``.
            If it already is an SQA config, H is taken from its ``sqa_nominal_heads``.
        variant: ``"sqa"`` (H/2 query, H/4 key/value heads), ``"ssqa"`` (H/2, H/2) or ``"xsqa"`` (H/4, H/4).
        num_query_heads: overrides the variant's query head count.
        num_key_value_heads: overrides the variant's key/value head count.
        attn_implementation: stored as the config's attention implementation (``"sqa"`` by default,
            registered on the fly); ``None`` keeps the config's. The geometry also runs with stock
            ``"sdpa"``/``"eager"``/flash, since ``H_q`` is a multiple of ``H_kv``.
        allow_reverse: allow ``H_q < H_kv`` (reverse SQA). Such a model runs only with
            ``attn_implementation="sqa"``.

    Raises:
        ValueError: for geometries the stock modules cannot express: ``H_q < H_kv`` (unless
            ``allow_reverse``), ``H_q`` not a multiple of ``H_kv``, or a config class that rejects the head
            counts.
    """
    for attr in ("hidden_size", "num_attention_heads"):
        if not hasattr(config, attr):
            raise ValueError(
                f"sqa_config expects a decoder config with `{attr}`; got {type(config).__name__}."
            )
    num_heads = _nominal_heads(config)
    head_dim = _head_dim(config)
    h_q, h_kv = sqa_head_counts(num_heads, variant, num_query_heads, num_key_value_heads, allow_reverse)

    values = {
        "num_attention_heads": h_q,
        "num_key_value_heads": h_kv,
        "head_dim": head_dim,
        "sqa_variant": variant.lower(),
        "sqa_nominal_heads": num_heads,
    }
    new_config = copy.deepcopy(config)
    for key, val in values.items():
        setattr(new_config, key, val)
    # Re-run the class's own checks (e.g. LlamaConfig's `hidden_size % num_attention_heads`), so an invalid
    # geometry fails here and not at model construction.
    validate = getattr(new_config, "validate", None)
    if callable(validate):
        try:
            validate()
        except Exception as err:  # huggingface_hub's StrictDataclassClassValidationError, or ValueError
            raise ValueError(
                f"{type(config).__name__} rejects the SQA geometry H_q={h_q}, H_kv={h_kv}, "
                f"head_dim={head_dim}: {err}"
            ) from err

    if h_q < h_kv and (attn_implementation or config._attn_implementation) != SQA_ATTN_IMPLEMENTATION:
        raise ValueError("Reverse SQA (H_q < H_kv) runs only with attn_implementation='sqa'.")
    if attn_implementation is not None:
        if attn_implementation == SQA_ATTN_IMPLEMENTATION:
            register_sqa_attention()
        new_config._attn_implementation = attn_implementation
    return new_config


def theoretical_speedup(config: Any) -> float:
    """Attention-score FLOPs of the baseline (H heads) over this config's (H_q heads): ``H / H_q``."""
    return _nominal_heads(config) / config.num_attention_heads


# ------------------------------------------------------------------------------------------------------------
# Converting pretrained MHA/GQA checkpoints
# ------------------------------------------------------------------------------------------------------------


def _is_attention_module(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, name, None), nn.Linear)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    )


def _head_plan(
    h_src: int, kv_src: int, h_q: int, h_kv: int, method: str
) -> tuple[list[list[int]], list[list[int]]]:
    """Which source heads make each target head.

    Returns ``(q_groups, kv_groups)``: target query head ``i`` is built from source query heads
    ``q_groups[i]``, target K/V head ``m`` from source K/V heads ``kv_groups[m]`` (one head when selecting or
    duplicating, a block when pooling). Source query heads are cut into ``H_q`` contiguous blocks of ``H /
    H_q``; source K/V heads into ``H_kv`` blocks (or duplicated when the target has more K/V heads than the
    source). Contiguous blocks keep each target query head with (a block containing) the K/V head its source
    heads were trained with.
    """
    if h_src % h_q != 0:
        raise ValueError(f"convert_to_sqa needs H_q ({h_q}) to divide the model's {h_src} query heads.")
    if h_kv <= kv_src:
        if kv_src % h_kv != 0:
            raise ValueError(
                f"convert_to_sqa needs H_kv ({h_kv}) to divide the model's {kv_src} key/value heads."
            )
        step = kv_src // h_kv
        kv_blocks = [list(range(m * step, (m + 1) * step)) for m in range(h_kv)]
    else:
        if h_kv % kv_src != 0:
            raise ValueError(
                f"convert_to_sqa needs the model's {kv_src} key/value heads to divide H_kv ({h_kv}) when "
                "adding key/value heads."
            )
        dup = h_kv // kv_src
        kv_blocks = [[m // dup] for m in range(h_kv)]

    kv_groups = kv_blocks if method == "pool" else [[block[0]] for block in kv_blocks]

    r = h_src // h_q
    src_group = h_src // kv_src  # source query heads per source K/V head
    tgt_group = max(h_q // h_kv, 1)
    q_groups = []
    for i in range(h_q):
        block = list(range(i * r, (i + 1) * r))
        if method == "pool":
            q_groups.append(block)
        else:
            # Prefer a source head that was trained with the K/V head this target head will use.
            kv_head = kv_groups[min(i // tgt_group, h_kv - 1)][0]
            matching = [j for j in block if j // src_group == kv_head]
            q_groups.append([(matching or block)[0]])
    return q_groups, kv_groups


def _gather_heads(
    weight: torch.Tensor, bias: torch.Tensor | None, groups: list[list[int]], head_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of a q/k/v projection, per target head: the mean of the listed source heads' rows."""
    out_features, in_features = weight.shape
    w = weight.reshape(out_features // head_dim, head_dim, in_features)
    new_w = torch.stack([w[g].mean(dim=0) for g in groups]).reshape(len(groups) * head_dim, in_features)
    new_b = None
    if bias is not None:
        b = bias.reshape(-1, head_dim)
        new_b = torch.stack([b[g].mean(dim=0) for g in groups]).reshape(-1)
    return new_w, new_b


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    layer.weight.data.copy_(weight)
    if bias is not None:
        layer.bias.data.copy_(bias)
    layer.weight.requires_grad_(old.weight.requires_grad)
    return layer


@torch.no_grad()
def convert_to_sqa(
    model: nn.Module,
    variant: str = "sqa",
    num_query_heads: int | None = None,
    num_key_value_heads: int | None = None,
    method: str = "select",
    attn_implementation: str | None = SQA_ATTN_IMPLEMENTATION,
) -> nn.Module:
    """Turns a pretrained MHA/GQA Llama/Qwen2/Mistral(-style) model into SQA geometry, in place.

    A starting point for up-training, not a free lunch: removing query heads changes the function, and the
    loss jumps (measured in ``benchmarks/RESULTS_sqa.md``) until the model is trained further.

    Method (``H`` source query heads, ``H_q`` target; the same for K/V heads when the variant reduces them):

    * The ``H`` source query heads are cut into ``H_q`` contiguous blocks of ``H / H_q`` heads.
    * ``method="select"`` keeps one head per block: ``q_proj`` rows and the matching ``o_proj`` input columns
      of that head are copied; the other heads of the block are dropped (head pruning). Where possible the
      kept head is one that was trained with the K/V head it keeps using.
    * ``method="pool"`` averages the block's ``q_proj`` rows (and biases) into one head, and *sums* the
      block's ``o_proj`` column blocks: if the block's heads attended alike, the summed projection reproduces
      their combined contribution.
    * K/V heads: fewer target K/V heads are selected (first of each block) or mean-pooled (as in GQA
      up-training); more target K/V heads than the source has (e.g. a GQA model with H/8 K/V heads to sSQA's
      H/2) are made by duplicating each source K/V head, which is exact.

    RoPE rotates every head alike, so pooled query heads stay RoPE-consistent.

    Args:
        model: a ``PreTrainedModel`` (or any module) whose attention modules have ``q_proj``, ``k_proj``,
            ``v_proj`` and ``o_proj`` linears; converted in place and returned.
        variant, num_query_heads, num_key_value_heads: the target geometry, as in :func:`sqa_config`.
        method: ``"select"`` or ``"pool"``.
        attn_implementation: switched to on the model (``"sqa"`` by default); ``None`` keeps the current one.

    Returns:
        The same model, with a new ``model.config`` of the SQA geometry (the old config object is left
        unchanged).
    """
    if method not in ("select", "pool"):
        raise ValueError(f"method must be 'select' or 'pool', got {method!r}.")
    config = model.config
    new_config = sqa_config(config, variant, num_query_heads, num_key_value_heads, attn_implementation=None)
    h_src = int(config.num_attention_heads)
    kv_src = int(getattr(config, "num_key_value_heads", None) or h_src)
    h_q, h_kv = new_config.num_attention_heads, new_config.num_key_value_heads
    head_dim = new_config.head_dim
    q_groups, kv_groups = _head_plan(h_src, kv_src, h_q, h_kv, method)

    converted = 0
    for module in model.modules():
        if not _is_attention_module(module):
            continue
        if module.q_proj.out_features != h_src * head_dim or module.k_proj.out_features != kv_src * head_dim:
            raise ValueError(
                f"{type(module).__name__} has q/k projections of {module.q_proj.out_features}/"
                f"{module.k_proj.out_features} features, expected {h_src}x{head_dim}/{kv_src}x{head_dim} "
                "from the config. Convert before wrapping the model (e.g. before peft)."
            )
        q_w, q_b = _gather_heads(module.q_proj.weight, module.q_proj.bias, q_groups, head_dim)
        k_w, k_b = _gather_heads(module.k_proj.weight, module.k_proj.bias, kv_groups, head_dim)
        v_w, v_b = _gather_heads(module.v_proj.weight, module.v_proj.bias, kv_groups, head_dim)
        o = module.o_proj.weight  # [hidden, H * head_dim]
        o_heads = o.reshape(o.shape[0], h_src, head_dim)
        o_w = torch.stack([o_heads[:, g].sum(dim=1) for g in q_groups], dim=1).reshape(
            o.shape[0], h_q * head_dim
        )

        module.q_proj = _new_linear(module.q_proj, q_w, q_b)
        module.k_proj = _new_linear(module.k_proj, k_w, k_b)
        module.v_proj = _new_linear(module.v_proj, v_w, v_b)
        module.o_proj = _new_linear(module.o_proj, o_w, module.o_proj.bias)
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = h_q // h_kv
        for attr, val in (("num_heads", h_q), ("num_attention_heads", h_q), ("num_key_value_heads", h_kv)):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, val)
        converted += 1
    if converted == 0:
        raise ValueError(
            f"convert_to_sqa found no q_proj/k_proj/v_proj/o_proj attention modules in {type(model)}."
        )

    # The model and its submodules share one config object, which other models may share too (e.g. a model
    # built from another's config): point them all at the new config instead of mutating the old one.
    for sub in model.modules():
        if getattr(sub, "config", None) is config:
            sub.config = new_config
    config = new_config
    if attn_implementation is not None:
        if attn_implementation == SQA_ATTN_IMPLEMENTATION:
            register_sqa_attention()
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn_implementation)
        else:
            config._attn_implementation = attn_implementation
    return model


__all__ = [
    "SQA_ATTN_IMPLEMENTATION",
    "SQA_VARIANTS",
    "SQAAttention",
    "convert_to_sqa",
    "register_sqa_attention",
    "sqa_attention_forward",
    "sqa_config",
    "sqa_head_counts",
    "theoretical_speedup",
]
