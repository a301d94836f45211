"""Stage 5: Memory Reinforcement Learning with IMPO (training.md §5) as a ``transformers.Trainer``.

IMPO = PPO adapted to a stateful model: one *episode* is a multi-turn conversation whose Short-Term Memory
(STM) is carried from turn to turn. The first interaction of an episode is only written into the memory
("data to save"); the actor then answers ``steps`` follow-up queries, each conditioned on the memory, and
every answer is written into the memory before the next query.

Why ``transformers.Trainer`` and not a TRL trainer
--------------------------------------------------
TRL 1.16 ships no PPO trainer and no critic (``PPOTrainer`` was removed in 1.13), and ``GRPOTrainer`` is built
around single-turn prompt -> completion causal LMs: its log-prob pass calls the model with ids and a mask only
(no memory), it has no multi-turn state, no critic and no memory-regularisation terms, and overriding its
private internals drifts silently between versions (hf-ecosystem.md §6). So :class:`IMPOTrainer` subclasses
``transformers.Trainer`` (through the project's :class:`~transformers_rxt.training.utils.RxTStageTrainer`,
which adds per-component optimizer groups, HF-directory saving and metric logging) and reuses from TRL what
fits: the config conventions (``beta``, ``epsilon``, ``temperature``, ``max_completion_length``,
``num_generations``, ``reward_weights``), the reward-function protocol
``fn(prompts, completions, completion_ids, **columns) -> list[float | None]`` and the helpers
``trl.trainer.utils.selective_log_softmax`` and ``entropy_from_logits``.

How a training step works
-------------------------
1. **Rollout** (no grad, unwrapped model): per batch of episodes, one STM per episode (rows reset with
   probability ``random_resets_ratio``, otherwise the memory the previous batch left is kept), the first
   interaction written into it, then for each of ``curriculum_steps`` follow-ups: batched ``generate`` (sampling)
   conditioned on the STM, reward (TensorBLEU on the device against the reference answer and the saved
   interaction, optional embedding cosine, optional TRL-style reward functions), and the memory update with
   the generated interaction (or the dataset's with ``teacher_forcing``). The reference model replays the same
   interactions into **its own** memory, reset exactly when the actor's is, and gives reference log-probs.
   Old log-probs are recomputed teacher-forced with the rollout weights (the reference's
   ``log_probs_source="update"``: no sampler/temperature mismatch). Advantages: ``r - V(s)`` from the
   memory-less text critic, or a group/batch baseline, normalised over the batch.
2. **Update**: everything trainable runs inside :class:`RxTForIMPOTraining.forward` (the one model Trainer
   and DDP wrap): for each step the memory is rebuilt *with gradient* from the detached pre-step memory and the
   previous interaction, the decoder is run teacher-forced on prompt + answer, and the loss terms are summed
   over steps; one backward, one optimizer step.

Loss, per step ``k`` (1-based), averaged over the steps of the episode:
``L = L_clip - entropy_coef*H + beta*KL_ref + interstep_kl_coef*KL(pi_k || pi_{k-1}) +
stm_diff_coef*sqrt(k)*MSE(STM_k, STM_{k-1}) + vf_coef*L_value``.

Not done (see the report in the stage notes): the running-mean embedding term of the reward, GAE, a replay
buffer, memory warm-up.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from ..cache_rxt import STMCache
from ..data import DataCollatorForRxTEpisodes
from ..extras import require_extra
from ..metrics import tensorbleu_reward
from ..modeling_rxt import RxTForConversationalGeneration, flat_rxt_key
from .utils import RxTStageModel, RxTStageOutput, RxTStageTrainer, load_rxt_model


def _trl_utils():
    """TRL's token log-prob and entropy helpers (TRL is in the ``train`` extra; imported on first use so that
    ``transformers_rxt.training`` imports without it)."""
    return require_extra("trl.trainer.utils")


__all__ = [
    "FREEZE_MODES",
    "IMPOConfig",
    "RxTForIMPOTraining",
    "IMPOStage",
    "IMPOTrainer",
    "RxTValueCritic",
    "clipped_policy_loss",
    "interstep_kl",
    "masked_mean",
    "reference_kl",
    "run_impo_curriculum",
    "stm_difference_loss",
    "trainable_by_mode",
]

STRATEGIES = ("cumulative", "long_range")
FREEZE_MODES = ("warmup", "fetch", "update", "all")


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class IMPOConfig(TrainingArguments):
    """Arguments of :class:`IMPOTrainer` (TRL naming where TRL has the concept: ``beta``, ``epsilon``,
    ``temperature``, ``num_generations``, ``reward_weights``, ``max_completion_length``).

    One Trainer step = one batch of ``per_device_train_batch_size`` episodes rolled out and used for
    ``num_iterations`` optimizer steps.
    """

    # curriculum (training.md §5.2-5.4)
    curriculum_steps: int = field(default=1, metadata={"help": "Follow-up interactions per episode (after the first)."})
    strategy: str = field(default="cumulative", metadata={"help": "'cumulative' or 'long_range' retention."})
    random_resets_ratio: float = field(default=1.0, metadata={"help": "Probability that an episode's STM row is "
                                                              "reset (1 = always; else the previous memory is kept)."})
    teacher_forcing: bool = field(default=False, metadata={"help": "Write the dataset answer into memory."})
    unfreeze_schedule: str = field(default="0:all", metadata={
        "help": "'step:mode,...' with modes warmup (memory attention only), fetch (+ decoder memory "
                "cross-attention), update (+ encoder), all. E.g. '0:fetch,50:all'."})
    # rollout
    max_completion_length: int = field(default=32, metadata={"help": "Max generated answer tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also used in the loss)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    num_generations: int = field(default=1, metadata={"help": "Rollouts per episode (group baseline needs > 1)."})
    num_iterations: int = field(default=1, metadata={"help": "Optimizer steps per rollout (PPO epochs); the "
                                                     "data-loader batches in between are skipped."})
    # reward (training.md §5.5, weights as in the reference's defaults)
    bleu_factor: float = 0.5
    cos_factor: float = 0.5
    bleu_ref_factor: float = 0.5
    bleu_saved_factor: float = 0.5
    cos_ref_factor: float = 0.5
    cos_saved_factor: float = 0.5
    bleu_max_n: int = field(default=2, metadata={"help": "BLEU order (the reference used BLEU-2)."})
    bleu_smoothing: str = field(default="method4")
    rewards_scale: float = 1.0
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of extra reward_funcs."})
    # advantages / losses (training.md §5.6-5.8)
    advantage_estimator: str = field(default="critic", metadata={"help": "'critic' (r - V(s)), 'group' "
                                                                "(per-episode mean over num_generations) or 'batch'."})
    normalize_advantages: bool = True
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range."})
    entropy_coef: float = 0.01
    beta: float = field(default=0.05, metadata={"help": "Reference-KL coefficient (ref_kl_coef)."})
    interstep_kl_coef: float = 0.01
    stm_diff_coef: float = 1e-4
    vf_coef: float = field(default=1.0, metadata={"help": "Value-loss weight (critic has its own LR)."})
    critic_value_clip: float = 20.0
    critic_lr: float = 1e-4
    critic_max_len: int | None = field(default=None, metadata={"help": "Critic input length (default 2x seq_len)."})
    critic_init_scale: float = field(default=1.0, metadata={"help": "Initial scale of the sigmoid value head "
                                                            "(reference: 10 with rewards scaled to 0-10)."})
    memory_lr: float | None = field(default=None, metadata={"help": "LR of memory attention (default learning_rate)."})
    # Trainer defaults that must differ
    remove_unused_columns: bool = False
    logging_steps: float = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; expected one of {STRATEGIES}")
        if self.advantage_estimator not in ("critic", "group", "batch"):
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r}")
        if self.advantage_estimator == "group" and self.num_generations < 2:
            raise ValueError("advantage_estimator='group' needs num_generations >= 2")
        if self.curriculum_steps < 1:
            raise ValueError("curriculum_steps must be >= 1")
        if self.strategy == "long_range" and self.curriculum_steps < 2:
            raise ValueError("long_range retention needs curriculum_steps >= 2 (topic change, then recall)")
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
    """PPO clip with a sequence-level advantage: ``-mean_b [sum_t m_t min(rho A, clip(rho) A) / n_b]``.

    Returns (loss, clip fraction)."""
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


def stm_difference_loss(stm_after: torch.Tensor, stm_before: torch.Tensor, step: int) -> torch.Tensor:
    """Memory regularisation ``sqrt(step) * MSE(STM_after, STM_before)`` (``step`` 1-based, i.e. the
    reference's ``sqrt(k + 1)`` with 0-based k)."""
    return math.sqrt(step) * F.mse_loss(stm_after.float(), stm_before.detach().float())


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
class RxTForIMPOTraining(RxTStageModel):
    """Stage 5 (IMPO): the actor (this RxT model) and the critic (``critic``, optional): ``forward`` computes
    every trainable term of one rollout batch (DDP-safe); the rollout generates with :meth:`as_rxt`. The
    reference model is not part of it (frozen, its log-probs come with the rollout). ``stage_args`` is an
    [`IMPOConfig`]."""

    def __init__(self, config, stage_args: Any = None):
        super().__init__(config, stage_args)
        self.critic: RxTValueCritic | None = None

    def forward(self, steps: Sequence[dict[str, torch.Tensor]], generator: torch.Generator | None = None,
                **_: Any) -> RxTStageOutput:
        a = self.stage_args
        totals: dict[str, torch.Tensor] = {}
        loss = 0.0
        prev_logp_full = prev_mask = None
        for k, s in enumerate(steps, start=1):
            memory = self.compute_memory_update(s["prev_ids"], s["prev_mask"], s["prev_memory"])
            # rows whose previous turn was padding keep their memory
            keep = s["prev_valid"].bool()[:, None, None, None]
            memory = torch.where(keep, memory, s["prev_memory"])
            comp, cmask = s["completion_ids"], s["completion_mask"]
            width = comp.shape[1]
            logits = super().forward(input_ids=s["sequences"], attention_mask=s["sequence_mask"], stm=memory,
                                     logits_to_keep=width + 1).logits[:, :-1]
            logits = logits.float() / a.temperature
            logp = _trl_utils().selective_log_softmax(logits, comp)
            mask = cmask * s["row_valid"][:, None]
            policy, clip_frac = clipped_policy_loss(logp, s["old_logp"], s["advantages"], mask, a.epsilon)
            entropy = masked_mean(_trl_utils().entropy_from_logits(logits), mask)
            kl_ref = reference_kl(logp, s["ref_logp"], mask)
            stm_diff = stm_difference_loss(memory, s["prev_memory"], k)
            terms = {"policy_loss": policy, "entropy": entropy, "kl_ref": kl_ref, "stm_diff": stm_diff,
                     "clip_fraction": clip_frac}
            step_loss = policy - a.entropy_coef * entropy + a.beta * kl_ref + a.stm_diff_coef * stm_diff
            if prev_logp_full is not None:
                kl_step = interstep_kl(logits, prev_logp_full, mask, prev_mask)
                terms["kl_interstep"] = kl_step
                step_loss = step_loss + a.interstep_kl_coef * kl_step
            if self.critic is not None:
                values = self.critic(s["critic_ids"], s["critic_mask"])
                c = a.critic_value_clip
                value_loss = F.mse_loss(values.clamp(-c, c), s["rewards"].clamp(-c, c))
                terms["value_loss"] = value_loss
                step_loss = step_loss + a.vf_coef * value_loss
            loss = loss + step_loss
            prev_logp_full = torch.log_softmax(logits.detach(), -1)
            prev_mask = mask
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.detach()
                totals[f"{key}_step{k}"] = value.detach()
        n = len(steps)
        metrics = {}
        for key, value in totals.items():
            if "_step" in key:
                metrics[key] = value
            else:
                metrics[key] = value / (n - 1 if key == "kl_interstep" else n)
        return RxTStageOutput(loss=loss / n, metrics=metrics)


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


def _mean_embedding(embed: nn.Embedding, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.normalize(masked_mean(embed(ids).float(), mask[..., None], dim=1), dim=-1)


@torch.no_grad()
def _teacher_forced_logp(model: RxTForConversationalGeneration, sequences, sequence_mask, memory, completion,
                         temperature: float) -> torch.Tensor:
    logits = model(input_ids=sequences, attention_mask=sequence_mask, stm=memory,
                   logits_to_keep=completion.shape[1] + 1).logits[:, :-1]
    return _trl_utils().selective_log_softmax(logits.float() / temperature, completion)


# ---------------------------------------------------------------------------------------------------- trainer
RewardFunc = Callable[..., list]


class IMPOTrainer(RxTStageTrainer):
    """Memory Reinforcement Learning with IMPO on RxT episodes.

    Args:
        model: an ``RxTForConversationalGeneration`` (or a path to one, e.g. the stage-4 output): the actor.
        args: :class:`IMPOConfig`.
        train_dataset: MRL episodes, tokenized with :func:`~transformers_rxt.data.tokenize_mrl_dataset`
            (raw records are tokenized here when ``processing_class`` is given). Turn 0 is the interaction to
            save; turns 1..``curriculum_steps`` are the follow-ups (episodes need that many turns).
        ref_model: frozen reference (default: a frozen copy of the initial actor).
        critic: :class:`RxTValueCritic` (default: built from the actor's encoder when
            ``advantage_estimator="critic"``).
        reward_funcs: extra TRL-style reward functions ``fn(prompts, completions, completion_ids, **kwargs)``;
            kwargs hold ``references`` (reference answer texts), ``step`` and ``trainer_state``. Weighted by
            ``args.reward_weights`` and added to the TensorBLEU/cosine reward.
    """

    rxt_stage = "mrl"  # the stage name in the model card's training table

    def __init__(self, model: RxTForConversationalGeneration | str, args: IMPOConfig, train_dataset=None,
                 eval_dataset=None, processing_class=None, ref_model: RxTForConversationalGeneration | None = None,
                 critic: RxTValueCritic | None = None, reward_funcs: Sequence[RewardFunc] | None = None,
                 data_collator=None, callbacks=None):
        rxt = load_rxt_model(model) if isinstance(model, str) else model
        rxt.train()
        if critic is None and args.advantage_estimator == "critic":
            critic = RxTValueCritic(rxt, init_scale=args.critic_init_scale)
        module = RxTForIMPOTraining.from_rxt(rxt, args)
        module.critic = critic if args.advantage_estimator == "critic" else None
        if ref_model is None:
            ref_model = copy.deepcopy(rxt)
        ref_model.eval().requires_grad_(False)
        cfg = rxt.config
        if data_collator is None:
            if processing_class is not None:
                data_collator = DataCollatorForRxTEpisodes.from_tokenizer(processing_class)
            else:
                data_collator = DataCollatorForRxTEpisodes(pad_token_id=cfg.pad_token_id,
                                                           answer_marker_ids=(cfg.answer_token_id,))
        if train_dataset is not None and processing_class is not None:
            train_dataset = self._maybe_tokenize(train_dataset, processing_class)
        if eval_dataset is not None and processing_class is not None:
            eval_dataset = self._maybe_tokenize(eval_dataset, processing_class)
        self.reward_funcs = list(reward_funcs or [])
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"{len(weights)} reward_weights for {len(self.reward_funcs)} reward_funcs")
        self.reward_func_weights = list(weights)
        super().__init__(model=module, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks)
        self.ref_model = ref_model.to(self.args.device)
        self._actor_view: RxTForConversationalGeneration | None = None
        self._carried: dict[str, torch.Tensor] | None = None  # memories left by the previous batch
        self._buffer: dict[str, Any] | None = None
        self._buffer_uses = 0
        self._mode: str | None = None
        self._frozen: list[nn.Parameter] = []
        self.timings = {"generation": 0.0, "reward": 0.0, "reference": 0.0, "update": 0.0}
        self.episodes_seen = 0

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

    def count_tokens(self, inputs) -> int:
        return int(sum(int(s["completion_mask"].sum()) for s in inputs.get("steps", [])))

    # -------------------------------------------------------------- freezing (DDP-safe: grads dropped)
    def apply_freeze_mode(self) -> str:
        mode = self.args.mode_at(self.state.global_step)
        if mode != self._mode:
            self._frozen = [p for n, p in self.model.named_parameters() if not trainable_by_mode(n, mode)]
            if self._mode is not None and self.is_world_process_zero():
                print(f"[IMPOTrainer] step {self.state.global_step}: freezing mode {mode}")
            self._mode = mode
        return mode

    # -------------------------------------------------------------- rollout
    def _actor(self) -> RxTForConversationalGeneration:
        """The policy as a plain RxT model (shared weights) for the rollout's generate and log-probs."""
        if self._actor_view is None:
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

    def _reward(self, step: int, comp, cmask, ref_ids, ref_mask, saved_ids, saved_mask, negative: bool):
        a = self.args
        bleu_kw = dict(max_n=a.bleu_max_n, smoothing=a.bleu_smoothing)
        b_ref = tensorbleu_reward(comp, ref_ids, completion_mask=cmask, reference_mask=ref_mask, **bleu_kw)
        b_saved = tensorbleu_reward(comp, saved_ids, completion_mask=cmask, reference_mask=saved_mask, **bleu_kw)
        embed = self._actor().get_input_embeddings()
        with torch.no_grad():
            g = _mean_embedding(embed, comp, cmask)
            c_ref = (g * _mean_embedding(embed, ref_ids, ref_mask)).sum(-1).clamp(min=0)
            c_saved = (g * _mean_embedding(embed, saved_ids, saved_mask)).sum(-1).clamp(min=0)
        if negative:  # topic change (long-range step 1): the answer should NOT repeat the saved data
            b_saved, c_saved = 1 - b_saved, 1 - c_saved
        bleu = a.bleu_ref_factor * b_ref + a.bleu_saved_factor * b_saved
        cos = a.cos_ref_factor * c_ref + a.cos_saved_factor * c_saved
        reward = (a.bleu_factor * bleu + a.cos_factor * cos) * a.rewards_scale
        return reward, {"bleu_ref": b_ref.mean(), "bleu_saved": b_saved.mean(), "cos_ref": c_ref.mean()}

    def _extra_rewards(self, prompts, comp, cmask, ref_ids, ref_mask, step) -> torch.Tensor | None:
        if not self.reward_funcs:
            return None
        tok = self.processing_class
        comp_lists = [row[m.bool()].tolist() for row, m in zip(comp, cmask)]
        refs = [row[m.bool()].tolist() for row, m in zip(ref_ids, ref_mask)]
        if tok is not None:
            prompts_text = tok.batch_decode(prompts, skip_special_tokens=True)
            completions = tok.batch_decode(comp_lists, skip_special_tokens=True)
            references = tok.batch_decode(refs, skip_special_tokens=True)
        else:
            prompts_text = [" ".join(map(str, p.tolist())) for p in prompts]
            completions = [" ".join(map(str, c)) for c in comp_lists]
            references = [" ".join(map(str, r)) for r in refs]
        total = torch.zeros(comp.shape[0], device=comp.device)
        for fn, w in zip(self.reward_funcs, self.reward_func_weights):
            values = fn(prompts=prompts_text, completions=completions, completion_ids=comp_lists,
                        references=references, reference_ids=refs, step=step, trainer_state=self.state)
            if len(values) != comp.shape[0]:
                raise ValueError(f"reward function returned {len(values)} rewards for {comp.shape[0]} completions")
            total += w * torch.tensor([float("nan") if v is None else float(v) for v in values],
                                      device=comp.device).nan_to_num(0.0)
        return total

    @torch.no_grad()
    def collect_rollout(self, batch: dict[str, torch.Tensor], train: bool = True,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """Roll out one batch of episodes; returns the per-step tensors :class:`RxTForIMPOTraining` consumes plus
        ``metrics`` (rewards etc.)."""
        a = self.args
        actor, ref, critic = self._actor(), self.ref_model, self._critic()
        was_training = actor.training
        actor.eval()
        cfg = actor.config
        pad, eos = cfg.pad_token_id, cfg.eos_token_id
        ids, amask = batch["input_ids"], batch["attention_mask"]
        turn_mask, plen = batch["turn_mask"], batch["prompt_lengths"]
        if a.num_generations > 1:
            ids, amask, turn_mask, plen = (x.repeat_interleave(a.num_generations, 0)
                                           for x in (ids, amask, turn_mask, plen))
        n_steps = a.curriculum_steps
        if ids.shape[1] < n_steps + 1:
            raise ValueError(f"episodes have {ids.shape[1]} turns; curriculum_steps={n_steps} needs {n_steps + 1}")
        bsz = ids.shape[0]
        device = ids.device
        generator = generator or torch.Generator(device=device).manual_seed(a.seed + self.state.global_step)
        mem, ref_mem, reset = self._initial_memories(bsz, generator, train)
        first_ids, first_mask = ids[:, 0], amask[:, 0]
        prev_ids, prev_mask, prev_valid = first_ids, first_mask, turn_mask[:, 0]
        steps, metrics = [], {}
        rewards_all = []
        t_gen = t_rew = t_ref = 0.0
        for k in range(1, n_steps + 1):
            t0 = time.perf_counter()
            # memory before step k's answer = previous memory + previous interaction
            prev_memory = mem
            valid_prev = prev_valid.bool()[:, None, None, None]
            mem = torch.where(valid_prev, actor.compute_memory_update(prev_ids, prev_mask, mem), mem)
            ref_mem = torch.where(valid_prev, ref.compute_memory_update(prev_ids, prev_mask, ref_mem), ref_mem)
            prompt, pmask = left_pad_prompts(ids[:, k], plen[:, k], pad)
            budget = min(a.max_completion_length, cfg.max_interaction_length - prompt.shape[1])
            if budget < 1:
                raise ValueError("a query leaves no room for an answer within the model's seq_len")
            gen_kwargs = dict(do_sample=True, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              max_new_tokens=budget, pad_token_id=pad, eos_token_id=eos, suppress_tokens=[pad])
            seqs = actor.generate(prompt, attention_mask=pmask, stm=STMCache(mem.clone()), memory_update="none",
                                  **gen_kwargs)
            comp = seqs[:, prompt.shape[1]:]
            if comp.shape[1] == 0:
                comp = torch.full((bsz, 1), eos, dtype=seqs.dtype, device=device)
                seqs = torch.cat([seqs, comp], 1)
            cmask = completion_mask(comp, eos, pad)
            seq_mask = torch.cat([pmask, cmask], 1)
            t1 = time.perf_counter()
            old_logp = _teacher_forced_logp(actor, seqs, seq_mask, mem, comp, a.temperature)
            ref_logp = _teacher_forced_logp(ref, seqs, seq_mask, ref_mem, comp, a.temperature)
            t2 = time.perf_counter()
            # reward
            ref_answer_mask = amask[:, k] * (torch.arange(ids.shape[2], device=device)[None] >= plen[:, k][:, None])
            long_range = a.strategy == "long_range"
            negative = long_range and k == 1
            if long_range and k == n_steps:
                saved_ids, saved_mask = first_ids, first_mask
            else:
                saved_ids, saved_mask = prev_ids, prev_mask
            reward, parts = self._reward(k, comp, cmask, ids[:, k], ref_answer_mask, saved_ids, saved_mask, negative)
            extra = self._extra_rewards(prompt, comp, cmask, ids[:, k], ref_answer_mask, k)
            if extra is not None:
                reward = reward + extra
                metrics[f"reward_funcs_step{k}"] = extra.mean()
            row_valid = turn_mask[:, k].float()
            t3 = time.perf_counter()
            # critic state: the next query followed by the saved (previous) interaction
            crit_len = a.critic_max_len or 2 * cfg.max_interaction_length
            critic_ids, critic_mask = concat_right_padded(prompt, pmask, prev_ids, prev_mask, pad, crit_len)
            values = critic(critic_ids, critic_mask) if critic is not None else None
            steps.append({"prev_memory": prev_memory, "prev_ids": prev_ids, "prev_mask": prev_mask,
                          "prev_valid": prev_valid.float(), "sequences": seqs, "sequence_mask": seq_mask,
                          "completion_ids": comp, "completion_mask": cmask, "old_logp": old_logp,
                          "ref_logp": ref_logp, "rewards": reward, "row_valid": row_valid,
                          "critic_ids": critic_ids, "critic_mask": critic_mask, "values": values})
            rewards_all.append(reward)
            for name, v in parts.items():
                metrics[f"{name}_step{k}"] = v
            metrics[f"reward_step{k}"] = masked_mean(reward, row_valid)
            metrics[f"completion_length_step{k}"] = cmask.sum(1).float().mean()
            # the interaction written into memory for the next step
            if a.teacher_forcing:
                prev_ids, prev_mask = ids[:, k], amask[:, k]
            else:
                prev_ids, prev_mask = actor.interactions_from_generation(seqs, prompt.shape[1], pmask)
            prev_valid = turn_mask[:, k]
            t_gen += t1 - t0
            t_ref += t2 - t1
            t_rew += t3 - t2
        # memory after the last answer, for episodes that continue in the next batch (random resets)
        valid_prev = prev_valid.bool()[:, None, None, None]
        final = torch.where(valid_prev, actor.compute_memory_update(prev_ids, prev_mask, mem), mem)
        ref_final = torch.where(valid_prev, ref.compute_memory_update(prev_ids, prev_mask, ref_mem), ref_mem)
        if train:
            self._carried = {"actor": final.detach(), "ref": ref_final.detach()}
        # advantages
        R = torch.stack(rewards_all)  # [steps, B]
        valid = torch.stack([s["row_valid"] for s in steps]).bool()
        if a.advantage_estimator == "critic":
            V = torch.stack([s["values"] for s in steps])
            adv = R - V
            metrics["value_mean"] = V[valid].mean()
        elif a.advantage_estimator == "group":
            g = R.view(n_steps, -1, a.num_generations)
            adv = (g - g.mean(-1, keepdim=True)).view(n_steps, -1)
        else:
            adv = R - masked_mean(R, valid.float(), dim=1)[:, None]
        if a.normalize_advantages and int(valid.sum()) > 1:
            sel = adv[valid]
            adv = (adv - sel.mean()) / (sel.std() + 1e-6)
        adv = adv * valid
        for s, row in zip(steps, adv):
            s["advantages"] = row
            s.pop("values")
        metrics["reward"] = R[valid].mean()
        metrics["reward_std"] = R[valid].std() if int(valid.sum()) > 1 else R.new_zeros(())
        metrics["memory_resets"] = reset.float().mean()
        actor.train(was_training)
        self.timings["generation"] += t_gen
        self.timings["reference"] += t_ref
        self.timings["reward"] += t_rew
        self.episodes_seen += bsz
        return {"steps": steps, "metrics": {k: float(v) for k, v in metrics.items()}}

    # -------------------------------------------------------------- training step
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.apply_freeze_mode()
        if self._buffer is None or self._buffer_uses >= self.args.num_iterations:
            batch = self._prepare_inputs(inputs)
            self._buffer = self.collect_rollout(batch, train=True)
            self._buffer_uses = 0
            for key, value in self._buffer["metrics"].items():
                self._metrics["train"][key].append(value)
        self._buffer_uses += 1
        t0 = time.perf_counter()
        loss = super().training_step(model, {"steps": self._buffer["steps"]}, num_items_in_batch)
        for p in self._frozen:  # frozen components: gradients (already all-reduced) are dropped
            p.grad = None
        self.timings["update"] += time.perf_counter() - t0
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            total = sum(self.timings.values())
            if total > 0:
                for k, v in self.timings.items():
                    logs[f"time_share_{k}"] = round(v / total, 4)
                logs["episodes_per_second"] = round(self.episodes_seen / total, 3)
        super().log(logs, start_time)

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_rewards(self, dataset=None, max_batches: int | None = None, seed: int = 1234) -> dict[str, float]:
        """Mean reward of fresh rollouts (memory reset per episode, no update) on ``dataset``."""
        dataset = dataset if dataset is not None else self.eval_dataset
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size,
                                             collate_fn=self.data_collator)
        sums: dict[str, float] = {}
        n = 0
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                batch = {k: v.to(self.args.device) for k, v in batch.items()}
                out = self.collect_rollout(batch, train=False,
                                           generator=torch.Generator(device=self.args.device).manual_seed(seed + i))
                for k, v in out["metrics"].items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        finally:
            torch.random.set_rng_state(state)
        return {k: v / max(n, 1) for k, v in sums.items()}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
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
        trainer = IMPOTrainer(model, stage_args, train_dataset=stage.train_dataset or train_dataset,
                              eval_dataset=stage.eval_dataset or eval_dataset, processing_class=processing_class,
                              ref_model=ref_model, critic=critic, reward_funcs=reward_funcs)
        trainer.train()
        critic = trainer.accelerator.unwrap_model(trainer.model).critic
        last = next((h for h in reversed(trainer.state.log_history) if "loss" in h), {})
        results.append({"stage": i, "steps": stage.steps, **last})
        if output_dir:
            trainer.save_model(stage_args.output_dir)
    return results
