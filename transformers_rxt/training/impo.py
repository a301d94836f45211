"""Stage 5: Memory Reinforcement Learning with IMPO (training.md §5) as a ``trl.GRPOTrainer``.

IMPO = PPO adapted to a stateful model: one *episode* is a multi-turn conversation whose Short-Term Memory
(STM) is carried from turn to turn. The first interaction of an episode is only written into the memory
("data to save"); the actor then answers ``curriculum_steps`` follow-up queries, each conditioned on the memory,
and every answer is written into the memory before the next query.

How it sits on TRL
------------------
:class:`IMPOConfig` is a ``trl.GRPOConfig`` and :class:`IMPOTrainer` a ``trl.GRPOTrainer``: TRL's config fields
keep their meanings (``per_device_train_batch_size`` counts completions, ``num_generations`` samples per episode,
``beta``, ``epsilon``/``epsilon_high``, ``loss_type``, ``scale_rewards``, ``reward_weights``, ``num_iterations``,
``steps_per_generation``, ``log_completions``), TRL's sampler repeats every episode ``num_generations`` times,
TRL computes the clipped policy loss, the k3 reference KL and the entropy bonus, and logs. Reward functions
follow TRL's protocol exactly (``fn(prompts, completions, completion_ids, **kwargs)``, the dataset's columns
among ``kwargs``, ``None`` for "does not apply"); the default rewards (:func:`default_impo_rewards`: the package's
``TensorBLEUReward``, on the device, and :class:`EmbeddingCosineReward`) are such functions.
The TRL methods overridden, and why:

- ``_generate_and_score_completions`` (TRL's generate-and-score step): a stateful multi-turn rollout replaces
  TRL's single-turn one. Per batch of episodes: one STM per episode (the ``num_generations`` samples of an
  episode start from the same memory), the first interaction written into it, then per follow-up: ``generate``
  conditioned on the memory, scoring with TRL's ``_calculate_rewards``, and the memory update with the answer.
  The steps are flattened into rows of TRL's batch (``prompt_ids``, ``completion_ids``, ``advantages``,
  ``ref_per_token_logps``, ...) plus each row's pre-step memory and previous interaction.
- ``_get_per_token_logps_and_entropies``: TRL calls the model with ids and a mask only; here every row first
  rebuilds its memory *with gradient* (pre-step memory + previous interaction) and the decoder reads it.
  Everything trainable runs inside :class:`RxTForIMPOTraining.forward`, the one module DDP wraps.
- ``_compute_loss``: TRL's loss, plus IMPO's terms computed in the same forward: the memory regulariser
  ``stm_diff_coef * sqrt(k) * MSE(STM_k, STM_{k-1})``, the critic's value loss (``advantage_estimator="critic"``)
  and the optional inter-step KL.
- ``training_step`` (unfreeze schedule: frozen components' gradients are dropped after the all-reduce),
  ``evaluate`` (held-out rollout reward on fresh memories), ``log`` (time shares), ``create_optimizer`` (one
  learning rate per component: ``critic_lr``, ``memory_lr``).

The turns, the memory writes (only the rows whose turn exists) and every per-token log-prob (policy, reference,
rollout) go through the episode engine (:mod:`.episodes`: ``iter_turns``, ``compute_memory_update``,
``sequence_log_probs``, whose log-probs are TRL's ``selective_log_softmax`` to the bit).

TRL's ``rollout_func`` is not used: it returns one completion per prompt with no way to carry a memory between
turns or to return the per-row memories the loss needs.

The memory carried between batches (``random_resets_ratio < 1``) is saved next to every checkpoint (one file per
process, :class:`CarriedMemoryCallback`, a public ``TrainerCallback.on_save``) and read back by
``train(resume_from_checkpoint=...)``, so a resumed run continues from the memory the interrupted one had.

Not done (see the report in the stage notes): the running-mean embedding term of the reward, GAE, a replay
buffer, memory warm-up.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import ModelOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from ..cache_rxt import STMCache
from ..data import DataCollatorForRxTEpisodes
from ..extras import require_extra
from ..metrics import TensorBLEUReward
from ..modeling_rxt import RxTForConversationalGeneration, flat_rxt_key
from .episodes import compute_memory_update, iter_turns, sequence_log_probs
from .utils import ComponentOptimizerMixin, RxTStageModel, _mix_seed, load_rxt_model, restore_class_forward

trl = require_extra("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits, nanstd  # noqa: E402

from ..hub.trainer import RxTHubTrainerMixin  # noqa: E402

__all__ = [
    "FREEZE_MODES",
    "EmbeddingCosineReward",
    "IMPOConfig",
    "IMPOStage",
    "IMPOTrainer",
    "RxTForIMPOTraining",
    "RxTValueCritic",
    "TopicChangeReward",
    "clipped_policy_loss",
    "default_impo_rewards",
    "exponential_schedule",
    "interstep_kl",
    "masked_mean",
    "reference_kl",
    "run_impo_curriculum",
    "stm_difference_loss",
    "trainable_by_mode",
]

STRATEGIES = ("cumulative", "long_range")
FREEZE_MODES = ("warmup", "fetch", "update", "all")
ESTIMATORS = ("group", "critic", "batch")


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class IMPOConfig(GRPOConfig):
    """Arguments of :class:`IMPOTrainer`: a ``trl.GRPOConfig`` (every TRL field keeps its meaning) plus the MRL
    curriculum and IMPO's own loss terms.

    As in TRL, ``per_device_train_batch_size`` counts completions: a batch holds
    ``per_device_train_batch_size * steps_per_generation / num_generations`` episodes per process, each rolled
    out for ``curriculum_steps`` follow-ups (so TRL's loss sees ``curriculum_steps`` rows per completion).

    Defaults that differ from ``GRPOConfig``: ``beta=0.05`` (training.md's reference-KL weight), ``loss_type=
    "grpo"`` (the per-sequence mean of training.md §5.6), ``entropy_coef=0.01``, ``num_generations=4``,
    ``max_completion_length=32``, ``gradient_checkpointing=False`` and ``bf16=False`` (small CPU models),
    ``logging_steps=1``.
    """

    # TRL fields with IMPO's defaults
    beta: float = field(default=0.05, metadata={"help": "Reference-KL coefficient (TRL's beta)."})
    loss_type: str = field(default="grpo", metadata={"help": "TRL's loss aggregation ('grpo', 'dapo', ...)."})
    entropy_coef: float = field(default=0.01, metadata={"help": "TRL's entropy bonus coefficient."})
    num_generations: int | None = field(default=4, metadata={
        "help": "Samples per episode (TRL's num_generations); 1 is allowed with the 'critic' or 'batch' baseline."})
    max_completion_length: int | None = field(default=32, metadata={"help": "Max generated answer tokens."})
    gradient_checkpointing: bool = False
    bf16: bool | None = False
    logging_steps: float = 1
    # curriculum (training.md §5.2-5.4)
    curriculum_steps: int = field(default=1, metadata={"help": "Follow-up interactions per episode (after the first)."})
    strategy: str = field(default="cumulative", metadata={"help": "'cumulative' or 'long_range' retention."})
    random_resets_ratio: float = field(default=1.0, metadata={"help": "Probability that an episode's STM row is "
                                                              "reset (1 = always; else the previous memory is kept)."})
    teacher_forcing: bool = field(default=False, metadata={"help": "Write the dataset answer into memory."})
    unfreeze_schedule: str = field(default="0:all", metadata={
        "help": "'step:mode,...' with modes warmup (memory attention only), fetch (+ decoder memory "
                "cross-attention), update (+ encoder), all. E.g. '0:fetch,50:all'."})
    # advantages and IMPO's loss terms (training.md §5.6-5.8)
    advantage_estimator: str = field(default="group", metadata={
        "help": "'group' (TRL's: per-episode mean over num_generations, scaled as scale_rewards says), 'critic' "
                "(r - V(s), normalised over the batch unless scale_rewards='none') or 'batch' (r - batch mean)."})
    interstep_kl_coef: float = field(default=0.0, metadata={
        "help": "Weight of KL(pi_k || pi_{k-1}) between consecutive steps' answer distributions."})
    stm_diff_coef: float = field(default=1e-4, metadata={"help": "Weight of sqrt(k) * MSE(STM_k, STM_{k-1})."})
    vf_coef: float = field(default=1.0, metadata={"help": "Value-loss weight (critic has its own LR)."})
    critic_value_clip: float = 20.0
    critic_lr: float = 1e-4
    critic_max_len: int | None = field(default=None, metadata={"help": "Critic input length (default 2x seq_len)."})
    critic_init_scale: float = field(default=1.0, metadata={"help": "Initial scale of the sigmoid value head "
                                                            "(reference: 10 with rewards scaled to 0-10)."})
    memory_lr: float | None = field(default=None, metadata={"help": "LR of memory attention (default learning_rate)."})

    def __post_init__(self) -> None:
        if self.advantage_estimator not in ESTIMATORS:
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r}; expected one of {ESTIMATORS}")
        # GRPOConfig refuses num_generations=1 (its group baseline needs two samples); the critic and batch
        # baselines do not, so the check runs on 2 and the value is put back.
        single = self.num_generations == 1 and self.advantage_estimator != "group"
        if single:
            self.num_generations = 2
        super().__post_init__()
        if single:
            self.num_generations = 1
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; expected one of {STRATEGIES}")
        if self.curriculum_steps < 1:
            raise ValueError("curriculum_steps must be >= 1")
        if self.strategy == "long_range" and self.curriculum_steps < 2:
            raise ValueError("long_range retention needs curriculum_steps >= 2 (topic change, then recall)")
        local = self.per_device_train_batch_size * self.steps_per_generation
        if local % self.num_generations:
            raise ValueError(f"per_device_train_batch_size * steps_per_generation ({local}) must be divisible by "
                             f"num_generations ({self.num_generations}): the samples of an episode share one "
                             "memory, so a group must live on one process")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("IMPOTrainer supports multi_objective_aggregation='sum_then_normalize' only")
        if self.use_vllm:
            raise ValueError("use_vllm: vLLM cannot generate conditioned on an RxT memory; set use_vllm=False")
        parse_unfreeze_schedule(self.unfreeze_schedule)

    def mode_at(self, step: int) -> str:
        mode = "all"
        for start, m in parse_unfreeze_schedule(self.unfreeze_schedule):
            if step >= start:
                mode = m
        return mode


def parse_unfreeze_schedule(spec: str) -> list[tuple[int, str]]:
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        start, _, mode = part.partition(":")
        if mode not in FREEZE_MODES:
            raise ValueError(f"unfreeze_schedule entry {part!r}: mode must be one of {FREEZE_MODES}")
        out.append((int(start), mode))
    return sorted(out)


def trainable_by_mode(name: str, mode: str) -> bool:
    """Is parameter ``name`` (of an RxT model, optional ``rxt.`` prefix) trained in freezing ``mode``
    (training.md §5.9)? Parameters outside the RxT model (the critic) are always trained."""
    name = flat_rxt_key(name)
    if not name.startswith(("decoder.", "encoder.", "memory_attention.", "embed_tokens")):
        return True
    if mode == "all":
        return True
    if name.startswith("memory_attention."):
        return True
    memory_xattn = name.startswith("decoder.") and any(
        f".{part}." in name for part in ("memory_cross_attention", "norm2", "stm_norm"))
    if mode in ("fetch", "update") and memory_xattn:
        return True
    return mode == "update" and name.startswith("encoder.")


# ---------------------------------------------------------------------------------------------------- loss terms
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clip with a sequence-level advantage: ``-mean_b [sum_t m_t min(rho A, clip(rho) A) / n_b]`` (what
    TRL's ``loss_type="grpo"`` computes; kept as a reference for the tests). Returns (loss, clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.minimum(unclipped, clipped)
    loss = masked_mean(per_token, mask, dim=1).mean()
    clip_frac = masked_mean(((ratio - 1).abs() > epsilon).float(), mask)
    return loss, clip_frac


def reference_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of the k3 estimator of KL(pi || pi_ref) on the sampled tokens (as TRL's GRPO):
    ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, unbiased)."""
    d = ref_logp - logp
    return masked_mean(torch.exp(d) - d - 1, mask, dim=1).mean()


def interstep_kl(logits: torch.Tensor, prev_logp: torch.Tensor, mask: torch.Tensor,
                 prev_mask: torch.Tensor) -> torch.Tensor:
    """Policy stabilisation: ``KL(pi_k || pi_{k-1})`` between the full next-token distributions of two
    consecutive steps, aligned by answer position, averaged over positions valid in both (the previous step's
    log-probs are detached). ``logits`` [B, C, V], ``prev_logp`` [B, C', V] (log-softmax)."""
    n = min(logits.shape[1], prev_logp.shape[1])
    logp = torch.log_softmax(logits[:, :n].float(), -1)
    kl = (logp.exp() * (logp - prev_logp[:, :n].detach().float())).sum(-1)
    return masked_mean(kl, mask[:, :n] * prev_mask[:, :n])


def stm_difference_loss(stm_after: torch.Tensor, stm_before: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """Memory regularisation ``sqrt(step) * MSE(STM_after, STM_before)`` (``step`` 1-based, i.e. the
    reference's ``sqrt(k + 1)`` with 0-based k). With a tensor of per-row steps, the mean over rows of each
    row's ``sqrt(step) * MSE``."""
    if not torch.is_tensor(step):
        return math.sqrt(step) * F.mse_loss(stm_after.float(), stm_before.detach().float())
    per_row = (stm_after.float() - stm_before.detach().float()).pow(2).flatten(1).mean(1)
    return (step.float().sqrt() * per_row).mean()


# ---------------------------------------------------------------------------------------------------- rewards
def _padded(rows: Sequence[Sequence[int]], device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


class TopicChangeReward:
    """Wraps a TRL reward function that scores the answer against the saved interaction (``saved_ids``): at a
    long-range topic change (the ``topic_change`` kwarg, which :class:`IMPOTrainer` passes) the answer should
    *not* repeat the saved data, so the score there becomes ``1 - score`` (training.md §5.4)."""

    def __init__(self, func: Callable[..., list], name: str | None = None):
        self.func = func
        self.__name__ = name or getattr(func, "__name__", type(func).__name__)

    def __call__(self, prompts, completions, completion_ids, topic_change=None, **kwargs) -> list[float | None]:
        scores = self.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        flips = topic_change if topic_change is not None else [False] * len(scores)
        return [None if x is None else (1.0 - x if flip else x) for x, flip in zip(scores, flips)]


class EmbeddingCosineReward:
    """TRL reward function: cosine similarity (clamped at 0) between the mean token embedding of the answer and
    that of the token ids in ``reference_column`` (``reference_ids``: the reference answer, ``saved_ids``: the
    saved interaction; training.md §5.5). ``embedding`` is the actor's token embedding (shared weights, so the
    reward follows training); computed on its device."""

    def __init__(self, embedding: nn.Embedding, reference_column: str = "reference_ids", name: str = "cosine"):
        self.embedding, self.reference_column, self.__name__ = embedding, reference_column, name

    @torch.no_grad()
    def _mean(self, rows) -> torch.Tensor:
        ids, mask = _padded(rows, self.embedding.weight.device)
        return F.normalize(masked_mean(self.embedding(ids).float(), mask[..., None], dim=1), dim=-1)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        if self.reference_column not in kwargs:
            raise KeyError(f"EmbeddingCosineReward: no {self.reference_column!r} among the reward kwargs")
        return (self._mean(completion_ids) * self._mean(kwargs[self.reference_column])).sum(-1).clamp(min=0).tolist()


def default_impo_rewards(embedding: nn.Embedding) -> tuple[list[Callable[..., list]], list[float]]:
    """IMPO's reward (training.md §5.5, the reference's weights) as TRL reward functions and their weights:
    TensorBLEU-2 (method 4) of the answer against the reference answer and against the saved interaction, and the
    embedding cosine against both, each weighted 0.25; the saved-data terms flip at a topic change."""
    bleu = dict(max_n=2, smoothing="method4")
    funcs = [TensorBLEUReward("reference_ids", name="bleu_ref", **bleu),
             TopicChangeReward(TensorBLEUReward("saved_ids", name="bleu_saved", **bleu)),
             EmbeddingCosineReward(embedding, "reference_ids", name="cosine_ref"),
             TopicChangeReward(EmbeddingCosineReward(embedding, "saved_ids", name="cosine_saved"))]
    return funcs, [0.25, 0.25, 0.25, 0.25]


# ---------------------------------------------------------------------------------------------------- critic
class RxTValueCritic(nn.Module):
    """Memory-less text critic (training.md §5.1): a copy of the RxT encoder (and token embedding), masked
    mean pooling of its last layer, ``GLU(D->D, SiLU) -> LayerNorm -> Linear(D->1) -> sigmoid``, times a
    learnable ``scale`` plus ``shift``. Input: the saved interaction and the next query."""

    def __init__(self, rxt: RxTForConversationalGeneration, init_scale: float = 1.0, activation: str = "sigmoid"):
        super().__init__()
        dim = rxt.config.hidden_size
        self.embed_tokens = copy.deepcopy(rxt.embed_tokens)
        self.encoder = copy.deepcopy(rxt.encoder)
        self.glu = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.value = nn.Linear(dim, 1)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.shift = nn.Parameter(torch.tensor(0.0))
        self.activation = activation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        key_mask = attention_mask.bool()[:, None, None, :]
        states, _ = self.encoder(hidden, positions=positions, key_mask=key_mask)
        pooled = masked_mean(states[:, -1], attention_mask[..., None], dim=1)
        a, b = self.glu(pooled).chunk(2, dim=-1)
        v = self.value(self.norm(a * F.silu(b)))[:, 0]
        if self.activation == "sigmoid":
            v = torch.sigmoid(v)
        elif self.activation == "tanh":
            v = torch.tanh(v)
        return v * self.scale + self.shift


# ---------------------------------------------------------------------------------------------------- module
@dataclass
class IMPOForwardOutput(ModelOutput):
    """What :class:`RxTForIMPOTraining` returns for TRL's loss: per-token log-probs and entropies of the
    completions ([R, C]), and IMPO's extra terms (scalars; ``None`` when off)."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    stm_diff: torch.Tensor | None = None
    value_loss: torch.Tensor | None = None
    kl_interstep: torch.Tensor | None = None


class RxTForIMPOTraining(RxTStageModel):
    """Stage 5 (IMPO): the actor (this RxT model) and the critic (``critic``, optional). ``forward`` takes the
    rows of TRL's batch (one per episode sample and follow-up step) and computes, with gradient, each row's
    memory (its pre-step memory updated with the previous interaction), the completion's log-probs and
    entropies read from that memory, and IMPO's terms. It is the one module ``Trainer`` and DDP wrap, so every
    trainable computation runs here. The reference model is not part of it (frozen, its log-probs come with the
    rollout). ``stage_args`` is an [`IMPOConfig`]."""

    def __init__(self, config, stage_args: Any = None):
        super().__init__(config, stage_args)
        self.critic: RxTValueCritic | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                prev_memory: torch.Tensor, prev_ids: torch.Tensor, prev_mask: torch.Tensor,
                prev_valid: torch.Tensor, step_index: torch.Tensor, loss_mask: torch.Tensor | None = None,
                critic_ids: torch.Tensor | None = None, critic_mask: torch.Tensor | None = None,
                rewards: torch.Tensor | None = None, prev_step_logp: torch.Tensor | None = None,
                prev_step_mask: torch.Tensor | None = None, **_: Any) -> IMPOForwardOutput:
        a = self.stage_args
        # rows whose previous turn is padding (a finished episode) keep their memory
        memory = compute_memory_update(self, prev_ids, prev_mask, prev_memory, prev_valid.bool())
        logits = RxTForConversationalGeneration.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                                        stm=memory, logits_to_keep=logits_to_keep + 1).logits
        logits = logits[:, :-1].float() / a.temperature  # the last prompt position predicts the first answer token
        log_probs, _ = sequence_log_probs(logits, input_ids[:, -logits_to_keep:], shift=False)
        if loss_mask is not None:  # 0 where nothing is trained, as in the rollout's log-probs (see _teacher_forced)
            log_probs = log_probs * loss_mask
        out = IMPOForwardOutput(log_probs=log_probs, entropy=entropy_from_logits(logits),
                                stm_diff=stm_difference_loss(memory, prev_memory, step_index))
        if self.critic is not None:
            c = a.critic_value_clip
            values = self.critic(critic_ids, critic_mask)
            out.value_loss = F.mse_loss(values.clamp(-c, c), rewards.clamp(-c, c))
        if prev_step_logp is not None:
            mask = loss_mask if loss_mask is not None else attention_mask[:, -logits_to_keep:]
            out.kl_interstep = interstep_kl(logits, prev_step_logp, mask, prev_step_mask)
        return out


# ---------------------------------------------------------------------------------------------------- helpers
def left_pad_prompts(ids: torch.Tensor, prompt_lengths: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded full interactions [B, T] + prompt lengths -> left-padded prompts [B, P] and mask."""
    width = max(int(prompt_lengths.max()), 1)
    idx = torch.arange(width, device=ids.device)[None] - (width - prompt_lengths)[:, None]
    valid = idx >= 0
    out = ids.gather(1, idx.clamp(min=0)).masked_fill(~valid, pad_id)
    return out, valid.long()


def concat_right_padded(a: torch.Tensor, am: torch.Tensor, b: torch.Tensor, bm: torch.Tensor, pad_id: int,
                        max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate two right/left-padded id tensors row by row into one right-padded tensor."""
    ids = torch.cat([a, b], dim=1)
    keep = torch.cat([am, bm], dim=1).bool()
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    lengths = keep.sum(1)
    width = max(int(lengths.max()), 1)
    if max_len is not None:
        width = min(width, max_len)
    ids = ids.gather(1, order)[:, :width]
    mask = torch.arange(width, device=ids.device)[None] < lengths[:, None]
    return ids.masked_fill(~mask, pad_id), mask.long()


def completion_mask(completion: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS, 0 after it (and from the first pad on)."""
    is_eos = (completion == eos_id).long()
    is_pad = (completion == pad_id).long()
    return (((is_eos.cumsum(-1) - is_eos) == 0) & (is_pad.cumsum(-1) == 0)).long()


def _cat_rows(parts: Sequence[torch.Tensor], value: float = 0, left: bool = False) -> torch.Tensor:
    """Concatenate [B, W_k, ...] tensors along dim 0, padding dim 1 to the widest (on the left for prompts)."""
    width = max(p.shape[1] for p in parts)
    padded = []
    for p in parts:
        extra = [0, 0] * (p.dim() - 2) + ([width - p.shape[1], 0] if left else [0, width - p.shape[1]])
        padded.append(F.pad(p, extra, value=value))
    return torch.cat(padded, 0)


def _rows(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@torch.no_grad()
def _teacher_forced(model: RxTForConversationalGeneration, sequences, sequence_mask, memory, width: int,
                    temperature: float, trained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [B, width] of the last ``width`` tokens of ``sequences`` read from ``memory`` (what
    the training forward computes), 0 where ``trained`` [B, width] is 0, and the logits [B, width, V] that
    predicted them (temperature-scaled).

    Zero, not the log-prob of the padding token, where nothing is trained: TRL's loss takes exp(ref - policy) and
    exp(policy - old) at every position before it masks, and the batch pads rows of shorter steps with 0. A
    padding token the model has learned never to emit has log-prob -100 or less, so a masked position held
    exp(100+) = inf, and inf x 0 = NaN reached every weight (a main-job IMPO run failed so at step 49)."""
    logits = model(input_ids=sequences, attention_mask=sequence_mask, stm=memory, logits_to_keep=width + 1).logits
    logits = logits[:, :-1].float() / temperature
    return sequence_log_probs(logits, sequences[:, -width:], shift=False)[0] * trained, logits


# ---------------------------------------------------------------------------------------------------- trainer
RewardFunc = Callable[..., list]
logger = logging.get_logger(__name__)
CARRIED_MEMORY_NAME = "impo_carried_memory"


def carried_memory_file(checkpoint_dir: str | os.PathLike, process_index: int) -> str:
    """Where a process's carried memories are saved in a checkpoint directory (one file per process: each
    process carries the memories of its own episodes)."""
    return os.path.join(checkpoint_dir, f"{CARRIED_MEMORY_NAME}-{process_index}.safetensors")


class CarriedMemoryCallback(TrainerCallback):
    """Saves the memories the last training batch left (actor's and reference's, carried into the next batch
    when ``random_resets_ratio < 1``) next to each checkpoint ``Trainer`` writes."""

    def __init__(self, trainer: IMPOTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        carried = self.trainer._carried
        if carried is None:
            return
        from safetensors.torch import save_file

        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_file({k: v.detach().contiguous().cpu() for k, v in carried.items()},
                  carried_memory_file(checkpoint, args.process_index))


class IMPOTrainer(RxTHubTrainerMixin, ComponentOptimizerMixin, GRPOTrainer):
    """Memory Reinforcement Learning with IMPO on RxT episodes, as a ``trl.GRPOTrainer`` (see the module doc for
    the TRL methods overridden and why).

    Args:
        model: an ``RxTForConversationalGeneration`` (or a path to one, e.g. the stage-4 output): the actor.
        reward_funcs: TRL reward functions ``fn(prompts, completions, completion_ids, **kwargs)``, weighted by
            ``args.reward_weights`` (TRL's semantics). ``kwargs`` hold the dataset columns of the episode (as in
            TRL) and, per follow-up step: ``step`` (1-based), ``references`` (the reference answer's text),
            ``reference_ids``, ``saved_ids`` (the interaction the answer should recall, token ids),
            ``topic_change`` (long-range step 1), plus TRL's ``trainer_state``, ``log_extra``, ``log_metric``.
            Default: :func:`default_impo_rewards` (TensorBLEU and embedding cosine against the reference answer
            and the saved interaction, training.md §5.5).
        args: :class:`IMPOConfig`.
        train_dataset: MRL episodes, tokenized with :func:`~transformers_rxt.data.tokenize_mrl_dataset` (raw
            records are tokenized here). Turn 0 is the interaction to save; turns 1..``curriculum_steps`` are
            the follow-ups (episodes need that many turns).
        processing_class: the RxT tokenizer (required by TRL: reward functions get decoded text).
        ref_model: frozen reference (default: a frozen copy of the initial actor), with its own memory.
        critic: :class:`RxTValueCritic` (default: built from the actor's encoder when
            ``advantage_estimator="critic"``).
    """

    rxt_stage = "mrl"  # the stage name in the model card's training table
    _tag_names = ["trl", "grpo", "impo", "rxt"]
    _name = "IMPO"

    def __init__(self, model: RxTForConversationalGeneration | str, reward_funcs: RewardFunc | list | None = None,
                 args: IMPOConfig | None = None, train_dataset=None, eval_dataset=None, processing_class=None,
                 reward_processing_classes=None, callbacks=None, optimizers=(None, None),
                 ref_model: RxTForConversationalGeneration | None = None, critic: RxTValueCritic | None = None):
        if not isinstance(args, IMPOConfig):
            raise TypeError(f"IMPOTrainer needs args=IMPOConfig(...), got {type(args).__name__}")
        if args.sync_ref_model:
            raise ValueError("sync_ref_model is not supported by IMPOTrainer (the reference is an RxT model with "
                             "its own memory, not a copy of the stage module); set sync_ref_model=False")
        rxt = load_rxt_model(model) if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else model
        rxt.train()
        module = RxTForIMPOTraining.from_rxt(rxt, args)
        if args.advantage_estimator == "critic":
            module.critic = critic if critic is not None else RxTValueCritic(rxt, init_scale=args.critic_init_scale)
        if reward_funcs is None:
            reward_funcs, weights = default_impo_rewards(rxt.get_input_embeddings())
            if args.reward_weights is None:
                args.reward_weights = weights
        if processing_class is not None:
            train_dataset = self._maybe_tokenize(train_dataset, processing_class)
            eval_dataset = self._maybe_tokenize(eval_dataset, processing_class)
        # TRL builds the reference itself from the model's path when beta != 0; IMPO's reference is an RxT model
        # with its own memory (given or copied here), so TRL's construction runs with beta=0 and it is set after.
        beta, args.beta = args.beta, 0.0
        try:
            super().__init__(model=module, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class,
                             reward_processing_classes=reward_processing_classes,
                             callbacks=[*(callbacks or []), CarriedMemoryCallback(self)], optimizers=optimizers)
        finally:
            args.beta = beta
        self.beta = beta
        # TRL's fused LM head patches `forward` to run the backbone on ids alone (no memory): the stage module
        # computes the log-probs from memory-conditioned logits itself.
        restore_class_forward(self.model)
        ref = ref_model if ref_model is not None else copy.deepcopy(rxt)
        ref.eval().requires_grad_(False)
        self.ref_model = self.accelerator.prepare_model(ref, evaluation_mode=True) if beta != 0.0 else ref.to(
            self.accelerator.device)
        self.episode_collator = DataCollatorForRxTEpisodes.from_tokenizer(self.processing_class)
        # TRL's completion log keeps one generation batch; here a generation batch has a row per follow-up step
        rows = args.generation_batch_size * args.curriculum_steps
        self._logs = {key: (defaultdict(lambda: deque(maxlen=rows)) if isinstance(value, dict) else deque(maxlen=rows))
                      for key, value in self._logs.items()}
        self._carried: dict[str, torch.Tensor] | None = None  # memories left by the previous batch
        self._impo_inputs: dict[str, Any] | None = None
        self._impo_terms: IMPOForwardOutput | None = None
        self._mode: str | None = None
        self._frozen: list[nn.Parameter] = []
        self.timings = {"generation": 0.0, "reward": 0.0, "reference": 0.0, "update": 0.0}
        self.episodes_seen = 0

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs: Any):
        """TRL's ``train``; resuming from a checkpoint also restores the memories the interrupted run carried
        into its next batch (saved by :class:`CarriedMemoryCallback`), so the resumed run continues as the
        uninterrupted one would."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._carried = self._load_carried_memory(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _load_carried_memory(self, checkpoint: str | os.PathLike) -> dict[str, torch.Tensor] | None:
        path = carried_memory_file(checkpoint, self.args.process_index)
        if not os.path.isfile(path):
            if self.args.random_resets_ratio < 1.0:
                logger.warning(f"{path} not found: the resumed run starts its episodes from fresh memories, not "
                               "from those the interrupted run carried (a checkpoint written before they were saved)")
            return None
        from safetensors.torch import load_file

        return {k: v.to(self.accelerator.device) for k, v in load_file(path).items()}  # safetensors refuses "cpu:0"

    @staticmethod
    def _maybe_tokenize(ds, tokenizer):
        from ..data import tokenize_mrl_dataset

        cols = getattr(ds, "column_names", None)
        if cols is not None and "turn_input_ids" not in cols:
            return tokenize_mrl_dataset(ds, tokenizer)
        return ds

    # -------------------------------------------------------------- optimizer groups
    def component_learning_rates(self) -> dict[str, float]:
        lrs = {"critic": self.args.critic_lr}
        if self.args.memory_lr is not None:
            lrs["memory_attention"] = self.args.memory_lr
        return lrs

    # -------------------------------------------------------------- freezing (DDP-safe: grads dropped)
    def apply_freeze_mode(self) -> str:
        mode = self.args.mode_at(self.state.global_step)
        if mode != self._mode:
            self._frozen = [p for n, p in self.model.named_parameters() if not trainable_by_mode(n, mode)]
            if self._mode is not None and self.is_world_process_zero():
                print(f"[IMPOTrainer] step {self.state.global_step}: freezing mode {mode}")
            self._mode = mode
        return mode

    def training_step(self, model, inputs, num_items_in_batch):
        """TRL's step, with the unfreeze schedule: the frozen components' gradients (already all-reduced) are
        dropped after backward, so every process runs the same graph (DDP) and frozen weights do not move."""
        self.apply_freeze_mode()
        t0, rollout = time.perf_counter(), sum(self.timings.values())
        loss = super().training_step(model, inputs, num_items_in_batch)
        for p in self._frozen:
            p.grad = None
        # the step's own time, less the rollout (generate, reference, rewards) TRL ran inside it
        self.timings["update"] += time.perf_counter() - t0 - (sum(self.timings.values()) - rollout)
        return loss

    # -------------------------------------------------------------- rollout
    def _actor(self) -> RxTForConversationalGeneration:
        """The policy as a plain RxT model (shared weights) for the rollout's generate and log-probs (built once:
        building the view costs a model ``__init__``)."""
        if getattr(self, "_actor_view", None) is None:
            self._actor_view = self.accelerator.unwrap_model(self.model).as_rxt()
        return self._actor_view

    def _critic(self) -> RxTValueCritic | None:
        return self.accelerator.unwrap_model(self.model).critic

    def _initial_memories(self, batch: int, generator: torch.Generator, train: bool):
        """Actor and reference memories at the start of a batch's episodes, and which rows were reset.

        The ``num_generations`` samples of one episode share one starting memory (a fresh one, or the memory the
        group's first sample left in the previous batch), so the group baseline compares answers read from the
        same memory."""
        actor, group = self._actor(), self.args.num_generations
        episodes = batch // group
        fresh = actor.init_memory(episodes, generator=generator).memory.repeat_interleave(group, 0)
        reset = torch.ones(episodes, dtype=torch.bool, device=fresh.device)
        if train and self._carried is not None and self._carried["actor"].shape[0] == batch \
                and self.args.random_resets_ratio < 1.0:
            reset = torch.rand(episodes, generator=generator, device=fresh.device) < self.args.random_resets_ratio
        reset = reset.repeat_interleave(group)
        if bool(reset.all()):
            return fresh, fresh.clone(), reset
        sel = reset[:, None, None, None]
        carried = {k: v[::group].repeat_interleave(group, 0) for k, v in self._carried.items()}
        return torch.where(sel, fresh, carried["actor"]), torch.where(sel, fresh, carried["ref"]), reset

    @torch.no_grad()
    def collect_rollout(self, batch: Mapping[str, torch.Tensor], train: bool = True,
                        generator: torch.Generator | None = None) -> list[dict[str, Any]]:
        """Roll out one collated batch of episode rows (the ``num_generations`` samples of an episode are
        consecutive rows): per follow-up step, the pre-step memory, the previous interaction, the generated
        completion, the reference's log-probs (own memory), what the rewards need, and the critic's input.
        With ``train``, the memories after the last step are kept for the next batch (random resets)."""
        a = self.args
        actor, ref, critic = self._actor(), self.ref_model, self._critic()
        ref = self.accelerator.unwrap_model(ref)
        was_training = actor.training
        actor.eval()
        cfg = actor.config
        pad, eos = cfg.pad_token_id, cfg.eos_token_id
        ids, amask = batch["input_ids"], batch["attention_mask"]
        turn_mask, plen = batch["turn_mask"], batch["prompt_lengths"]
        n_steps = a.curriculum_steps
        if ids.shape[1] < n_steps + 1:
            raise ValueError(f"episodes have {ids.shape[1]} turns; curriculum_steps={n_steps} needs {n_steps + 1}")
        bsz, device = ids.shape[0], ids.device
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(a.seed + self.state.global_step)
        mem, ref_mem, reset = self._initial_memories(bsz, generator, train)
        turns = iter_turns(ids[:, : n_steps + 1], amask[:, : n_steps + 1], turn_mask[:, : n_steps + 1])
        first = next(turns)  # the interaction to save: only written into the memory
        first_ids, first_mask = first.input_ids, first.attention_mask
        prev_ids, prev_mask, prev_valid = first_ids, first_mask, first.valid
        steps, prev_logits, prev_cmask = [], None, None
        want_old = self._needs_old_logps()
        for turn in turns:
            k, t0 = turn.index, time.perf_counter()
            prev_memory = mem  # memory before step k's answer = previous memory + previous interaction
            mem = compute_memory_update(actor, prev_ids, prev_mask, mem, prev_valid)
            ref_mem = compute_memory_update(ref, prev_ids, prev_mask, ref_mem, prev_valid)
            prompt, pmask = left_pad_prompts(turn.input_ids, plen[:, k], pad)
            budget = min(a.max_completion_length, cfg.max_interaction_length - prompt.shape[1])
            if budget < 1:
                raise ValueError("a query leaves no room for an answer within the model's seq_len")
            seqs = actor.generate(prompt, attention_mask=pmask, stm=STMCache(mem.clone()), memory_update="none",
                                  do_sample=True, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                  max_new_tokens=budget, pad_token_id=pad, eos_token_id=eos, suppress_tokens=[pad])
            comp = seqs[:, prompt.shape[1]:]
            if comp.shape[1] == 0:
                comp = torch.full((bsz, 1), eos, dtype=seqs.dtype, device=device)
                seqs = torch.cat([seqs, comp], 1)
            cmask = completion_mask(comp, eos, pad)
            seq_mask = torch.cat([pmask, cmask], 1)
            t1 = time.perf_counter()
            step = {"prompt_ids": prompt, "prompt_mask": pmask, "completion_ids": comp, "completion_mask": cmask,
                    "prev_memory": prev_memory, "prev_ids": prev_ids, "prev_mask": prev_mask,
                    "prev_valid": prev_valid.float(), "row_valid": turn.valid.float()}
            trained = cmask * turn.valid[:, None].to(cmask.dtype)  # the loss mask of these rows (tool_mask)
            if self.beta != 0.0:
                step["ref_per_token_logps"], _ = _teacher_forced(ref, seqs, seq_mask, ref_mem, comp.shape[1],
                                                                 a.temperature, trained)
            if want_old or a.interstep_kl_coef:
                log_probs, logits = _teacher_forced(actor, seqs, seq_mask, mem, comp.shape[1], a.temperature,
                                                    trained)
                if want_old:
                    step["old_per_token_logps"] = log_probs
                if a.interstep_kl_coef and prev_logits is not None:
                    step["prev_step_logp"] = torch.log_softmax(prev_logits, -1)
                    step["prev_step_mask"] = prev_cmask
                prev_logits, prev_cmask = logits, cmask
            t2 = time.perf_counter()
            # what the rewards compare the answer with: the reference answer and the saved interaction
            positions = torch.arange(turn.input_ids.shape[1], device=device)[None]
            answer_mask = turn.attention_mask * (positions >= plen[:, k][:, None])
            long_range = a.strategy == "long_range"
            saved_ids, saved_mask = (first_ids, first_mask) if long_range and k == n_steps else (prev_ids, prev_mask)
            step["reward_kwargs"] = {"step": [k] * bsz, "reference_ids": _rows(turn.input_ids, answer_mask),
                                     "saved_ids": _rows(saved_ids, saved_mask),
                                     "topic_change": [long_range and k == 1] * bsz}
            # critic state: the next query followed by the saved (previous) interaction
            if critic is not None:
                crit_len = a.critic_max_len or 2 * cfg.max_interaction_length
                step["critic_ids"], step["critic_mask"] = concat_right_padded(prompt, pmask, prev_ids, prev_mask,
                                                                              pad, crit_len)
                step["values"] = critic(step["critic_ids"], step["critic_mask"])
            steps.append(step)
            # the interaction written into memory for the next step
            if a.teacher_forcing:
                prev_ids, prev_mask = turn.input_ids, turn.attention_mask
            else:
                prev_ids, prev_mask = actor.interactions_from_generation(seqs, prompt.shape[1], pmask)
            prev_valid = turn.valid
            self.timings["generation"] += t1 - t0
            self.timings["reference"] += t2 - t1
        # memory after the last answer, for episodes that continue in the next batch (random resets)
        if train:
            final = compute_memory_update(actor, prev_ids, prev_mask, mem, prev_valid)
            ref_final = compute_memory_update(ref, prev_ids, prev_mask, ref_mem, prev_valid)
            self._carried = {"actor": final.detach(), "ref": ref_final.detach()}
        steps[0]["memory_resets"] = reset.float().mean()
        actor.train(was_training)
        return steps

    def _needs_old_logps(self) -> bool:
        # As TRL: with one policy update per generation batch, the rollout policy is the current one and TRL uses
        # the current log-probs, detached; otherwise the rollout's own are needed.
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0

    # -------------------------------------------------------------- scoring
    def _score_step(self, inputs: list[dict], step: dict[str, Any], gather: bool = True) -> torch.Tensor:
        """Rewards of one follow-up step per reward function, [rows, F] (all processes' rows with ``gather``):
        TRL's ``_calculate_rewards`` with the episode's dataset columns and the step's fields as kwargs."""
        tok = self.processing_class
        prompts = tok.batch_decode(_rows(step["prompt_ids"], step["prompt_mask"]), skip_special_tokens=True)
        completion_ids = _rows(step["completion_ids"], step["completion_mask"])
        completions = tok.batch_decode(completion_ids, skip_special_tokens=True)
        kw = step["reward_kwargs"]
        kw["references"] = tok.batch_decode(kw["reference_ids"], skip_special_tokens=True)
        rows = [{**x, **{key: values[i] for key, values in kw.items()}} for i, x in enumerate(inputs)]
        step["text"] = (prompts, completions)
        if gather:
            return self._calculate_rewards(rows, prompts, completions, completion_ids)
        out = torch.zeros(len(rows), len(self.reward_funcs), device=self.accelerator.device)
        columns = {key: [r[key] for r in rows] for key in rows[0] if key not in ("prompt", "completion")}
        for i, func in enumerate(self.reward_funcs):
            values = func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                          trainer_state=self.state, **columns)
            out[:, i] = torch.tensor([float("nan") if v is None else float(v) for v in values], device=out.device)
        return out

    def _advantages(self, rewards: torch.Tensor, valid: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        """Advantages of all processes' rows of one step ([world * B]); rows with NaN reward (no reward function
        applied) or of a missing turn get 0. ``group``: TRL's group baseline and ``scale_rewards``."""
        a, g = self.args, self.args.num_generations
        r = rewards.masked_fill(~valid, float("nan"))
        if a.advantage_estimator == "group":
            mean = torch.nanmean(r.view(-1, g), 1).repeat_interleave(g)
            if a.scale_rewards == "batch":
                std = nanstd(r).expand_as(r)
            else:
                std = nanstd(r.view(-1, g), 1).repeat_interleave(g) if g > 1 else torch.zeros_like(r)
            adv = r - mean
            if a.scale_rewards != "none":
                adv = adv / (std + 1e-4)
        else:
            adv = r - values if a.advantage_estimator == "critic" else r - torch.nanmean(r)
            if a.scale_rewards != "none" and int((~adv.isnan()).sum()) > 1:
                adv = (adv - torch.nanmean(adv)) / (nanstd(adv) + 1e-6)
        return torch.nan_to_num(adv, nan=0.0)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's generate-and-score step for stateful episodes (see the module doc). ``inputs`` are TRL's rows:
        dataset episodes, each repeated ``num_generations`` times by TRL's sampler."""
        mode = "train" if self.model.training else "eval"
        train = mode == "train"
        device = self.accelerator.device
        batch = {k: v.to(device) for k, v in self.episode_collator(
            [{k: x[k] for k in ("turn_input_ids", "system_input_ids") if k in x} for x in inputs]).items()}
        seed = self._rollout_seed()
        # every random draw of the rollout is a function of (seed, step, process): a resumed run repeats it
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            steps = self.collect_rollout(batch, train=train,
                                         generator=torch.Generator(device=device).manual_seed(seed))
        t0 = time.perf_counter()
        world = slice(self.accelerator.process_index * len(inputs), (self.accelerator.process_index + 1) * len(inputs))
        metrics = self._metrics[mode]
        for k, step in enumerate(steps, start=1):
            per_func = self._score_step(inputs, step)  # [world * B, F]
            weighted = (per_func * self.reward_weights.to(device)[None]).nansum(1)
            weighted[per_func.isnan().all(1)] = float("nan")
            valid = self.accelerator.gather(step["row_valid"]).bool()
            values = self.accelerator.gather(step.pop("values")) if "values" in step else None
            adv = self._advantages(weighted, valid, values)
            step["advantages"], step["rewards"] = adv[world], weighted[world].nan_to_num(0.0)
            scored = weighted[valid]
            metrics[f"reward_step{k}"].append(torch.nanmean(scored).item())
            for i, name in enumerate(self.reward_func_names):
                metrics[f"rewards/{name}/mean"].append(torch.nanmean(per_func[valid, i]).item())
            self._logs["prompt"].extend(self._gather_text(step["text"][0]))
            self._logs["completion"].extend(self._gather_text(step["text"][1]))
            for i, name in enumerate(self.reward_func_names):
                self._logs["rewards"][name].extend(per_func[:, i].tolist())
            self._logs["advantages"].extend(adv.tolist())
        all_rewards = torch.cat([self.accelerator.gather(s["rewards"]) for s in steps])
        metrics["reward"].append(all_rewards.mean().item())
        metrics["reward_std"].append(all_rewards.std().item() if all_rewards.numel() > 1 else 0.0)
        metrics["memory_resets"].append(steps[0].pop("memory_resets").item())
        self.timings["reward"] += time.perf_counter() - t0
        out = self._flatten(steps)
        lengths = self.accelerator.gather(out["completion_mask"].sum(1).float())
        metrics["completions/mean_length"].append(lengths.mean().item())
        if train:
            self.state.num_input_tokens_seen += int(self.accelerator.gather(
                out["prompt_mask"].sum() + out["completion_mask"].sum()).sum())
            self.episodes_seen += len(inputs) * self.accelerator.num_processes
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        return out

    def _rollout_seed(self) -> int:
        """A seed from (seed, global step, rollout within the step, process): a resumed run repeats the rollouts
        (TRL's own ``_step`` counter restarts at 0 on resume, so it cannot be part of it)."""
        step = self.state.global_step
        self._rollout_count = self._rollout_count + 1 if getattr(self, "_rollout_step", None) == step else 0
        self._rollout_step = step
        return _mix_seed(self.args.seed, step, self._rollout_count, self.accelerator.process_index,
                         int(self.model.training))

    def _gather_text(self, texts: list[str]) -> list[str]:
        from accelerate.utils import gather_object

        return gather_object(texts) if self.accelerator.num_processes > 1 else texts

    def _flatten(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's batch: one row per (step, episode sample), step-major, plus the rows' memory inputs."""
        pad = self.processing_class.pad_token_id
        out = {
            "prompt_ids": _cat_rows([s["prompt_ids"] for s in steps], pad, left=True),
            "prompt_mask": _cat_rows([s["prompt_mask"] for s in steps], 0, left=True),
            "completion_ids": _cat_rows([s["completion_ids"] for s in steps], pad),
            "completion_mask": _cat_rows([s["completion_mask"] for s in steps], 0),
            # TRL's mask of the completion tokens to train on: none in the rows of missing turns
            "tool_mask": _cat_rows([s["completion_mask"] * s["row_valid"][:, None].long() for s in steps], 0),
            "advantages": torch.cat([s["advantages"] for s in steps]),
            "rewards": torch.cat([s["rewards"] for s in steps]),
            "prev_memory": torch.cat([s["prev_memory"] for s in steps]),
            "prev_ids": _cat_rows([s["prev_ids"] for s in steps], pad),
            "prev_mask": _cat_rows([s["prev_mask"] for s in steps], 0),
            "prev_valid": torch.cat([s["prev_valid"] for s in steps]),
            "step_index": torch.cat([torch.full_like(s["prev_valid"], k) for k, s in enumerate(steps, start=1)]),
        }
        out["num_items_in_batch"] = self.accelerator.gather(out["tool_mask"].sum()).sum()
        for key in ("ref_per_token_logps", "old_per_token_logps"):
            if key in steps[0]:
                out[key] = _cat_rows([s[key] for s in steps], 0.0)
        if "critic_ids" in steps[0]:
            out["critic_ids"] = _cat_rows([s["critic_ids"] for s in steps], pad)
            out["critic_mask"] = _cat_rows([s["critic_mask"] for s in steps], 0)
        with_prev = [s for s in steps if "prev_step_logp" in s]
        if with_prev:  # the inter-step KL: rows of step 1 have no previous step (mask 0)
            width, vocab = out["completion_ids"].shape[1], with_prev[0]["prev_step_logp"].shape[-1]
            logp, mask = [], []
            for s in steps:
                rows = s["completion_ids"].shape[0]
                logp.append(s.get("prev_step_logp", s["prev_valid"].new_zeros(rows, 1, vocab)))
                mask.append(s.get("prev_step_mask", s["completion_mask"].new_zeros(rows, 1)))
            logp, mask = _cat_rows(logp, 0.0)[:, :width], _cat_rows(mask, 0)[:, :width]
            out["prev_step_logp"] = F.pad(logp, (0, 0, 0, width - logp.shape[1]))
            out["prev_step_mask"] = F.pad(mask, (0, width - mask.shape[1]))
        return out

    # -------------------------------------------------------------- loss
    _MODULE_KEYS = ("prev_memory", "prev_ids", "prev_mask", "prev_valid", "step_index", "critic_ids", "critic_mask",
                    "rewards", "prev_step_logp", "prev_step_mask")

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        """TRL's per-token log-probs, read from each row's memory: ``model`` (the stage module, DDP-wrapped in
        training) rebuilds the memory with gradient and also returns IMPO's terms, kept for ``_compute_loss``."""
        if self._impo_inputs is None:
            raise RuntimeError("IMPOTrainer computes log-probs inside _compute_loss only (the rows' memories are "
                               "part of its inputs)")
        extra = {k: self._impo_inputs[k] for k in self._MODULE_KEYS if k in self._impo_inputs}
        loss_mask = self._impo_inputs["completion_mask"] * self._impo_inputs["tool_mask"]
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                        loss_mask=loss_mask, **extra)
        self._impo_terms = out
        return out.log_probs, (out.entropy if compute_entropy else None), None

    def _compute_loss(self, model, inputs):
        """TRL's GRPO loss (policy, ``beta`` * KL to the reference, entropy bonus, by ``loss_type``) plus IMPO's
        terms from the same forward, scaled for gradient accumulation as TRL scales its entropy bonus."""
        self._impo_inputs = inputs
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._impo_inputs = None
        terms, self._impo_terms = self._impo_terms, None
        a, mode = self.args, ("train" if self.model.training else "eval")
        extra = a.stm_diff_coef * terms.stm_diff
        logged = {"stm_diff": terms.stm_diff}
        if terms.value_loss is not None:
            extra = extra + a.vf_coef * terms.value_loss
            logged["value_loss"] = terms.value_loss
        if terms.kl_interstep is not None:
            extra = extra + a.interstep_kl_coef * terms.kl_interstep
            logged["kl_interstep"] = terms.kl_interstep
        for name, value in logged.items():
            self._metrics[mode][name].append(self.accelerator.gather(value.detach()).mean().item())
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss + extra / normalizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's log, plus the rollout's time shares and episodes/s, and the stage's token totals."""
        if "loss" in logs:
            total = sum(self.timings.values())
            if total > 0:
                for k, v in self.timings.items():
                    logs[f"time_share_{k}"] = round(v / total, 4)
                logs["episodes_per_second"] = round(self.episodes_seen / total, 3)
        if "train_runtime" in logs:
            logs["train_tokens"] = self.state.num_input_tokens_seen
            logs["train_tokens_per_second"] = round(self.state.num_input_tokens_seen / max(logs["train_runtime"],
                                                                                            1e-9), 1)
        super().log(logs, start_time)

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_rewards(self, dataset=None, max_batches: int | None = None, seed: int = 1234) -> dict[str, float]:
        """Mean reward of fresh rollouts (memory reset per episode, one sample each, no update) on ``dataset``,
        per step and overall. Local to the calling process (no collectives): the main process alone may call it."""
        dataset = dataset if dataset is not None else self.eval_dataset
        bsz = self.args.per_device_eval_batch_size
        group, self.args.num_generations = self.args.num_generations, 1
        sums: dict[str, float] = {}
        n = 0
        try:
            for i, start in enumerate(range(0, len(dataset), bsz)):
                if max_batches is not None and i >= max_batches:
                    break
                rows = [dataset[j] for j in range(start, min(start + bsz, len(dataset)))]
                batch = {k: v.to(self.accelerator.device) for k, v in self.episode_collator(
                    [{"turn_input_ids": r["turn_input_ids"]} for r in rows]).items()}
                with torch.random.fork_rng():
                    torch.manual_seed(seed + i)
                    steps = self.collect_rollout(batch, train=False,
                                                 generator=torch.Generator(device=batch["input_ids"].device)
                                                 .manual_seed(seed + i))
                total = []
                for k, step in enumerate(steps, start=1):
                    per_func = self._score_step(rows, step, gather=False)
                    r = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(1)
                    sums[f"reward_step{k}"] = sums.get(f"reward_step{k}", 0.0) + r.mean().item()
                    total.append(r)
                sums["reward"] = sums.get("reward", 0.0) + torch.cat(total).mean().item()
                n += 1
        finally:
            self.args.num_generations = group
        return {k: v / max(n, 1) for k, v in sums.items()}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Held-out rollout rewards (:meth:`evaluate_rewards`) instead of TRL's eval loss."""
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluate_rewards(eval_dataset).items()}
        self.log(metrics)
        return metrics


# ---------------------------------------------------------------------------------------------------- curriculum
@dataclass
class IMPOStage:
    """One curriculum stage (training.md §5.2 ``CurriculumConfig``)."""

    steps: int
    max_steps: int
    strategy: str = "cumulative"
    random_resets_ratio: float = 1.0
    unfreeze_schedule: str = "0:all"
    train_dataset: Any = None
    eval_dataset: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)


def exponential_schedule(max_steps_per_stage: int, longest: int = 16, **kw: Any) -> list[IMPOStage]:
    """Stages with 1, 2, 4, ... ``longest`` follow-ups; the first stages train memory only ("fetch" first,
    then everything), later stages keep some random resets."""
    stages, n = [], 1
    while n <= longest:
        stages.append(IMPOStage(steps=n, max_steps=max_steps_per_stage,
                                unfreeze_schedule="0:fetch" if n == 1 else f"0:fetch,{max_steps_per_stage // 2}:all",
                                random_resets_ratio=1.0 if n <= 2 else 0.8, **kw))
        n *= 2
    return stages


def run_impo_curriculum(model: RxTForConversationalGeneration, stages: Sequence[IMPOStage], args: IMPOConfig,
                        train_dataset=None, eval_dataset=None, processing_class=None, ref_model=None,
                        reward_funcs=None, output_dir: str | None = None) -> list[dict[str, float]]:
    """Run the stages in order on the same actor, critic and reference; each stage gets a fresh optimizer
    (the reference rebuilt optimizers on unfreezing too). Returns per-stage final log entries."""
    ref_model = ref_model if ref_model is not None else copy.deepcopy(model).eval().requires_grad_(False)
    critic = None
    results = []
    for i, stage in enumerate(stages):
        stage_args = copy.deepcopy(args)
        stage_args.curriculum_steps = stage.steps
        stage_args.strategy = stage.strategy
        stage_args.random_resets_ratio = stage.random_resets_ratio
        stage_args.unfreeze_schedule = stage.unfreeze_schedule
        stage_args.max_steps = stage.max_steps
        for k, v in stage.overrides.items():
            setattr(stage_args, k, v)
        if output_dir:
            stage_args.output_dir = f"{output_dir}/stage{i}_steps{stage.steps}"
        trainer = IMPOTrainer(model, reward_funcs=reward_funcs, args=stage_args,
                              train_dataset=stage.train_dataset or train_dataset,
                              eval_dataset=stage.eval_dataset or eval_dataset, processing_class=processing_class,
                              ref_model=ref_model, critic=critic)
        trainer.train()
        critic = trainer.accelerator.unwrap_model(trainer.model).critic
        last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
        results.append({"stage": i, "steps": stage.steps, **last})
        if output_dir:
            trainer.save_model(stage_args.output_dir)
    return results
