"""PyTorch Reactive Transformer (RxT).

An RxT model is three components around a Short-Term Memory (STM):

    query ──► decoder (causal self-attention + memory cross-attention reading STM_{t-1}) ──► answer
    [BOS][Q]query[A]answer[EOS] ──► encoder ──► ED (every layer's output)
    (STM_{t-1}, ED) ──► memory attention ──► STM_t

The model itself is stateless: the memory lives in an `STMCache` the caller owns. Submodule names follow
the reference implementation (rxlm 0.3.80) so that its checkpoints map by prefix; the maths follows
`architecture.md` (interleaved RoPE, SQA head layouts, MoE routing, memory norms and residual gates).

This file is copied next to the weights by `save_pretrained` (remote code): it imports torch,
transformers and its two sibling files only. The rxlm checkpoint loader (`conversion/rxlm.py`) and rxlm's
`interact` API (`interaction_rxt.RxTInteractor`) are not part of the model: `from_rxlm_pretrained` and the
delegating `interact`-style methods import them from the installed package when called.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CompileConfig, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.utils import logging

from .cache_rxt import STMCache, init_memory_tensor
from .configuration_rxt import (
    RxTComponentConfig,
    RxTConfig,
    RxTMemoryAttentionConfig,
    RxTMemoryAttentionOptions,
    check_attn_implementation,
)

logger = logging.get_logger(__name__)

# torch.nn.RMSNorm(eps=None) upcasts to fp32 and uses the fp32 epsilon whatever the input dtype (measured
# on torch 2.13); the reference builds every RMSNorm that way.
RMS_EPS = torch.finfo(torch.float32).eps
MEMORY_NORM_EPS = 1e-6


# ============================================================================================= basics
class RxTRMSNorm(nn.Module):
    """RMSNorm with fp32 internal maths and the fp32 epsilon, as the reference's `nn.RMSNorm(dim)`."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the casts below would be no-ops (36 per decode step)
            return F.rms_norm(x, (x.shape[-1],), self.weight, RMS_EPS)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), RMS_EPS).to(x.dtype)


def make_norm(dim: int, use_rms: bool) -> nn.Module:
    return RxTRMSNorm(dim) if use_rms else nn.LayerNorm(dim, eps=1e-5)


def make_activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU(), "gelu": nn.GELU(), "swish": nn.SiLU(), "silu": nn.SiLU(),
        "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "linear": nn.Identity(),
    }[name]


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B or 1, 1, T, hd] for `positions` ([B, T] or [T]), laid out for the interleaved pairs: cos once
    per element of a pair (c0, c0, c1, c1, ...), sin with the sign of its term (-s0, s0, -s1, s1, ...).

    The angles are cast to the activation dtype before cos/sin, as the reference does (this matters for bf16
    parity). Computed once per forward and shared by every attention of a component.
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    angles = angles.to(dtype)
    if angles.dim() == 2:
        angles = angles[None]
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1)[:, None], torch.stack((-sin, sin), dim=-1).flatten(-2)[:, None]


def apply_rope(x: torch.Tensor, positions, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of `x` [B, H, T, hd] by angle position * inv_freq[i].

    `positions` is a position tensor or the `(cos, sin)` pair from `rope_tables`. `x * cos + swapped * sin`, with
    each pair's elements swapped, is (x[2i] c - x[2i+1] s, x[2i+1] c + x[2i] s): the rotation's products and sums,
    bit for bit (negation is exact, addition commutes), in three elementwise ops rather than six and a stack.
    """
    cos, sin = positions if isinstance(positions, tuple) else rope_tables(positions, inv_freq, x.dtype)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos + swapped * sin


# ============================================================================================= attention
def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, **kwargs):
    """"eager" in transformers' attention-function contract (each transformers modeling file writes its own).

    `query` [B, H, T, hd], `key`/`value` [B, Hkv, S, hd] (each K/V head serves H / Hkv contiguous query heads),
    `attention_mask` bool (True = attend) or additive float, broadcastable to [B, H, T, S]. Returns the output
    [B, T, H, hd] and the attention weights.
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2)
    scores = scores / math.sqrt(query.shape[-1]) if scaling is None else scores * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = F.dropout(scores.softmax(-1), p=dropout)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def causal_mask(query_length: int, key_length: int, device) -> torch.Tensor:
    """bool [1, 1, T, S], True = attend: the T queries are the last T of the S keys."""
    mask = torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(key_length - query_length)
    return mask[None, None]


def flex_block_mask(mask: torch.Tensor, batch: int, query_length: int, key_length: int):
    """A bool mask (True = attend, broadcastable to [B, 1, T, S]) as the `BlockMask` flex attention takes.

    A BlockMask rather than an additive tensor: flex adds a tensor mask inside a `score_mod` that reads it, which
    crashes the compiled CPU kernel of torch 2.13 (measured: heap corruption); a `mask_mod` does not.
    """
    from torch.nn.attention.flex_attention import create_block_mask  # only where flex_attention is asked for

    keep = mask.expand(batch, 1, query_length, key_length).contiguous()
    return create_block_mask(lambda b, h, q, kv: keep[b, 0, q, kv], batch, None, query_length, key_length,
                             device=mask.device)


class RxTAttention(nn.Module):
    """Multi-head attention with the reference's four layouts (mha, gqa, mqa, sqa).

    * more query than key/value heads: key/value heads are shared by contiguous groups of query heads;
    * fewer query than key/value heads (reverse SQA): the query heads are tiled over the key/value heads and
      the output has as many heads as keys/values;
    * optional sigmoid output gate on the concatenated heads (`use_gated_attention`).

    `rope` says which side is rotated: "qk" (self-attention), "q" (memory cross-attention),
    "k" (memory attention write), or None.

    The attention itself is the function `config._attn_implementation` names in transformers' attention interface
    (`ALL_ATTENTION_FUNCTIONS`: "sdpa", "flash_attention_2", "flex_attention", "sqa", ...), or `eager_attention_forward`.
    `config` is the owning model's config, bound by `RxTPreTrainedModel`; a module outside a model uses SDPA.
    """

    def __init__(self, embed_dim: int, att_heads: int, num_query_heads: int, num_kv_heads: int, *,
                 rope: Optional[str], rope_base: float = 10000.0, output_bias: bool = True, gated: bool = False,
                 gate_activation: str = "sigmoid", dropout: float = 0.0):
        super().__init__()
        self.head_dim = embed_dim // att_heads
        self.num_query_heads = num_query_heads
        self.num_kv_heads = num_kv_heads
        self.num_output_heads = max(num_query_heads, num_kv_heads)
        self.num_key_value_groups = self.num_output_heads // num_kv_heads  # read by transformers' kernels
        self.is_causal = False  # every call passes `is_causal`; this is only the kernels' fallback
        self.config = None
        self.rope = rope
        self.rope_base = rope_base
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, num_query_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.num_output_heads * self.head_dim, embed_dim, bias=output_bias)
        self.gate_proj = nn.Linear(embed_dim, self.num_output_heads * self.head_dim, bias=False) if gated else None
        self.gate_activation = make_activation(gate_activation) if gated else None
        # Rebuilt by _init_weights after from_pretrained (non-persistent buffers come back as garbage otherwise).
        self.register_buffer("inv_freq", rope_inv_freq(self.head_dim, rope_base), persistent=False)

    @property
    def attn_implementation(self) -> str:
        impl = None if self.config is None else self.config._attn_implementation
        return impl or "sdpa"

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def project_kv(self, states: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """Key/value heads [B, Hkv, T, hd] of `states` (keys rotated when this attention rotates keys)."""
        k = self._heads(self.k_proj(states), self.num_kv_heads)
        v = self._heads(self.v_proj(states), self.num_kv_heads)
        if self.rope in ("qk", "k"):
            k = apply_rope(k, positions, self.inv_freq)
        return k, v

    def forward(self, hidden: torch.Tensor, kv_states: Optional[torch.Tensor] = None, *,
                positions: Optional[torch.Tensor] = None, kv_positions: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                key_value: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[Cache] = None, cache_layer: Optional[int] = None) -> torch.Tensor:
        """Attend from `hidden` [B, T, D] to `kv_states` (self-attention when None) or to precomputed `key_value`.

        `mask` is a bool [B, 1, T or 1, S] (True = attend). `cache`/`cache_layer` append this step's keys and
        values to a transformers `Cache` (decoder self-attention during generation).
        """
        q = self._heads(self.q_proj(hidden), self.num_query_heads)
        if self.rope in ("qk", "q"):
            q = apply_rope(q, positions, self.inv_freq)
        if key_value is None:
            source = hidden if kv_states is None else kv_states
            key_value = self.project_kv(source, positions if kv_positions is None else kv_positions)
        k, v = key_value
        if cache is not None:
            k, v = cache.update(k, v, cache_layer)
        if self.num_query_heads < self.num_kv_heads:
            # Reverse SQA: expanded head j reads query head j mod Hq (the whole block is repeated).
            q = q.repeat(1, self.num_kv_heads // self.num_query_heads, 1, 1)
        attn = self._attend(q, k, v, mask, is_causal).flatten(2)  # [B, T, Hout * hd]
        if self.gate_proj is not None:
            attn = attn * self.gate_activation(self.gate_proj(hidden))
        return self.out_proj(attn)

    def _attend(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """The attention function of `attn_implementation`, given the mask in the form it takes. [B, T, H, hd]"""
        impl = self.attn_implementation
        if impl.startswith("flash_attention") and (mask is not None or not q.is_cuda
                                                   or q.dtype not in (torch.float16, torch.bfloat16)):
            # Flash takes neither fp32 nor RxT's 4-D masks (padded batches, the encoder's and memory attention's
            # key masks); SDPA computes those exactly.
            impl = "sdpa"
        if impl in ("eager", "flex_attention") and is_causal and mask is None:
            mask = causal_mask(q.shape[2], k.shape[2], q.device)  # neither takes `is_causal`
        if impl == "flex_attention" and mask is not None:
            mask = flex_block_mask(mask, q.shape[0], q.shape[2], k.shape[2])
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        out, _ = attention(self, q, k, v, mask, dropout=self.dropout if self.training else 0.0, scaling=None,
                           is_causal=is_causal)
        return out


# ============================================================================================= feed-forward
class RxTFeedForward(nn.Module):
    """fc1 -> act -> fc2 (biases on both)."""

    def __init__(self, dim: int, hidden: int, activation: str, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class RxTGatedLinearUnit(nn.Module):
    """One Linear D -> 2F whose output splits as [linear | gate]; the activation applies to the gate half."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * hidden, bias=bias)
        self.act = make_activation(activation)

    def forward(self, x):
        lin, gate = self.linear(x).chunk(2, dim=-1)
        return lin * self.act(gate)


class RxTGatedFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = RxTGatedLinearUnit(dim, hidden, activation, bias)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.dropout(self.fc1(x)))


def make_dense_ffn(dim: int, hidden: int, gated: bool, activation: str, dropout: float, bias: bool = True):
    cls = RxTGatedFeedForward if gated else RxTFeedForward
    return cls(dim, hidden, activation, dropout, bias)


class RxTRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)


def selected_mm_experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """An experts function (transformers' signature) that runs only the chosen experts: for every (token, expert)
    pair, the token's row times views of that expert's weights. The routing is read on the host (no cost on CPU,
    a sync on an accelerator), so few pairs are cheap and no weight is gathered into a copy."""
    rows = []
    for token, experts in enumerate(top_k_index.tolist()):
        x = hidden_states[token:token + 1]
        for e in experts:
            h = x @ module.gate_up_proj[e]
            if module.has_bias:
                h = h + module.gate_up_proj_bias[e]
            h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
            out = h @ module.down_proj[e]
            rows.append(out + module.down_proj_bias[e] if module.has_bias else out)
    weighted = torch.cat(rows) * top_k_weights.reshape(-1, 1)
    return weighted.view(hidden_states.shape[0], top_k_index.shape[-1], -1).sum(dim=1).to(hidden_states.dtype)


class RxTMoeFeedForward(nn.Module):
    """Mixture of experts with optional shared experts (the reference's stacked layout).

    Routed expert weights are stored in-by-out (`w1` [E, D, 2F or F], `w2` [E, F, D]). Routing: softmax
    over all experts, top-k, renormalise. Output = sum_k w_k expert_k(x) + global bias + shared expert(s).

    The routed experts run through transformers' experts functions (`transformers.integrations.moe`): tokens
    sorted by expert and two grouped matmuls (`"grouped_mm"`), or each (token, expert) pair's weights gathered
    for a batched matmul (`"batched_mm"`). Neither loops over experts in Python nor reads the routing back to the
    host. The attributes below (`has_gate`, `is_transposed`, `gate_up_proj`, ...) are the interface those
    functions read. `"selected_mm"` runs only the chosen experts, one matmul pair per (token, expert) on views of
    their weights: it reads the routing on the host. The default, `"auto"`, takes it for a CPU decode step (at
    most `num_experts` token-expert pairs, not under `torch.compile`), where the CPU `grouped_mm` runs a matmul
    for every expert, empty ones included, and `"grouped_mm"` everywhere else.
    """

    experts_implementations = ("auto", "grouped_mm", "batched_mm", "selected_mm")
    is_transposed = True  # w1/w2 are [E, in, out]
    has_post_expert_norm = False
    _is_expert_parallel = False

    def __init__(self, cfg: RxTComponentConfig):
        super().__init__()
        dim, hidden, experts = cfg.embed_dim, cfg.ff_dim, cfg.num_experts
        self.num_experts, self.top_k, self.gated = experts, cfg.moe_top_k, cfg.use_gated
        self.has_gate = cfg.use_gated
        self.num_shared = cfg.num_shared_experts
        self.weighted_shared = cfg.moe_use_weighted_shared_experts
        self.router_dtype = getattr(torch, cfg.router_dtype) if cfg.router_amp else None
        self.act = make_activation(cfg.ff_activation)
        self.dropout = nn.Dropout(cfg.ff_dropout)
        in_width = 2 * hidden if cfg.use_gated else hidden
        self.router = RxTRouter(dim, experts)
        self.w1 = nn.Parameter(torch.empty(experts, dim, in_width))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.bias_mode = cfg.moe_bias_mode
        self.has_bias = self.bias_mode == "local"
        if self.bias_mode == "global":
            self.global_bias = nn.Parameter(torch.zeros(dim))
        elif self.bias_mode == "local":
            self.b1 = nn.Parameter(torch.zeros(experts, in_width))
            self.b2 = nn.Parameter(torch.zeros(experts, dim))
        self.experts_implementation = "auto"
        shared_hidden = cfg.shared_expert_dim or hidden
        shared_bias = cfg.moe_shared_experts_bias_mode
        if self.num_shared == 1:
            self.shared_expert = make_dense_ffn(dim, shared_hidden, cfg.use_gated, cfg.ff_activation,
                                                cfg.ff_dropout, bias=shared_bias == "local")
        elif self.num_shared > 1:
            shared_in = 2 * shared_hidden if cfg.use_gated else shared_hidden
            self.shared_w1 = nn.Parameter(torch.empty(self.num_shared, dim, shared_in))
            self.shared_w2 = nn.Parameter(torch.empty(self.num_shared, shared_hidden, dim))
            if shared_bias == "local":
                self.shared_b1 = nn.Parameter(torch.zeros(self.num_shared, shared_in))
                self.shared_b2 = nn.Parameter(torch.zeros(self.num_shared, dim))
            self.shared_expert_gate = nn.Linear(dim, self.num_shared, bias=False)
        if self.num_shared >= 1 and shared_bias == "global":
            self.shared_experts_bias = nn.Parameter(torch.zeros(dim))

    # --- the names transformers' experts functions read (views of the stored parameters, no copies)
    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.w1

    up_proj = gate_up_proj

    @property
    def down_proj(self) -> torch.Tensor:
        return self.w2

    @property
    def gate_up_proj_bias(self) -> Optional[torch.Tensor]:
        return self.b1 if self.has_bias else None

    up_proj_bias = gate_up_proj_bias

    @property
    def down_proj_bias(self) -> Optional[torch.Tensor]:
        return self.b2 if self.has_bias else None

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        lin, gate = h.chunk(2, dim=-1)  # the reference's order: linear half first, gate second
        return self.dropout(lin * self.act(gate))

    def act_fn(self, h: torch.Tensor) -> torch.Tensor:  # the ungated expert's activation (+ dropout)
        return self.dropout(self.act(h))

    def set_experts_implementation(self, name: str) -> None:
        if name not in self.experts_implementations:
            raise ValueError(f"Unknown experts implementation {name!r}; choose one of {self.experts_implementations}.")
        self.experts_implementation = name

    def _expert(self, x, w1, w2, b1=None, b2=None):
        """One dense expert (the stacked shared experts)."""
        h = x @ w1
        if b1 is not None:
            h = h + b1
        h = self._apply_gate(h) if self.gated else self.act_fn(h)
        out = h @ w2
        return out if b2 is None else out + b2

    def _experts_function(self, tokens: int):
        impl = self.experts_implementation
        if impl == "auto":
            # Under torch.compile the routing can be read as integers only when dynamo captures scalar outputs
            # (RxT's compiled decode step turns it on: `get_compiled_call`).
            readable = not torch.compiler.is_compiling() or torch._dynamo.config.capture_scalar_outputs
            decode_step = tokens * self.top_k <= self.num_experts and self.w1.device.type == "cpu" and readable
            impl = "selected_mm" if decode_step else "grouped_mm"
        return selected_mm_experts_forward if impl == "selected_mm" else ALL_EXPERTS_FUNCTIONS[impl]

    def route(self, x: torch.Tensor):
        logits = self.router.gate(x)
        if self.router_dtype is not None:
            logits = logits.to(self.router_dtype)
        probs = logits.softmax(dim=-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)
        top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-9)
        return probs, top_w.to(x.dtype), top_idx

    def forward(self, x: torch.Tensor):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, top_w, top_idx = self.route(flat)
        if self.num_shared and self.weighted_shared:
            top_w = top_w * (self.top_k / (self.top_k + self.num_shared))
        out = self._experts_function(flat.shape[0])(self, flat, top_idx, top_w)
        if self.bias_mode == "global":
            out = out + self.global_bias
        shared_gate_loss = None
        if self.num_shared == 1:
            shared = self.shared_expert(flat)
        elif self.num_shared > 1:
            gate = self.shared_expert_gate(flat).softmax(dim=-1)  # [N, S_e]
            has_bias = hasattr(self, "shared_b1")
            shared = sum(
                gate[:, s, None] * self._expert(flat, self.shared_w1[s], self.shared_w2[s],
                                                self.shared_b1[s] if has_bias else None,
                                                self.shared_b2[s] if has_bias else None)
                for s in range(self.num_shared)
            )
            shared_gate_loss = (gate - 1.0 / self.num_shared).abs().mean()
        if self.num_shared:
            if hasattr(self, "shared_experts_bias"):
                shared = shared + self.shared_experts_bias
            if self.weighted_shared:
                shared = shared * (self.num_shared / (self.top_k + self.num_shared))
            out = out + shared
        aux = self._load_balancing_loss(probs, top_idx) if self.training else None
        if aux is not None and shared_gate_loss is not None:
            aux = aux + shared_gate_loss
        return out.reshape(shape), aux

    def _load_balancing_loss(self, probs: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        """The reference's aux loss: E * sum_e f_e * mean prob of e over the tokens that picked e."""
        picked = F.one_hot(top_idx, self.num_experts).sum(dim=1).to(probs.dtype)  # [N, E]
        counts = picked.sum(dim=0)
        frac = counts / (probs.shape[0] * self.top_k + 1e-6)
        mean_prob = (probs * picked).sum(dim=0) / counts.clamp(min=1e-6)
        return self.num_experts * (frac * mean_prob).sum()


# ============================================================================================= decoder / encoder
class RxTLayer(GradientCheckpointingLayer):
    """Pre-norm block: self-attention, optional memory cross-attention, FFN or MoE.

    A `GradientCheckpointingLayer`: with `model.gradient_checkpointing_enable()` its activations are recomputed in
    the backward pass (training only; the KV cache is then dropped, as for every transformers layer).
    """

    def __init__(self, cfg: RxTComponentConfig, *, causal: bool, cross_attention: bool, ffn: str = "main"):
        super().__init__()
        dim = cfg.embed_dim
        hq, hkv = cfg.self_attention_heads()
        rope = None if cfg.use_nope else "qk"
        self.causal = causal
        self.attention = RxTAttention(dim, cfg.att_heads, hq, hkv, rope=rope, rope_base=cfg.rope_base,
                                      output_bias=cfg.use_attention_output_bias, gated=cfg.use_gated_attention,
                                      gate_activation=cfg.gated_attention_activation, dropout=cfg.att_dropout)
        if cross_attention:
            cq, ckv = cfg.cross_attention_heads()
            self.memory_cross_attention = RxTAttention(
                dim, cfg.att_heads, cq, ckv, rope=None if cfg.use_nope or not cfg.rope_memory_cross_attention else "q",
                rope_base=cfg.rope_base,
                output_bias=cfg.use_attention_output_bias, gated=cfg.gated_cross_attention,
                gate_activation=cfg.gated_attention_activation, dropout=cfg.att_dropout)
        else:
            self.memory_cross_attention = None
        if ffn == "dense":  # stateless 'dense' layers: a gated FFN of their own width, never MoE
            self.ff = make_dense_ffn(dim, cfg.dense_layer_dim, True, cfg.ff_activation, cfg.ff_dropout)
        elif cfg.use_moe:
            self.ff = RxTMoeFeedForward(cfg)
        else:
            self.ff = make_dense_ffn(dim, cfg.ff_dim, cfg.use_gated, cfg.ff_activation, cfg.ff_dropout)
        self.norm1 = make_norm(dim, cfg.use_rms_norm)
        self.norm3 = make_norm(dim, cfg.use_rms_norm)
        if cross_attention:
            self.norm2 = make_norm(dim, cfg.use_rms_norm)
            self.stm_norm = make_norm(dim, cfg.use_rms_norm)

    def memory_key_value(self, stm_layer: torch.Tensor):
        """Cross-attention keys/values of one STM layer [B, S, D] (computed once per turn)."""
        return self.memory_cross_attention.project_kv(self.stm_norm(stm_layer))

    def forward(self, x, *, positions, self_mask, is_causal, pad=None, memory_kv=None, past_key_values=None,
                cache_layer=None):
        # `x` stays positional: the checkpointing wrapper recomputes from positional inputs; `past_key_values` is
        # the name it drops under checkpointing.
        h = x + self.attention(self.norm1(x), positions=positions, mask=self_mask, is_causal=is_causal,
                               cache=past_key_values, cache_layer=cache_layer)
        if self.memory_cross_attention is not None and memory_kv is not None:
            query = self.norm2(h)
            if pad is not None:
                query = query * pad
            h = h + self.memory_cross_attention(query, positions=positions, key_value=memory_kv)
        out = self.ff(self.norm3(h))
        aux = None
        if isinstance(out, tuple):
            out, aux = out
        return h + out, aux


class RxTDecoder(nn.Module):
    """Stateless layers, memory layers (layer i reads STM layer i), final stateless layers, head norm (the LM head
    is `RxTForConversationalGeneration.lm_head`)."""

    def __init__(self, cfg: RxTComponentConfig):
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(RxTLayer(cfg, causal=True, cross_attention=True) for _ in range(cfg.num_layers))
        if cfg.use_head_norm:
            self.head_norm = (nn.LayerNorm(cfg.embed_dim, eps=1e-5) if cfg.head_norm_type == "layer_norm"
                              else RxTRMSNorm(cfg.embed_dim))
        else:
            self.head_norm = None

        def stateless(kinds):
            if not kinds:
                return None
            return nn.ModuleList(RxTLayer(cfg, causal=True, cross_attention=False, ffn=k if k == "dense" else "main")
                                 for k in kinds)

        self.stateless_layers = stateless(cfg.stateless_layers_config)
        self.final_stateless_layers = stateless(cfg.final_stateless_layers_config)

    def ordered_layers(self):
        """(layer, memory layer index or None) in forward order; the index of each is its KV-cache slot."""
        for layer in self.stateless_layers or []:
            yield layer, None
        for i, layer in enumerate(self.layers):
            yield layer, i
        for layer in self.final_stateless_layers or []:
            yield layer, None

    def memory_key_values(self, memory: torch.Tensor):
        """Cross-attention K/V for every memory layer from an STM [B, L, S, D]."""
        return [layer.memory_key_value(memory[:, i]) for i, layer in enumerate(self.layers)]

    def forward(self, hidden, *, positions, self_mask, is_causal, pad, memory_kv, cache=None,
                output_hidden_states: bool = False):
        """The final hidden states (after the head norm), the MoE aux losses, and, with `output_hidden_states`,
        transformers' per-layer tuple: the embeddings, then every layer's output (the last one head-normed)."""
        aux_losses = []
        all_hidden = [hidden] if output_hidden_states else None
        if not self.config.use_nope:
            positions = rope_tables(positions, self.layers[0].attention.inv_freq, hidden.dtype)
        for slot, (layer, mem_idx) in enumerate(self.ordered_layers()):
            hidden, aux = layer(hidden, positions=positions, self_mask=self_mask, is_causal=is_causal, pad=pad,
                                memory_kv=None if mem_idx is None else memory_kv[mem_idx],
                                past_key_values=cache, cache_layer=slot)
            if aux is not None:
                aux_losses.append(aux)
            if all_hidden is not None:
                all_hidden.append(hidden)
        if self.head_norm is not None:
            hidden = self.head_norm(hidden)
        if all_hidden is not None:
            all_hidden[-1] = hidden
        return hidden, aux_losses, None if all_hidden is None else tuple(all_hidden)


class RxTEncoder(nn.Module):
    """Bidirectional layers; every layer's output is kept (the encoded data written into memory)."""

    def __init__(self, cfg: RxTComponentConfig):
        super().__init__()
        self.config = cfg
        # Encoders never read the memory, so cross-attention weights (dead in some reference checkpoints) are not built.
        self.layers = nn.ModuleList(RxTLayer(cfg, causal=False, cross_attention=False) for _ in range(cfg.num_layers))

    def forward(self, hidden, *, positions, key_mask):
        aux_losses = []
        if not self.config.use_nope:
            positions = rope_tables(positions, self.layers[0].attention.inv_freq, hidden.dtype)
        # Every layer's output is copied into one [B, L, T, D] tensor as it is made (not stacked at the end: see
        # RxTMemoryAttention._write); the next layer reads `hidden` itself, never the written copy.
        states = None
        for i, layer in enumerate(self.layers):
            hidden, aux = layer(hidden, positions=positions, self_mask=key_mask, is_causal=False)
            if states is None:  # the layers' output dtype (autocast may change it), as torch.stack would give
                states = hidden.new_empty(hidden.shape[0], len(self.layers), *hidden.shape[1:])
            states[:, i] = hidden
            if aux is not None:
                aux_losses.append(aux)
        return states, aux_losses  # [B, L, T, D]


class RxTMLMHead(nn.Module):
    """Masked-LM head used in joint pre-training (stage 1): dense -> GELU -> LayerNorm -> vocab projection."""

    def __init__(self, embed_dim: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.act = nn.GELU()
        self.layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.decoder = nn.Linear(embed_dim, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.act(self.dense(hidden))))


# ============================================================================================= memory attention
class RxTMemoryNorm(nn.Module):
    """The memory norms of the reference ('rms', 'layer', 'adaptive', 'positional'); 'classic-rms' is RxTRMSNorm.

    Quirk kept for parity: the 'rms'-family norms divide by sqrt(rms + 1e-6), not by rms.
    """

    def __init__(self, norm_type: str, dim: int, slots: int, init_gate: float, per_dim_scale: bool, decay: float):
        super().__init__()
        self.norm_type, self.decay = norm_type, decay
        self.init_gate = init_gate
        if norm_type == "positional":
            self.scale = nn.Parameter(torch.ones(dim if per_dim_scale else slots, *(() if per_dim_scale else (1,))))
            self.gate = nn.Parameter(torch.full((slots, 1), init_gate))
            self.register_buffer("ema_rms", torch.ones(slots, 1))
        else:
            if norm_type == "layer":
                self.norm = nn.LayerNorm(dim, eps=1e-5)
            self.scale = nn.Parameter(torch.ones(dim))
            self.gate = nn.Parameter(torch.full((1,), init_gate))
            if norm_type == "adaptive":
                self.register_buffer("ema_rms", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.norm_type
        if kind == "layer":
            normed = self.norm(x) * self.scale
        else:
            slot_rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()  # [B, S, 1]
            if kind == "rms" or (kind == "adaptive" and not self.training):
                rms = slot_rms
            elif kind == "adaptive":
                with torch.no_grad():
                    self.ema_rms.mul_(self.decay).add_((1 - self.decay) * x.pow(2).mean().sqrt())
                rms = self.ema_rms
            else:  # positional: a per-slot EMA, used in train and eval
                if self.training:
                    with torch.no_grad():
                        self.ema_rms.mul_(self.decay).add_((1 - self.decay) * slot_rms.mean(dim=0))
                rms = self.ema_rms
            normed = x * (rms + MEMORY_NORM_EPS).rsqrt() * self.scale
        gate = torch.sigmoid(self.gate)
        return gate * normed + (1 - gate) * x


def make_memory_norm(opts: RxTMemoryAttentionOptions) -> nn.Module:
    if opts.norm_type == "classic-rms":
        return RxTRMSNorm(opts.embed_dim)
    return RxTMemoryNorm(opts.norm_type, opts.embed_dim, opts.stm_size, opts.norm_init_gate,
                         opts.norm_per_dim_scale, opts.norm_decay)


class RxTResidualGate(nn.Module):
    """How a memory layer mixes its old state with an update.

    Off (the reference default): old + new. Gated: G from a static, elementwise (per-slot) or linear
    (across slots) gate; tanh gates give (1 + G) new + (1 - G) old, sigmoid gates G new + (1 - G) old.
    """

    def __init__(self, opts: RxTMemoryAttentionOptions, enabled: bool, disable_residual: bool = False,
                 write_budget: Optional[float] = None):
        super().__init__()
        self.enabled, self.disable_residual = enabled, disable_residual
        self.write_budget = write_budget
        self.gate_type, self.per_slot = opts.residual_gate_type, opts.residual_per_slot_gate
        self.use_tanh = opts.use_tanh_residual_gate
        self.init_value = opts.residual_gate_init
        slots = opts.stm_size
        if not enabled:
            return
        self.status_of_pair = opts.residual_gate_slot_status_type == "pair"
        if opts.residual_gate_slot_status_type in ("linear", "pair") and self.gate_type != "static":
            self.slot_status = nn.Linear(opts.embed_dim * (2 if self.status_of_pair else 1), 1)
        else:
            self.slot_status = None
        if self.gate_type == "linear":
            self.gate = nn.Linear(slots, slots if self.per_slot else 1)
        else:
            self.gate = nn.Parameter(torch.full((slots, 1) if self.per_slot else (1,), self.init_value))

    def _slot_status(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Per-slot summary, [B, S, 1]: the mean over dim of old + new, a learned projection of old + new, or
        ("pair", not in the reference) a learned projection of old and new side by side."""
        if self.status_of_pair:
            # From the sum alone the gate cannot tell "this slot already holds something" from "the update is
            # large"; seeing both lets it keep occupied slots and write into free ones.
            return self.slot_status(torch.cat([old, new], dim=-1))
        mixed = old + new
        return self.slot_status(mixed) if self.slot_status is not None else mixed.mean(dim=-1, keepdim=True)

    def forward(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.disable_residual:
            return new
        if not self.enabled:
            return old + new
        # A write of only the first k slots (fifo_write_slots) uses the first k per-slot gates.
        gate = self.gate[:old.shape[-2]] if self.per_slot and self.gate_type != "linear" else self.gate
        if self.gate_type == "static":
            g = gate
        elif self.gate_type == "elementwise":
            status = self._slot_status(old, new)
            g = gate * (status if self.per_slot else status.mean(dim=-2, keepdim=True))
        else:  # linear: mixes the slots' statuses, S -> S (per slot) or S -> 1
            g = self.gate(self._slot_status(old, new).squeeze(-1)).unsqueeze(-1)
        if self.use_tanh:
            g = torch.tanh(g)
            return (1 + g) * new + (1 - g) * old
        if self.write_budget is not None:
            # Independent sigmoids let one write replace a little of every slot, so facts pile up in the same
            # slots; competing slots make the write choose where it goes (and what it leaves alone).
            g = torch.clamp(self.write_budget * torch.softmax(g, dim=-2), max=1.0)
        else:
            g = torch.sigmoid(g)
        # g * new + (1 - g) * old as one fused op (old + g * (new - old)) instead of three passes over the layer;
        # equal up to float rounding (~1e-7). lerp wants one dtype: the one the arithmetic would promote to
        # (under autocast the gate and the update may be bf16 while the memory is fp32).
        dtype = torch.promote_types(torch.promote_types(old.dtype, new.dtype), g.dtype)
        return torch.lerp(old.to(dtype), new.to(dtype), g.to(dtype))


class RxTPreTrainedModel(PreTrainedModel):
    base_model_prefix = "rxt"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["RxTLayer"]

    # Saved into config.json by save_pretrained, so that every Auto class loads the copied code (remote code).
    _rxt_auto_map: dict = {}

    def post_init(self):
        super().post_init()
        self._bind_attention()

    def _bind_attention(self) -> None:
        """Point every attention module at this model's config: its `_attn_implementation` picks the kernel (the
        components of a full model follow the full model's choice)."""
        check_attn_implementation(self.config._attn_implementation)
        for module in self.modules():
            if isinstance(module, RxTAttention):
                module.config = self.config

    def set_decode_weight_layout(self, enabled: bool = True) -> "RxTPreTrainedModel":
        """Store every `nn.Linear` weight column-major (`enabled`), or row-major again (`False`); returns the model.

        The weights keep their values and shapes (and state-dict entries and saved files); only their memory order
        changes, to that of their [in, out] transpose. Why: a decode step multiplies a single row by every weight,
        and on CPU that single-row matmul runs faster over an [in, out] matrix (multiply-adds along its rows) than
        over an [out, in] one (a short dot product and a horizontal sum per output): 1.2x per decode step of an
        RxT-Alpha-Mini-shaped model, with the memory update, batched decoding and training steps unchanged
        (benchmarks/RESULTS_decode.md). Not the default, because FSDP and transformers' loading conventions expect
        contiguous weights: call it for inference (`rxt chat` and `rxt serve` do), and with `False` before wrapping
        the model for distributed training. A weight shared with an embedding keeps its rows (a lookup reads rows).
        """
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in embedding_weights:
                weight = module.weight
                weight.data = weight.data.t().contiguous().t() if enabled else weight.data.contiguous()
        return self

    def set_attn_implementation(self, attn_implementation: str, **kwargs) -> None:
        """Switch every attention module to another function of transformers' attention interface: "sdpa"
        (default), "eager", "flash_attention_2", "flex_attention", "sqa", ...; an unknown name raises."""
        check_attn_implementation(attn_implementation)
        super().set_attn_implementation(attn_implementation, **kwargs)
        self._bind_attention()

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.config.auto_map = dict(self._rxt_auto_map)
        # Save under today's names (`rxt.*`, `lm_head.*`); the renaming of older checkpoints is for loading only.
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload as a gated RAML v1.0 repository through `transformers_rxt.hub.push_rxt_to_hub`: the repository
        is created and gated first, then the weights, config with `auto_map`, code files, tokenizer and a card
        filled from this model are uploaded (nothing else).

        Takes transformers' `push_to_hub` arguments plus `tokenizer=`, `gated=` and the card arguments of
        `transformers_rxt.hub.build_model_card` (`stages`, `eval_results`, `datasets`, ...).
        """
        try:
            from transformers_rxt.hub.push import push_rxt_to_hub
        except ImportError as error:  # the remote-code copy without the package: no RAML card, no gating
            raise ImportError(
                "push_to_hub of an RxT model needs the transformers-rxt package: RxT models are published under "
                "RAML v1.0, in a gated repository with the licence card, which only its push writes. Install it "
                "(pip install transformers-rxt) and call push_to_hub again, or run `rxt push MODEL_DIR --repo-id "
                "NAMESPACE/NAME`") from error
        return push_rxt_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`, refusing any weight it would otherwise initialise at random.

        Missing and unexpected weights always raise, naming them. Weights whose shape differs from the config
        raise too, unless `ignore_mismatched_sizes=True` asks for them to be re-initialised on purpose (then
        they are listed in `output_loading_info`). This covers every path that ends here: the class itself,
        the Auto classes (also as remote code) and `load_rxt_model`.
        """
        return_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        # transformers raises on a mismatch only after logging it, and without the shapes: ask it to go on
        # and raise here, with the names, the shapes and the fix.
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        mismatched = [] if allow_mismatch else [(k, tuple(ckpt), tuple(ours))
                                                for k, ckpt, ours in sorted(info["mismatched_keys"])]
        fix = HF_CHECKPOINT_FIX + ("; to re-initialise the mismatched weights on purpose, pass "
                                   "ignore_mismatched_sizes=True" if mismatched else "")
        raise_on_unaccounted_weights(str(pretrained_model_name_or_path), missing=info["missing_keys"],
                                     unexpected=info["unexpected_keys"], mismatched=mismatched, fix=fix)
        return (model, info) if return_info else model

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, RxTAttention):
            init.copy_(module.inv_freq, rope_inv_freq(module.head_dim, module.rope_base))
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, RxTRMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RxTMoeFeedForward):
            for name in ("w1", "w2", "shared_w1", "shared_w2"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name), mean=0.0, std=0.02)
            for name in ("global_bias", "b1", "b2", "shared_b1", "shared_b2", "shared_experts_bias"):
                if hasattr(module, name):
                    init.zeros_(getattr(module, name))
        elif isinstance(module, RxTMemoryNorm):
            if module.norm_type == "positional":
                init.normal_(module.scale, mean=1.0, std=0.1)
            else:
                init.ones_(module.scale)
            init.constant_(module.gate, module.init_gate)
            if hasattr(module, "ema_rms"):
                init.ones_(module.ema_rms)
        elif isinstance(module, RxTResidualGate) and module.enabled and isinstance(module.gate, nn.Parameter):
            init.constant_(module.gate, module.init_value)
        elif isinstance(module, RxTMemoryAttention) and module.initial_memory is not None:
            init.normal_(module.initial_memory, mean=0.0, std=0.02)  # the scale of stm_init_type="normal"
        if isinstance(module, RxTAttention) and module.gate_proj is not None:
            init.normal_(module.gate_proj.weight, mean=1.0, std=0.01)


class RxTMemoryAttention(RxTPreTrainedModel):
    """Writes encoded data into the Short-Term Memory.

    `forward(stm, encoded, attention_mask)`: `stm` [B, L, S, D], `encoded` [B, L, T, D] (layer i's encoder
    output feeds memory layer i), `attention_mask` [B, T] -> the new memory [B, L, S, D]. Every layer reads
    the old memory; variants differ in the pre-step that mixes layers (see the reference notes, §1.6).
    """

    config_class = RxTMemoryAttentionConfig
    main_input_name = "encoded"
    _auto_class = "AutoModel"
    _rxt_auto_map = {"AutoConfig": "configuration_rxt.RxTMemoryAttentionConfig",
                     "AutoModel": "modeling_rxt.RxTMemoryAttention"}

    def __init__(self, config: RxTMemoryAttentionConfig):
        super().__init__(config)
        opts = config.memory_attention_options
        self.variant = opts.variant
        n, dim = opts.num_layers, opts.embed_dim

        def attention(kind, rope):
            hq, hkv = opts.heads(kind)
            dropout = {"main": opts.att_dropout, "interlayer": opts.interlayer_att_dropout,
                       "self": opts.self_att_dropout}[kind]
            return RxTAttention(dim, opts.att_heads, hq, hkv, rope=rope, rope_base=opts.rope_base,
                                output_bias=True, dropout=dropout)

        def norms():
            return nn.ModuleList(make_memory_norm(opts) for _ in range(n))

        def gates(enabled=opts.use_gated_residual, disable=False, write_budget=None):
            return nn.ModuleList(RxTResidualGate(opts, enabled, disable, write_budget) for _ in range(n))

        self.attention_layers = nn.ModuleList(attention("main", "k") for _ in range(n))
        self.memory_norm_layers = norms()
        self.memory_input_norm_layers = nn.ModuleList(RxTRMSNorm(dim) for _ in range(n))
        # The write budget applies where the new interaction is written, not to the inter-layer mixing.
        self.residual_gate_layers = gates(disable=self.variant == "simple" and opts.disable_residual,
                                          write_budget=opts.residual_gate_write_budget)
        if self.variant in ("interlayer", "self-interlayer", "grouped-self-interlayer"):
            self.mean_attention_layers = nn.ModuleList(attention("interlayer", None) for _ in range(n))
            self.mean_memory_norm_layers = norms()
            self.mean_stm_norm = make_memory_norm(opts)
            self.mean_residual_gate_layers = gates()
            if self.variant != "interlayer":
                self.interlayer_gate_layers = gates()
        if self.variant == "self":
            self.self_attention_layers = nn.ModuleList(attention("self", None) for _ in range(n))
            self.self_memory_norm_layers = norms()
            self.self_residual_gate_layers = gates(opts.use_gated_residual and opts.use_gate_for_self_attention)
        self.num_groups = opts.num_groups if self.variant == "grouped-self-interlayer" else 1
        # stm_init_type="learned": the memory every new conversation starts from is trained with the writer.
        if config.stm_init_type == "learned":
            self.initial_memory = nn.Parameter(torch.zeros(n, opts.stm_size, dim))
        else:
            self.initial_memory = None
        self.fifo_write_slots = opts.fifo_write_slots
        if self.fifo_write_slots is not None and self.initial_memory is None:
            raise ValueError("fifo_write_slots writes each interaction into fresh slots taken from the learned "
                             f"initial memory; build the model with stm_init_type='learned' (got "
                             f"{config.stm_init_type!r}).")
        self.post_init()

    def _layer_means(self, stm: torch.Tensor) -> list[torch.Tensor]:
        """The normalised mean over layers (per group for the grouped variant), one tensor per memory layer."""
        n = stm.shape[1]
        size = n // self.num_groups
        means = [self.mean_stm_norm(stm[:, g * size:(g + 1) * size].mean(dim=1)) for g in range(self.num_groups)]
        return [means[i // size] for i in range(n)]

    def _pre_step(self, i: int, old_layer: torch.Tensor, means, slots: int) -> torch.Tensor:
        """Layer i's memory after the variant's pre-step, for its first `slots` slots (every slot is read)."""
        if self.variant == "simple":
            return old_layer[:, :slots]
        if self.variant == "self":
            p = self.self_memory_norm_layers[i](old_layer)
            update = self.self_attention_layers[i](p[:, :slots], p)
            return self.self_residual_gate_layers[i](old_layer[:, :slots], update)
        p = self.mean_memory_norm_layers[i](old_layer)
        source = means[i] if self.variant == "interlayer" else self.interlayer_gate_layers[i](p, means[i])
        update = self.mean_attention_layers[i](p[:, :slots], source)
        return self.mean_residual_gate_layers[i](old_layer[:, :slots], update)

    def forward(self, stm: torch.Tensor, encoded: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if isinstance(stm, STMCache):
            stm = stm.memory
        self._check_inputs(stm, encoded, attention_mask)
        if self.fifo_write_slots is not None:
            return self._fifo_write(stm, encoded, attention_mask)
        return self._write(stm, encoded, attention_mask)

    def _fifo_write(self, stm: torch.Tensor, encoded: torch.Tensor, attention_mask: Optional[torch.Tensor]
                    ) -> torch.Tensor:
        """Drop the oldest `fifo_write_slots` slots of every layer, put fresh (initial) slots in front and write
        the interaction into those only; the other slots are kept exactly, so a fact stays readable, untouched by
        later writes, until it is the oldest."""
        n = self.fifo_write_slots
        fresh = self.initial_memory[:, :n].to(stm.dtype).unsqueeze(0).expand(stm.shape[0], -1, -1, -1)
        shifted = torch.cat([fresh, stm[:, :, :-n]], dim=2)
        # Only the fresh slots are computed (they still read every slot): in stage 4 the write of all slots was
        # a quarter of a turn's time, and 7/8 of it was thrown away.
        written = self._write(shifted, encoded, attention_mask, slots=n)
        return torch.cat([written, shifted[:, :, n:]], dim=2)

    def _write(self, stm: torch.Tensor, encoded: torch.Tensor, attention_mask: Optional[torch.Tensor],
               slots: Optional[int] = None) -> torch.Tensor:
        """The new memory of the first `slots` slots of every layer (all when None)."""
        slots = stm.shape[2] if slots is None else slots
        layers, length = encoded.shape[1], encoded.shape[2]
        positions = torch.arange(length, device=encoded.device)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_mask = attention_mask.bool()[:, None, None, :]
        positions = rope_tables(positions, self.attention_layers[0].inv_freq, encoded.dtype)
        means = self._layer_means(stm) if self.variant not in ("simple", "self") else None
        # Each layer is written into the output as soon as it is done (a copy; nothing reads the output back, so
        # autograd's in-place checks are not involved), rather than kept in a list and stacked at the end: a
        # list + `torch.stack` holds the memory twice at the peak, and on CPU glibc gives that extra peak back
        # to the system after every update and takes it again (page faults) at the next one.
        new_memory = None
        for i in range(layers):
            old = self._pre_step(i, stm[:, i], means, slots)
            keys = self.memory_input_norm_layers[i](encoded[:, i])
            update = self.attention_layers[i](self.memory_norm_layers[i](old), keys, kv_positions=positions,
                                              mask=key_mask)
            new_layer = self.residual_gate_layers[i](old, update)
            if new_memory is None:  # the written layers' dtype (autocast may change it), as torch.stack would give
                new_memory = new_layer.new_empty(new_layer.shape[0], layers, *new_layer.shape[1:])
            new_memory[:, i] = new_layer
        return new_memory

    def _check_inputs(self, stm, encoded, attention_mask):
        opts = self.config.memory_attention_options
        expected = (opts.num_layers, opts.stm_size, opts.embed_dim)
        if stm.dim() != 4 or tuple(stm.shape[1:]) != expected:
            raise ValueError(f"stm must be [batch, {expected[0]} layers, {expected[1]} slots, {expected[2]} dim], "
                             f"got {tuple(stm.shape)}")
        if encoded.dim() != 4 or encoded.shape[1] != opts.num_layers or encoded.shape[3] != opts.embed_dim:
            raise ValueError(f"encoded must be [batch, {opts.num_layers} layers, tokens, {opts.embed_dim} dim], "
                             f"got {tuple(encoded.shape)}")
        if stm.shape[0] != encoded.shape[0]:
            raise ValueError(f"STM batch {stm.shape[0]} != encoded batch {encoded.shape[0]}: the memory is written "
                             "row by row, so every conversation needs its own STM row (use STMCache.select/cat).")
        if attention_mask is not None and tuple(attention_mask.shape) != (encoded.shape[0], encoded.shape[2]):
            raise ValueError(f"attention_mask must be [batch, tokens] = {[encoded.shape[0], encoded.shape[2]]}, "
                             f"got {list(attention_mask.shape)}")

    @classmethod
    def from_rxlm_pretrained(cls, path: str, variant: Optional[str] = None, **kwargs) -> "RxTMemoryAttention":
        """Load a reference (rxlm) memory-attention component repo (config.json + model.safetensors, keys `model.*`).

        `variant` is inferred from the weights when None.
        """
        return rxlm_conversion().load_rxlm_memory_attention(path, cls, variant=variant, **kwargs)


# ============================================================================================= full model
# Checkpoints saved before the base model existed (state-dict keys `embed_tokens.*`, `decoder.*`, `encoder.*`,
# `memory_attention.*`) load unchanged: transformers adds the `rxt.` base-model prefix itself, and this renaming
# moves the LM head from `decoder.head.*` to `lm_head.*`.
register_checkpoint_conversion_mapping(
    "RxTForConversationalGeneration", [WeightRenaming(source_patterns="decoder.head", target_patterns="lm_head")],
    overwrite=True)


def flat_rxt_key(name: str) -> str:
    """A parameter name of `RxTForConversationalGeneration` or `RxTModel` (also under a wrapper's `rxt.` prefix)
    in the component layout `embed_tokens.*`, `decoder.*` (LM head: `decoder.head.*`), `encoder.*`,
    `memory_attention.*`; the layout of rxlm's mapping and of the per-component training options."""
    while name.startswith("rxt.") and name[len("rxt."):].split(".", 1)[0] in _RXT_TOP_LEVEL:
        name = name[len("rxt."):]
    return "decoder.head." + name[len("lm_head."):] if name.startswith("lm_head.") else name


def model_rxt_key(name: str) -> str:
    """The inverse of `flat_rxt_key` for `RxTForConversationalGeneration`."""
    return "lm_head." + name[len("decoder.head."):] if name.startswith("decoder.head.") else "rxt." + name


_RXT_TOP_LEVEL = ("rxt", "lm_head", "embed_tokens", "decoder", "encoder", "memory_attention")


@dataclass
class RxTModelOutput(BaseModelOutputWithPast):
    """Output of [`RxTModel`]: the decoder's last hidden state (head-normed), the KV cache, the per-layer hidden
    states (`output_hidden_states`) and the MoE aux loss (mean over MoE layers) when the decoder has MoE layers."""

    aux_loss: Optional[torch.Tensor] = None


@dataclass
class RxTOutput(ModelOutput):
    """Output of [`RxTForConversationalGeneration`]: the LM loss (+ weighted MoE aux loss), logits and the KV cache."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[Cache] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


_RXT_AUTO_MAP = {"AutoConfig": "configuration_rxt.RxTConfig", "AutoModel": "modeling_rxt.RxTModel",
                 "AutoModelForCausalLM": "modeling_rxt.RxTForConversationalGeneration"}


class RxTCache(EncoderDecoderCache):
    """The decoder's cache for one turn: transformers' `EncoderDecoderCache` of the answer's self-attention keys/values
    and, in its cross-attention cache, the memory cross-attention keys/values of every memory layer (layer i at index
    i), computed from the STM at the turn's first forward and read by every later step.

    Beam reordering, cropping, batch selection (`batch_select_indices`, `batch_repeat_interleave`), `reset` and static
    allocation (`cache_implementation="static"`, where the cross-attention cache is a `StaticCache` of `stm_size`
    slots) are transformers' own code on the two caches. `memory_source` identifies the STM tensor (storage and
    in-place version) the memory keys/values were computed from; a forward with another memory, or with the same STM
    after its update, is checked against them and refused if they differ (see `RxTModel.forward`).
    """

    def __init__(self, self_attention_cache: Optional[Cache] = None, cross_attention_cache: Optional[Cache] = None):
        super().__init__(self_attention_cache if self_attention_cache is not None else DynamicCache(),
                         cross_attention_cache if cross_attention_cache is not None else DynamicCache())
        self.memory_source: Optional[tuple] = None

    @classmethod
    def wrap(cls, cache: Optional[Cache], config: RxTConfig) -> "RxTCache":
        """`cache` as an `RxTCache`: a bare self-attention cache gets an empty memory cache (static when it is static,
        so that the decode step compiles), an `EncoderDecoderCache` keeps both of its caches."""
        if isinstance(cache, cls):
            return cache
        if isinstance(cache, EncoderDecoderCache):
            wrapped = cls(cache.self_attention_cache, cache.cross_attention_cache)
        elif cache is not None and cache.is_compileable:
            wrapped = cls(cache, StaticCache(config=config, max_cache_len=config.stm_size))
        else:
            wrapped = cls(cache)
        if getattr(cache, "_is_user_defined", False):  # generate's mark on a cache the caller passed in
            wrapped._is_user_defined = True
        return wrapped

    @property
    def has_memory(self) -> bool:
        return bool(self.is_updated.get(0, False))

    def memory_key_values(self, num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers = self.cross_attention_cache.layers
        return [(layers[i].keys, layers[i].values) for i in range(num_layers)]

    def store_memory_key_values(self, memory_kv, source: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        capacity = self.cross_attention_cache.get_max_length(0)
        if capacity not in (-1, source.shape[2]):  # a static cache would attend to its empty slots
            raise ValueError(f"the static cross-attention cache holds {capacity} memory slots but the memory has "
                             f"{source.shape[2]}: use a dynamic cache for encoder_memory of another length")
        stored = []
        for i, (key, value) in enumerate(memory_kv):
            stored.append(self.cross_attention_cache.update(key, value, i))
            self.is_updated[i] = True
        self.memory_source = tensor_identity(source)
        return stored

    def reset(self):
        super().reset()
        self.memory_source = None


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """Which tensor this is and whether it changed: its storage, shape and in-place version counter (tensors made
    under `torch.inference_mode` have none, so an in-place change of those is not seen)."""
    return tensor.data_ptr(), tuple(tensor.shape), None if tensor.is_inference() else tensor._version


def self_attention_mask(attention_mask: Optional[torch.Tensor], length: int, past: int, kv_length: int,
                        device, allow_none: bool = True) -> Optional[torch.Tensor]:
    """The decoder's self-attention mask, bool [B or 1, 1, T, kv_length] (True = attend), or None when plain causal
    attention is exact (and `allow_none`).

    `attention_mask` is the 2-D padding mask of the past + T tokens (None: no padding). `kv_length` is what the
    cache returns: past + T for a dynamic cache, its capacity for a static one (the empty slots after the T new
    tokens are masked by causality). A left-pad query row would attend to nothing (NaN with SDPA): it sees itself.
    """
    if allow_none and kv_length == past + length and (attention_mask is None or bool(attention_mask.bool().all())):
        if length == 1 or past == 0:
            return None  # a single new token sees everything; or a pure causal prefill (is_causal)
    causal = torch.ones(length, kv_length, dtype=torch.bool, device=device).tril(past)[None, None]
    if attention_mask is None:
        return causal
    padding = attention_mask.bool()[:, -(past + length):]
    padding = F.pad(padding, (0, kv_length - padding.shape[-1]))  # a static cache's empty slots
    own_position = torch.zeros_like(causal)
    own_position[..., past:past + length] = torch.eye(length, dtype=torch.bool, device=device)
    return (causal & padding[:, None, None, :]) | own_position


class RxTMemoryMixin:
    """What the base model and the LM model share: the STM (creation, checks), input checks, the encoder pass,
    and the memory update. Both reach the components as `self.embed_tokens`,
    `self.decoder`, `self.encoder` and `self.memory_attention`."""

    @property
    def model_signature(self) -> dict:
        """What an `STMCache` records about its owner: the memory geometry and an architecture fingerprint."""
        cfg = self.config
        return {"model_type": cfg.model_type, "layers": cfg.num_memory_layers, "slots": cfg.stm_size,
                "dim": cfg.hidden_size, "fingerprint": architecture_fingerprint(cfg)}

    # -------------------------------------------------------------- memory
    def init_memory(self, batch_size: int = 1, input_ids: Optional[torch.LongTensor] = None,
                    attention_mask: Optional[torch.Tensor] = None, init_type: Optional[str] = None,
                    generator: Optional[torch.Generator] = None) -> STMCache:
        """A fresh STM for `batch_size` conversations, initialised as the config says.

        With `input_ids` (e.g. a system prompt rendered as an interaction), the fresh memory is then updated
        once with that text, as the reference's `init_stm_state` does.
        """
        if input_ids is not None:
            batch_size = input_ids.shape[0]
        memory = self.initial_memory_tensor(batch_size, init_type, generator).detach()
        stm = STMCache(memory, self.model_signature)
        if input_ids is not None:
            self.update_memory(input_ids=input_ids, attention_mask=attention_mask, stm=stm)
        return stm

    def initial_memory_tensor(self, batch_size: int, init_type: Optional[str] = None,
                              generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The memory tensor a new conversation starts from, [batch, L, S, D]. For a learned initial memory it
        stays connected to the parameter (training code uses this; `init_memory` detaches it)."""
        init_type = init_type or self.config.stm_init_type
        if init_type == "learned":
            initial = self.memory_attention.initial_memory
            if initial is None:
                raise ValueError("init_type='learned' needs a model built with stm_init_type='learned' (this one "
                                 f"uses {self.config.stm_init_type!r}); pick another init_type.")
            return initial.to(self.dtype)[None].expand(batch_size, -1, -1, -1).clone()
        shape = (batch_size, self.config.num_memory_layers, self.config.stm_size, self.config.hidden_size)
        return init_memory_tensor(shape, init_type, dtype=self.dtype, device=self.device, generator=generator)

    def check_stm(self, stm: Union[STMCache, torch.Tensor], batch_size: Optional[int] = None) -> None:
        """Raise a clear error if `stm` does not belong to this model (or, with `batch_size`, to this batch).

        An `STMCache` bound to another model (a different `model_signature`, fingerprint included) is refused;
        an unbound one (`STMCache(memory)`) is accepted and bound to this model.
        """
        memory = stm._memory if isinstance(stm, STMCache) else stm
        expected = (self.config.num_memory_layers, self.config.stm_size, self.config.hidden_size)
        if not isinstance(memory, torch.Tensor) or memory.dim() != 4 or tuple(memory.shape[1:]) != expected:
            got = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
            raise ValueError(
                f"STM shape {got} does not fit this model: expected [batch, {expected[0]} layers, {expected[1]} "
                f"slots, {expected[2]} dim]. Create it with model.init_memory(batch_size)."
            )
        if isinstance(stm, STMCache):
            if stm.model_signature is None:
                stm.model_signature = self.model_signature
            elif stm.model_signature != self.model_signature:
                raise ValueError(
                    f"this STMCache belongs to another model ({stm.model_signature}); this model is "
                    f"{self.model_signature}. Start the conversation with this model's init_memory(), or use the "
                    "model that made the memory."
                )
        if batch_size is not None and memory.shape[0] not in (1, batch_size):
            raise ValueError(
                f"STM batch {memory.shape[0]} does not match the input batch {batch_size}: use one STM row per "
                "conversation (model.init_memory(batch_size) or STMCache.select/cat), or a single row to share it."
            )

    def _check_stm_values(self, memory: torch.Tensor) -> None:
        """Before decoding or updating: a real, finite memory of this model's dtype on its device."""
        if memory.is_meta:
            raise ValueError("the STM is on the meta device and holds no values: create it with "
                             "model.init_memory(batch_size) or load a saved one with STMCache.load(path, model=model)")
        if memory.dtype != self.dtype or memory.device != self.device:
            raise ValueError(
                f"the STM is {memory.dtype} on {memory.device} but the model is {self.dtype} on {self.device}: "
                "move it with stm = stm.to(device=model.device, dtype=model.dtype)"
            )
        # One reduction pass: a NaN makes both extremes NaN and an inf shows at one end. (`isfinite(...).all()`
        # makes four passes over the whole STM: ~1.8 ms per call here, against ~0.2 ms.)
        if memory.numel() == 0:  # aminmax refuses an empty tensor; an empty batch holds nothing to check
            return
        low, high = torch.aminmax(memory.detach())
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise ValueError("the STM holds NaN or inf values, so every answer would be garbage: restore a saved "
                             "state or start over with stm.reset() / model.init_memory()")

    def _check_token_ids(self, input_ids, attention_mask, what: str) -> None:
        """`[batch, tokens]` integer ids inside the vocabulary, and a mask of the same shape."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"{what} must be a [batch, tokens] tensor, got {got}: add the batch dimension with "
                             "ids.unsqueeze(0) (or tokenize with return_tensors='pt')")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer token ids, got {input_ids.dtype}: convert with .long()")
        if input_ids.numel() == 0:
            raise ValueError(f"{what} is empty ({tuple(input_ids.shape)}): every row needs at least "
                             "[BOS][Q]query[A]; render it with the tokenizer's chat template")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{what} contains token id {bad}, outside this model's vocabulary [0, "
                             f"{self.config.vocab_size}): use the tokenizer that belongs to this model")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but {what} has "
                                 f"{tuple(input_ids.shape)}: one mask entry per token (1 = real, 0 = padding)")
            empty = (~attention_mask.bool().any(dim=1)).nonzero().reshape(-1).tolist()
            if empty:
                raise ValueError(f"attention_mask rows {empty} are all zeros, so those rows have no tokens: "
                                 "drop them from the batch or fix the mask (1 = real token)")

    def _check_prompt_markers(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor]) -> None:
        """Each row must be `[BOS][Q]query[A]` (RxTBeta: [U] for a tool result, [T] to think first), left-padded."""
        cfg = self.config
        starts = [cfg.query_token_id] + ([cfg.tool_use_token_id] if cfg.tool_use_token_id is not None else [])
        ends = [cfg.answer_token_id] + ([cfg.think_token_id] if cfg.think_token_id is not None else [])
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        no_query = (~(torch.isin(input_ids, input_ids.new_tensor(starts)) & real).any(dim=1)).nonzero()
        if no_query.numel():
            raise ValueError(f"prompt rows {no_query.reshape(-1).tolist()} have no query marker {starts} ([Q]): render "
                             "the prompt as [BOS][Q]query[A] with tokenizer.apply_chat_template(..., "
                             "add_generation_prompt=True)")
        no_answer = (~(torch.isin(input_ids[:, -1], input_ids.new_tensor(ends)) & real[:, -1])).nonzero()
        if no_answer.numel():
            rows = no_answer.reshape(-1).tolist()
            raise ValueError(
                f"prompt rows {rows} do not end with the answer marker {ends} ([A]) (last ids: "
                f"{input_ids[rows, -1].tolist()}): render prompts with add_generation_prompt=True and left-pad "
                "batches (tokenizer.padding_side = 'left')"
            )

    def encode(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None):
        """Encoder pass: the per-layer outputs [B, L, T, D] (and MoE aux losses) of a full interaction."""
        self._check_length(input_ids.shape[1], self.config.encoder_config["seq_len"], "encoder input")
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            key_mask = attention_mask.bool()[:, None, None, :]
        positions = self._positions(attention_mask, input_ids.shape[1], 0, input_ids.device, left_padding_aware=False)
        return self.encoder(self.embed_tokens(input_ids), positions=positions, key_mask=key_mask)

    def compute_memory_update(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor],
                              memory: torch.Tensor) -> torch.Tensor:
        """The new memory after reading one interaction per row (pure function; differentiable)."""
        if memory.shape[0] != input_ids.shape[0]:
            raise ValueError(f"STM batch {memory.shape[0]} != interaction batch {input_ids.shape[0]}: the memory is "
                             "written row by row; give every conversation its own STM row.")
        encoded, _ = self.encode(input_ids, attention_mask)
        return self.memory_attention(memory, encoded, attention_mask)

    def update_memory(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                      stm: Optional[STMCache] = None, background: bool = False, _reserved: bool = False) -> STMCache:
        """Encode full interactions `[BOS][Q]query[A]answer[EOS]` and write them into `stm` in place.

        With `background=True` the update runs on a thread (queued on a side CUDA stream on GPU); `stm.wait()`
        or any read of `stm.memory` waits for it. `stm` must then be an `STMCache` (a bare tensor gives the
        caller nothing to wait on).
        """
        if stm is None:
            raise ValueError("update_memory needs the conversation state: pass stm=model.init_memory(batch_size)")
        try:
            if isinstance(stm, torch.Tensor):
                if background:
                    raise ValueError("a background memory update needs an STMCache to wait on, not a bare tensor: "
                                     "pass stm=STMCache(memory) (then stm.wait()), or update in the foreground")
                stm = STMCache(stm)
            self.check_stm(stm)
            if not _reserved:  # a reserved update comes from generate, which checked all this before decoding
                self._check_token_ids(input_ids, attention_mask, "input_ids")
                self._check_stm_values(stm.wait()._memory)
            if stm.batch_size != input_ids.shape[0]:
                raise ValueError(f"STM batch {stm.batch_size} != interaction batch {input_ids.shape[0]}: the memory "
                                 "is written row by row; give every conversation its own STM row.")
        except ValueError:
            if _reserved:
                stm.release()
            raise
        grad = torch.is_grad_enabled() and not background

        def compute(memory: torch.Tensor) -> torch.Tensor:
            with torch.set_grad_enabled(grad):
                return self.compute_memory_update(input_ids, attention_mask, memory)

        stm.run_update(compute, background=background, reserved=_reserved)
        return stm

    # -------------------------------------------------------------- decoder forward
    @staticmethod
    def _check_length(length: int, limit: int, what: str) -> None:
        if length > limit:
            raise ValueError(f"{what} has {length} tokens but the model accepts at most {limit} (seq_len). "
                             "Shorten the query/answer or split the interaction; nothing is truncated silently.")

    @staticmethod
    def _positions(attention_mask, length, past, device, left_padding_aware=True):
        """RoPE positions: 0.. from the first real token of each row (positions restart every interaction)."""
        if attention_mask is None or not left_padding_aware:
            return torch.arange(past, past + length, device=device)
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, -length:]

    def _check_encoder_memory(self, memory: torch.Tensor, batch: int) -> torch.Tensor:
        layers, dim = self.config.num_memory_layers, self.config.hidden_size
        if memory.dim() != 4 or memory.shape[1] != layers or memory.shape[3] != dim or memory.shape[0] not in (1, batch):
            raise ValueError(f"encoder_memory must be [batch={batch}, {layers} layers, tokens, {dim} dim], "
                             f"got {tuple(memory.shape)}")
        return memory

    def _memory_kv(self, memory: torch.Tensor, cache: Optional[RxTCache], batch: int):
        """Memory cross-attention K/V of every memory layer: computed from `memory` once per turn and kept in the
        cache's cross-attention cache; later steps read them there after checking they come from `memory`."""
        if cache is not None and cache.has_memory:
            if not torch.compiler.is_compiling():  # the compiled decode step is the same turn's (generate)
                self._check_memory_source(memory, cache, batch)
            return cache.memory_key_values(len(self.decoder.layers))
        memory_kv = self.decoder.memory_key_values(memory)
        if memory.shape[0] == 1 and batch > 1:
            memory_kv = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in memory_kv]
        return memory_kv if cache is None else cache.store_memory_key_values(memory_kv, memory)

    def _check_memory_source(self, memory: torch.Tensor, cache: RxTCache, batch: int) -> None:
        """Refuse to decode from memory K/V computed from another memory than `memory`.

        The same tensor, unchanged since, is accepted at once. Any other (a copy, the rows `batch_select_indices`
        kept, or the same STM after an in-place update) is checked on the first memory layer's keys and values,
        and becomes the cache's source if they agree."""
        identity = tensor_identity(memory)
        if identity == cache.memory_source:
            return
        cached_key, cached_value = cache.memory_key_values(1)[0]
        key, value = self.decoder.layers[0].memory_key_value(memory[:, 0])
        if key.shape[0] != cached_key.shape[0]:
            key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
        if key.shape != cached_key.shape or not (torch.allclose(key, cached_key, rtol=1e-4, atol=1e-5)
                                                 and torch.allclose(value, cached_value, rtol=1e-4, atol=1e-5)):
            raise ValueError(
                "past_key_values holds memory cross-attention keys/values computed from another STM than the one "
                "passed (or from this STM before its last update): a cache belongs to one turn of one memory. Start "
                "the turn with a fresh cache (past_key_values=None), or pass the stm the cache was started with.")
        cache.memory_source = identity


class RxTModel(RxTMemoryMixin, RxTPreTrainedModel):
    """The bare Reactive Transformer: the shared embedding, the memory-conditioned decoder (with its head norm, no
    LM head), the encoder and the memory attention. `forward` returns the decoder's hidden states; `init_memory`,
    `update_memory` and `compute_memory_update` work as on [`RxTForConversationalGeneration`]."""

    config_class = RxTConfig
    _auto_class = "AutoModel"
    _rxt_auto_map = _RXT_AUTO_MAP
    # A checkpoint of the LM model loads into the base model without its head.
    # (and the training heads of the curriculum's stage models, transformers_rxt.training, saved with the weights)
    _keys_to_ignore_on_load_unexpected = [r"\.rope\.", r"\.stm\.memory", r"^lm_head\.", r"^decoder\.head\.",
                                          r"^(mlm_head|critic)\."]

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        dec, enc = config.decoder_options, config.encoder_options
        self.embed_tokens = nn.Embedding(dec.vocab_size, dec.embed_dim)
        self.decoder = RxTDecoder(dec)
        self.encoder = RxTEncoder(enc)
        self.memory_attention = RxTMemoryAttention(RxTMemoryAttentionConfig(
            memory_attention_config=config.memory_attention_config, stm_init_type=config.stm_init_type,
            attn_implementation=config._attn_implementation))  # the component follows the model's kernel
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        stm: Optional[Union[STMCache, torch.Tensor]] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        encoder_memory: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Union[RxTModelOutput, tuple]:
        """Decoder pass conditioned on the memory (no LM head).

        Args:
            input_ids: `[B, T]` token ids (e.g. `[BOS][Q]query[A]answer[EOS]` for teacher forcing).
            attention_mask: `[B, past + T]`, 1 for real tokens (left or right padding).
            stm: the conversation memory (`STMCache` or a `[B or 1, L, S, D]` tensor). Required.
            encoder_memory: joint pre-training (stages 1-2) only: per-layer encoder states `[B, L, T', D]` read by
                the memory cross-attention in place of the STM (any number of slots T').
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        if encoder_memory is not None:
            memory = self._check_encoder_memory(encoder_memory, batch)
        elif stm is None:
            raise ValueError("RxT decodes conditioned on a memory: pass stm=model.init_memory(batch_size) "
                             "(or the STMCache of the conversation).")
        else:
            self.check_stm(stm, batch)
            memory = stm.memory if isinstance(stm, STMCache) else stm
            if memory.dtype != hidden.dtype:
                # Refused, not cast: the memory update writes the model's dtype back into this STM, so a cast
                # here would only move the failure to after the answer (generate and update_memory refuse too).
                raise ValueError(f"the STM is {memory.dtype} but the model computes in {hidden.dtype}: move it with "
                                 "stm = stm.to(device=model.device, dtype=model.dtype)")
        if memory.dtype != hidden.dtype:  # encoder_memory: activations of the encoder (e.g. under autocast)
            memory = memory.to(hidden.dtype)
        use_cache = use_cache if use_cache is not None else (past_key_values is not None)
        past_key_values = RxTCache.wrap(past_key_values, self.config) if use_cache else None
        prepared = attention_mask is not None and attention_mask.dim() == 4  # e.g. generate's, for a static cache
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if not torch.compiler.is_compiling():  # a static cache counts on the device; the compiled step keeps it there
            past = int(past)
            self._check_length(past + length, self.config.decoder_config["seq_len"], "the interaction")
            if attention_mask is not None and not prepared and attention_mask.shape[-1] != past + length:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens but past + new = "
                                 f"{past + length}")
        if position_ids is not None:
            positions = position_ids
        elif prepared:
            positions = torch.arange(length, device=hidden.device) + past
        else:
            positions = self._positions(attention_mask, length, past, hidden.device)
        if prepared:
            self_mask, pad = attention_mask, None
        else:
            kv_length = past_key_values.get_mask_sizes(length, 0)[0] if past_key_values is not None else length
            self_mask = self_attention_mask(attention_mask, length, past, kv_length, hidden.device)
            padded = attention_mask is not None and not bool(attention_mask.bool().all())
            # the padding factor of the memory cross-attention queries (x 1.0 is exact: skipped without padding)
            pad = attention_mask[:, -length:, None].to(hidden.dtype) if padded else None
        memory_kv = self._memory_kv(memory, past_key_values, batch)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden, aux_losses, all_hidden = self.decoder(
            hidden, positions=positions, self_mask=self_mask, is_causal=self_mask is None and length > 1, pad=pad,
            memory_kv=memory_kv, cache=None if past_key_values is None else past_key_values.self_attention_cache,
            output_hidden_states=bool(output_hidden_states))
        output = RxTModelOutput(last_hidden_state=hidden, past_key_values=past_key_values,
                                hidden_states=all_hidden,
                                aux_loss=torch.stack(aux_losses).mean() if aux_losses else None)
        return output if return_dict else output.to_tuple()



class RxTForConversationalGeneration(RxTMemoryMixin, RxTPreTrainedModel, GenerationMixin):
    """Reactive Transformer: a decoder conditioned on a Short-Term Memory, plus the encoder and memory
    attention that write each finished interaction into that memory; [`RxTModel`] (`self.rxt`) and the LM head.

    The model holds no conversation state. Pass an `STMCache` (from `init_memory`) to `forward`, `generate`
    and `update_memory`; one model serves any number of conversations.
    """

    config_class = RxTConfig
    _auto_class = "AutoModelForCausalLM"
    _rxt_auto_map = _RXT_AUTO_MAP
    # the training heads of the curriculum's stage models (transformers_rxt.training) saved with the weights: a
    # stage output loads as this model without them
    _keys_to_ignore_on_load_unexpected = [r"\.rope\.", r"\.stm\.memory", r"^(mlm_head|critic)\."]
    # Used only with config.tie_word_embeddings=True (not the reference's default, which has its own LM head): the
    # LM head reads the shared token embedding, so a value copied through the memory maps back to its own token.
    _tied_weights_keys = {"lm_head.weight": "rxt.embed_tokens.weight"}

    def __init__(self, config: RxTConfig):
        super().__init__(config)
        self.rxt = RxTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.loss_type = "ForCausalLM"
        self.post_init()

    # The components, as on the base model (the memory methods of RxTMemoryMixin use these names).
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.rxt.embed_tokens

    @property
    def decoder(self) -> RxTDecoder:
        return self.rxt.decoder

    @property
    def encoder(self) -> RxTEncoder:
        return self.rxt.encoder

    @property
    def memory_attention(self) -> "RxTMemoryAttention":
        return self.rxt.memory_attention

    def get_input_embeddings(self):
        return self.rxt.embed_tokens

    def set_input_embeddings(self, value):
        self.rxt.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        stm: Optional[Union[STMCache, torch.Tensor]] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        encoder_memory: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Union[RxTOutput, tuple]:
        """Decoder pass conditioned on the memory, then the LM head.

        Args:
            input_ids: `[B, T]` token ids (e.g. `[BOS][Q]query[A]answer[EOS]` for teacher forcing).
            attention_mask: `[B, past + T]`, 1 for real tokens (left or right padding).
            stm: the conversation memory (`STMCache` or a `[B or 1, L, S, D]` tensor). Required.
            labels: `[B, T]`; shifted inside, -100 ignored. The loss adds `router_aux_loss_coef` x MoE aux loss.
            encoder_memory: joint pre-training (stages 1-2) only: per-layer encoder states `[B, L, T', D]` read by
                the memory cross-attention in place of the STM (any number of slots T').
        """
        base = self.rxt(input_ids=input_ids, attention_mask=attention_mask, stm=stm, position_ids=position_ids,
                        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                        output_hidden_states=output_hidden_states, return_dict=True, encoder_memory=encoder_memory)
        hidden = base.last_hidden_state
        slice_from = -logits_to_keep if isinstance(logits_to_keep, int) and logits_to_keep > 0 else 0
        kept = hidden[:, slice_from:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep]
        logits = self.lm_head(kept)

        loss = lm_loss = None
        aux_loss = base.aux_loss
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss if aux_loss is None else lm_loss + self.config.router_aux_loss_coef * aux_loss
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output = RxTOutput(loss=loss, logits=logits, past_key_values=base.past_key_values, lm_loss=lm_loss,
                           aux_loss=aux_loss, hidden_states=base.hidden_states)
        return output if return_dict else output.to_tuple()

    # -------------------------------------------------------------- generation
    def _prepare_cache_for_generation(self, generation_config: GenerationConfig, model_kwargs: dict, *args, **kwargs):
        """transformers' cache for `generate` (dynamic, static, ...) as the self-attention cache of an `RxTCache`,
        whose cross-attention cache receives the memory keys/values at the first step."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("past_key_values") is not None:
            model_kwargs["past_key_values"] = RxTCache.wrap(model_kwargs["past_key_values"], self.config)

    def get_compiled_call(self, compile_config: Optional[CompileConfig]) -> Callable:
        """transformers' compiled decode step (`generate(..., compile_config=...)`), traced with dynamo's
        `capture_scalar_outputs`: the MoE's CPU decode step then reads its routing as integers inside the graph and
        runs only the chosen experts on views of their weights, where the graph would otherwise run every expert
        (`grouped_mm`) or gather the chosen ones into copies (`batched_mm`). Measured 7.6-7.9 -> 5.8-6.2 ms per
        step of an RxT-Alpha-Mini-shaped model, 1 thread (benchmarks/RESULTS_decode.md)."""
        compiled = super().get_compiled_call(compile_config)

        def call(*args, **kwargs):
            with torch._dynamo.config.patch(capture_scalar_outputs=True):
                return compiled(*args, **kwargs)

        return call

    def create_masks_for_generate(self, config, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                  past_key_values: Cache, position_ids: Optional[torch.Tensor] = None, **kwargs):
        """The 4-D self-attention mask `generate` prepares for a static cache (outside the compiled step): the
        model's own mask, sized to the cache, so that every kernel sees the same mask as without a static cache."""
        length = inputs_embeds.shape[1]
        past = int(past_key_values.get_seq_length())
        kv_length = past_key_values.get_mask_sizes(length, 0)[0]
        mask = self_attention_mask(attention_mask, length, past, kv_length, inputs_embeds.device, allow_none=False)
        return mask.expand(inputs_embeds.shape[0], -1, -1, -1)

    MEMORY_UPDATE_MODES = ("async", "sync", "none")

    @torch.no_grad()
    def generate(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 stm: Optional[Union[STMCache, torch.Tensor]] = None, memory_update: str = "async", **kwargs):
        """Answer one query per row with transformers' `generate`, then write the interaction into `stm`.

        Args:
            input_ids: the prompt as the chat template renders it with `add_generation_prompt=True`, i.e.
                `[BOS][Q]query[A]`, left-padded in a batch. Nothing is added to it.
            stm: the conversations' `STMCache` (one row per conversation, or one row shared by all).
            memory_update: "async" (default: the update runs after the answer on the process's memory-update
                worker thread, or on a side stream on CUDA;
                `stm.wait()`, any read of `stm.memory` and the next `generate` wait for it), "sync", or "none".
            **kwargs: anything `GenerationMixin.generate` takes (sampling, beams, `num_return_sequences`,
                logits processors, stopping criteria, streamers, `return_dict_in_generate`, static caches,
                `prompt_lookup_num_tokens`, `assistant_model`, ...).

        Returns what `GenerationMixin.generate` returns: the prompt followed by the new tokens. With several
        sequences per row (beams, `num_return_sequences`), the first of each row's group updates the memory.

        As an `assistant_model` of another model's `generate` (transformers then calls this with an assistant
        generation config), the model drafts tokens reading that call's memory and never writes any memory.
        """
        generation_config = kwargs.get("generation_config")
        if generation_config is not None and generation_config.is_assistant:
            return self._draft_for_assisted_generation(input_ids, attention_mask, stm, **kwargs)
        if memory_update not in self.MEMORY_UPDATE_MODES:
            raise ValueError(f"memory_update={memory_update!r}; expected one of {self.MEMORY_UPDATE_MODES}")
        if stm is None:
            raise ValueError("generate needs the conversation state: pass stm=model.init_memory(batch_size) (or the "
                             "conversation's STMCache)")
        if input_ids is None:
            raise ValueError("generate needs input_ids: the prompt [BOS][Q]query[A] (tokenizer.apply_chat_template("
                             "..., add_generation_prompt=True))")
        if not isinstance(stm, STMCache):
            if memory_update == "async":
                raise ValueError("generate(memory_update='async') needs an STMCache to wait on, not a bare tensor: "
                                 "pass stm=STMCache(memory) (then stm.wait()), or memory_update='sync'")
            stm = STMCache(stm)
        stm.wait()  # a pending update must land first; a failed one raises here
        self._check_token_ids(input_ids, attention_mask, "input_ids")
        batch, prompt_len = input_ids.shape
        self.check_stm(stm, batch)
        self._check_stm_values(stm.memory)
        self._check_prompt_markers(input_ids, attention_mask)
        if memory_update != "none" and stm.batch_size != batch:
            raise ValueError(f"STM batch {stm.batch_size} != query batch {batch}: a shared single-row memory cannot be "
                             "updated by several conversations; use one row per conversation or memory_update='none'")
        self._check_generation_length(prompt_len, kwargs)
        memory = stm.memory
        if memory_update == "none":
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, stm=memory, **kwargs)
        # The answer ends where this call's generation config says (its eos and pad ids), resolved as generate does.
        call_kwargs = {k: v for k, v in kwargs.items() if k != "generation_config"}
        call_config, _ = self._prepare_generation_config(kwargs.get("generation_config"), **call_kwargs)
        stm.reserve()  # from here on, readers of stm wait for this interaction's update
        try:
            output = super().generate(input_ids=input_ids, attention_mask=attention_mask, stm=memory, **kwargs)
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            group = sequences.shape[0] // batch
            ids, mask = self.interactions_from_generation(sequences[::group], prompt_len, attention_mask,
                                                          generation_config=call_config)
        except BaseException:
            stm.release()  # no answer, no update: the memory stays as it was
            raise
        self.update_memory(ids, mask, stm, background=memory_update == "async", _reserved=True)
        return output

    def _draft_for_assisted_generation(self, input_ids, attention_mask, stm, **kwargs):
        """Draft tokens for assisted decoding: the main model's memory is read (it reaches the assistant among the
        main call's model inputs) and never written. The prompt grows by the accepted tokens between drafts, so
        it does not end with [A]; the main model checked the prompt before."""
        if stm is None:
            raise ValueError("an RxT assistant model drafts from the conversation's memory: the main model's generate "
                             "must be called with stm= (an RxT main model with the same memory geometry)")
        memory = stm.memory if isinstance(stm, STMCache) else stm
        self.check_stm(memory, input_ids.shape[0])
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, stm=memory, **kwargs)

    def _check_generation_length(self, prompt_len: int, kwargs: dict) -> None:
        limit = self.config.max_interaction_length
        config = kwargs.get("generation_config") or self.generation_config
        max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        if max_new is None and "max_length" not in kwargs:
            kwargs["max_length"] = limit  # by default an answer may run to the end of the interaction window
        total = prompt_len + max_new if max_new is not None else kwargs.get("max_length", config.max_length)
        if prompt_len >= limit or (total is not None and total > limit):
            raise ValueError(
                f"the query has {prompt_len} tokens and generation may reach {total}, but an interaction "
                f"([BOS][Q]query[A]answer[EOS]) holds at most {limit} tokens for this model. Shorten the query or "
                f"lower max_new_tokens to {max(limit - prompt_len, 0)}; nothing is truncated silently."
            )

    def interactions_from_generation(self, sequences: torch.LongTensor, prompt_len: int,
                                     prompt_mask: Optional[torch.Tensor] = None, *,
                                     generation_config: Optional[GenerationConfig] = None):
        """Right-padded `[BOS][Q]query[A]answer[EOS]` per row from `generate` output.

        Drops the prompt's left padding and everything after each row's first EOS or first pad id (the padding
        `generate` adds to finished rows). A row cut by a length limit keeps its answer without EOS, as generated.
        `generation_config` is the one generation ran with (default: the model's): its EOS ids (one, a list, or
        None: no EOS) end the answer, and, as in `generate`, its pad id (else the first EOS) fills finished rows.
        """
        device = sequences.device
        if prompt_mask is None:
            prompt_mask = torch.ones(sequences.shape[0], prompt_len, dtype=torch.bool, device=device)
        generated = sequences[:, prompt_len:]
        config = generation_config or self.generation_config
        eos = config.eos_token_id
        eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids or [None])[0]
        is_eos = torch.isin(generated, torch.as_tensor(eos_ids, dtype=generated.dtype, device=device)).long()
        # With an EOS, `generate` fills rows that stopped early (EOS, or a per-row stopping criterion) with the pad
        # id; without one it pads nothing, and a pad id in the answer is a generated token.
        is_pad = (generated == pad_token_id).long() if eos_ids else torch.zeros_like(generated)
        answer = ((is_eos.cumsum(-1) - is_eos) == 0) & (is_pad.cumsum(-1) == 0)
        keep = torch.cat([prompt_mask.bool(), answer], dim=1)
        # Stable sort moves kept tokens to the front of each row in order: a loop-free right-padding.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        lengths = keep.sum(dim=1)
        width = int(lengths.max())
        ids = sequences.gather(1, order)[:, :width]
        mask = torch.arange(width, device=device)[None] < lengths[:, None]
        ids = ids.masked_fill(~mask, self.config.pad_token_id)
        return ids, mask.long()

    # -------------------------------------------------------------- rxlm-style conveniences
    # rxlm users' call sites (`model.interact(...)`, ...) delegate to `transformers_rxt.RxTInteractor`, which is not
    # part of the model (nor of its remote code): each call builds the facade over this model and its tokenizer.
    def set_tokenizer(self, tokenizer) -> None:
        """Attach a tokenizer for the delegating text helpers (`tokenize_query`, `stringify_token`, ...)."""
        self._rxt_tokenizer = tokenizer

    def interactor(self):
        """`transformers_rxt.RxTInteractor(self, tokenizer)`: rxlm's `interact` API (needs the package)."""
        try:
            from transformers_rxt.interaction_rxt import RxTInteractor
        except ImportError as error:  # the remote-code copy, without the package
            raise ImportError("the rxlm-style helpers (interact, batch_interact, init_stm_state, tokenize_query, "
                              "stringify_token) need the transformers-rxt package: pip install transformers-rxt; "
                              "without it, use model.generate(..., stm=stm)") from error
        return RxTInteractor(self, getattr(self, "_rxt_tokenizer", None))

    def interact(self, *args, **kwargs):
        """`RxTInteractor.interact`: stream one answer's ids, then -1 / -2 around the memory update."""
        return self.interactor().interact(*args, **kwargs)

    def batch_interact(self, *args, **kwargs):
        """`RxTInteractor.batch_interact`: rxlm-style batch streaming."""
        return self.interactor().batch_interact(*args, **kwargs)

    def init_stm_state(self, *args, **kwargs) -> STMCache:
        """`RxTInteractor.init_stm_state`: one memory update with a text (e.g. a system prompt)."""
        return self.interactor().init_stm_state(*args, **kwargs)

    def tokenize_query(self, *args, **kwargs) -> dict:
        """`RxTInteractor.tokenize_query`: `[BOS][Q]text` tensors (needs `set_tokenizer`)."""
        return self.interactor().tokenize_query(*args, **kwargs)

    def tokenize_full_interaction(self, *args, **kwargs) -> dict:
        """`RxTInteractor.tokenize_full_interaction`: `[BOS][Q]query[A]answer[EOS]` tensors (needs `set_tokenizer`)."""
        return self.interactor().tokenize_full_interaction(*args, **kwargs)

    def stringify_token(self, *args, **kwargs) -> str:
        """`RxTInteractor.stringify_token`: one yielded id as text (needs `set_tokenizer`)."""
        return self.interactor().stringify_token(*args, **kwargs)

    # -------------------------------------------------------------- rxlm checkpoints
    @classmethod
    def from_rxlm_pretrained(cls, path: str, *, torch_dtype: Optional[torch.dtype] = None, **kwargs):
        """Load a reference (rxlm 0.3.80) RxTAlpha/RxTBeta checkpoint with identical numbers.

        `path` is a local directory or a Hub repo with rxlm's `config.json` and `model.safetensors`. Missing
        config keys take the reference's defaults; the memory-attention variant is the one the weights hold.
        Every weight must be accounted for: missing or unexpected weights raise with their names.
        """
        return rxlm_conversion().load_rxlm_model(path, cls, torch_dtype=torch_dtype, **kwargs)


# ============================================================================================= STM ownership
# Component options that change how a model runs (kernels, dropout, logging), not what its memory means.
_RUNTIME_OPTIONS = frozenset({"use_flash_attention", "ff_dropout", "att_dropout", "interlayer_att_dropout",
                              "self_att_dropout", "debug_mode", "debug_interval"})


def architecture_fingerprint(config: RxTConfig) -> str:
    """A short hash of the decoder, encoder and memory-attention options: equal for a model and its saved and
    reloaded copy, different for another architecture even when the memory geometry is the same."""
    parts = {name: {k: v for k, v in getattr(config, name).items() if k not in _RUNTIME_OPTIONS}
             for name in ("decoder_config", "encoder_config", "memory_attention_config")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rxlm_conversion():
    """The rxlm checkpoint loader, `transformers_rxt.conversion.rxlm`, imported when first used: this file is also
    the remote code copied next to the weights, which must load without the conversion code (or the package)."""
    try:
        from transformers_rxt.conversion import rxlm
    except ImportError as error:  # the remote-code copy, without the package
        raise ImportError("loading rxlm checkpoints needs the transformers-rxt package (its conversion code is not "
                          "part of a saved model's code): pip install transformers-rxt, then call "
                          "from_rxlm_pretrained again, or convert once with `rxt convert-rxlm SRC DST`") from error
    return rxlm


HF_CHECKPOINT_FIX = ("config.json and the weights must come from the same save_pretrained: re-save or re-convert "
                     "the model (rxlm checkpoints load with from_rxlm_pretrained / `rxt convert-rxlm`)")


def raise_on_unaccounted_weights(source: str, missing=(), unexpected=(), mismatched=(), *, fix: str) -> None:
    """Raise if a checkpoint does not hold exactly the model's weights: `missing` and `unexpected` are weight
    names, `mismatched` (name, checkpoint shape, model shape) triples. Nothing is ever kept at random."""
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source}: the checkpoint does not match the model its config describes; refusing to load it with "
             "randomly initialised weights."]
    if missing:
        lines.append(f"  missing weights ({len(missing)}): {sorted(missing)}")
    if unexpected:
        lines.append(f"  unexpected weights ({len(unexpected)}): {sorted(unexpected)}")
    if mismatched:
        lines.append(f"  weights whose shape differs from the config ({len(mismatched)}): "
                     + ", ".join(f"{name} checkpoint {ckpt} vs model {ours}" for name, ckpt, ours in mismatched))
    lines.append(f"Fix: {fix}.")
    raise ValueError("\n".join(lines))
