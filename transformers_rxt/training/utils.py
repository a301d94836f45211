"""Pieces shared by the stage trainers: the stage model base, the base trainer, parameter groups and freezing.

Why a stage model: ``Trainer`` (and DDP/FSDP under ``accelerate launch``) drives exactly one module, and all
trainable computation of a step must run inside that module's ``forward`` (a sub-module called outside of it
escapes gradient synchronisation and sharding). Every stage needs more than the RxT model's own ``forward``
(an MLM head in stages 1-2, a loop over the turns of an episode in stages 3-4), so each stage defines an
:class:`RxTStageModel`: an ``RxTForConversationalGeneration`` subclass (a ``PreTrainedModel``, like
``BertForPreTraining`` is a BERT) whose ``forward`` computes the whole loss of one batch and returns the
stage's ``ModelOutput``.

What is saved: ``Trainer``'s own code saves, loads and resumes it (``save_pretrained`` / ``model.safetensors``;
its FSDP and DeepSpeed paths are the same code, not run here: no GPU). Its weights are the RxT model's, under the same names, plus the
stage-only heads (e.g. ``mlm_head.*``), so a stage output loads with
``RxTForConversationalGeneration.from_pretrained(dir)`` (the heads are left out) and with the next stage's
model (heads included). The directory is written as an RxT model directory: ``config.json`` names
``RxTForConversationalGeneration`` and the remote-code files are copied.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_outputs import ModelOutput

from ..hub.trainer import RxTHubTrainerMixin
from ..modeling_rxt import RxTForConversationalGeneration, flat_rxt_key

__all__ = [
    "COMPONENTS",
    "ComponentOptimizerMixin",
    "RxTStageModel",
    "RxTStageOutput",
    "RxTStageTrainer",
    "component_of",
    "load_rxt_model",
    "masked_token_accuracy",
    "set_component_trainable",
]

#: The trainable parts of an RxT model, in the order the gradual-unfreeze schedule turns them on. The shared
#: token embedding is its own group: it feeds both the decoder and the encoder.
COMPONENTS: tuple[str, ...] = ("embedding", "decoder", "memory_attention", "encoder")


def component_of(name: str) -> str:
    """The component a parameter of an RxT (or stage) model belongs to; names of stage-only heads (e.g.
    ``mlm_head.*``) map to their first segment."""
    head = flat_rxt_key(name).split(".", 1)[0]
    if head == "embed_tokens":
        return "embedding"
    return head


def set_component_trainable(model: nn.Module, components: Iterable[str], trainable: bool) -> None:
    """Set ``requires_grad`` on every parameter of the named components of a stage module or RxT model."""
    wanted = set(components)
    for name, param in model.named_parameters():
        if component_of(name) in wanted:
            param.requires_grad_(trainable)


def masked_token_accuracy(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Share of labelled positions (labels != -100) whose argmax prediction is right (shifted for causal LM)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    if not bool(keep.any()):
        return logits.new_zeros(())
    return (logits.argmax(-1)[keep] == labels[keep]).float().mean()


def resolve_stage_args(args: Any, config_class: type, default_output_dir: str) -> Any:
    """The stage's config: `args`, or a default one; refuses another stage's config with a clear error."""
    args = args if args is not None else config_class(output_dir=default_output_dir)
    if not isinstance(args, config_class):
        raise TypeError(f"args must be a {config_class.__name__}, got {type(args).__name__}")
    return args


def episode_collator(data_collator: Any, processing_class: Any, model: RxTForConversationalGeneration) -> Any:
    """The given collator, else a multi-turn episode collator for the tokenizer (or the model's pad id)."""
    from ..data.collators import DataCollatorForRxTEpisodes

    if data_collator is not None:
        return data_collator
    if processing_class is not None:
        return DataCollatorForRxTEpisodes.from_tokenizer(processing_class)
    return DataCollatorForRxTEpisodes(pad_token_id=model.config.pad_token_id)


def load_rxt_model(path: str | os.PathLike, **kwargs: Any) -> RxTForConversationalGeneration:
    """Load a stage output (or any RxT model directory / Hub id) for further training (train mode)."""
    return RxTForConversationalGeneration.from_pretrained(path, **kwargs).train()


@dataclass
class RxTStageOutput(ModelOutput):
    """Output of a stage model's ``forward``: the loss of the batch and the float metrics the trainer logs.

    Args:
        loss: the scalar the optimizer minimises.
        metrics: name -> detached scalar (tensor or float); names may vary from batch to batch (per-turn ones).
    """

    loss: torch.Tensor | None = None
    metrics: dict[str, Any] | None = None


class RxTStageModel(RxTForConversationalGeneration):
    """Base of the stage models: an RxT model whose ``forward(**batch, generator=None)`` returns the
    :class:`RxTStageOutput` of one batch.

    ``stage_args`` holds the stage's configuration (its ``TrainingArguments`` subclass, e.g.
    :class:`~transformers_rxt.training.JointLMConfig`): the loss weights and schedules ``forward`` reads.
    ``generator`` is the step-seeded random generator the trainer passes in, so that every random draw of a
    step (memory init, noise, masking) is a function of (seed, step, process) and a resumed run repeats it.

    Build one with ``from_pretrained`` (a stage output, or any RxT directory: missing stage heads start fresh)
    or with :meth:`from_rxt` around an existing RxT model.
    """

    # The saved code and auto_map are the RxT model's (see save_pretrained), not this training class's.
    _auto_class = None
    # Trainer must not inject its own `num_items_in_batch` (label tokens) into forward: a stage that normalises
    # over the optimizer step's batch gets its own counts (`loss_item_counts`) from RxTStageTrainer.
    accepts_loss_kwargs = False
    #: stage-only modules (not part of the RxT model), saved under their own names next to its weights
    stage_heads: tuple[str, ...] = ()

    def __init__(self, config, stage_args: Any = None):
        super().__init__(config)
        self.stage_args = stage_args

    @classmethod
    def from_rxt(cls, model: RxTForConversationalGeneration, stage_args: Any = None, **heads: nn.Module):
        """The stage model around ``model``: it *shares* ``model``'s modules (training it trains ``model``);
        stage heads are taken from ``heads`` or built fresh."""
        if not isinstance(model, RxTForConversationalGeneration):
            raise TypeError(f"{cls.__name__}.from_rxt takes an RxTForConversationalGeneration, got "
                            f"{type(model).__name__}")
        with torch.device("meta"):  # the modules built here are all replaced below: allocate nothing
            stage = cls(model.config, stage_args)
        for name, child in model.named_children():
            setattr(stage, name, child)
        for name in cls.stage_heads:
            head = heads.get(name)
            setattr(stage, name, head if head is not None else stage.new_stage_head(name).to(model.device))
        stage.generation_config = model.generation_config
        stage.name_or_path = model.name_or_path
        return stage.train(model.training)

    def as_rxt(self) -> RxTForConversationalGeneration:
        """A plain RxT model sharing this stage model's modules, without the stage heads: for generation and
        evaluation during training (its ``forward`` is the RxT model's, not the stage loss)."""
        with torch.device("meta"):
            view = RxTForConversationalGeneration(self.config)
        for name, _ in list(view.named_children()):
            setattr(view, name, getattr(self, name))
        view.generation_config = self.generation_config
        view.name_or_path = self.name_or_path
        return view.train(self.training)

    def stage_arg(self, name: str, default: Any) -> Any:
        """``stage_args.<name>``, or ``default`` when there are no stage args or the value is None."""
        value = getattr(self.stage_args, name, None)
        return default if value is None else value

    def loss_item_counts(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Hook: what the stage loss is normalised by in one collated batch (e.g. answer tokens per turn, a 1-D
        count tensor), or None when the loss is a per-batch mean (the default).

        When a stage returns counts, :class:`RxTStageTrainer` sums them over the micro-batches of an optimizer
        step and over all processes and passes the sum to ``forward`` as ``num_items_in_batch``; ``forward``
        then returns this batch's share of the loss of the whole step (sums divided by those totals), so data
        parallel training (whose backward averages gradients over processes) and gradient accumulation make the
        update of one process on the concatenated batch."""
        return None

    def new_stage_head(self, name: str) -> nn.Module:
        """A freshly initialised stage head ``name`` (subclasses with heads implement it)."""
        raise NotImplementedError(f"{type(self).__name__} has no stage head {name!r}")

    def save_pretrained(self, save_directory, *args: Any, is_main_process: bool = True, **kwargs: Any):
        """Save as an RxT model directory: the weights (stage heads included) through transformers, then the
        RxT model's code files and a ``config.json`` naming ``RxTForConversationalGeneration``."""
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            custom_object_save(RxTForConversationalGeneration, save_directory)
            self.config.architectures = [RxTForConversationalGeneration.__name__]
            self.config.save_pretrained(save_directory)


#: the key under which a micro-batch prepared by ``RxTStageTrainer.get_batch_samples`` carries its step generator
_STEP_GENERATOR = "_rxt_step_generator"


def restore_class_forward(module: nn.Module) -> None:
    """Undo an instance-level ``forward`` patch (TRL's ``add_fused_lm_head`` sets one, which runs the backbone on
    ids alone): the module's class ``forward`` (a stage loss that reads the RxT memory) is used again."""
    module.__dict__.pop("forward", None)


def _mix_seed(*parts: int) -> int:
    # Python's hash of a tuple of ints is not salted, so this is stable across processes and runs.
    return hash(tuple(int(p) for p in parts)) & 0x7FFF_FFFF_FFFF_FFFF


class ComponentOptimizerMixin:
    """Trainer mixin: one optimizer group per RxT component (and decay/no-decay), each with its own learning
    rate (:meth:`component_learning_rates`); used by the stage trainers and by the TRL-based stage-5 trainers."""

    def component_learning_rates(self) -> dict[str, float]:
        """Learning rate per component (default: ``args.learning_rate`` for all)."""
        return {}

    def create_optimizer(self, model=None):
        """AdamW-style optimizer with one named group per (component, decay/no-decay), over **all** parameters.

        Frozen parameters are in the optimizer too: ``Trainer``'s default only takes parameters that require
        grad at creation, so a component unfrozen later would silently never be updated (the reference's
        gradual-unfreeze bug). Parameters without a gradient are skipped by the optimizer (no step, no weight
        decay, no state), so frozen ones do not move.
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        lrs = self.component_learning_rates()
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        seen: set[int] = set()
        for name, param in opt_model.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            groups.setdefault((component_of(name), name in decay), []).append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if use_decay else 0.0,
                "lr": lrs.get(comp, self.args.learning_rate),
                "name": f"{comp}{'' if use_decay else '.no_decay'}",
            }
            for (comp, use_decay), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        for key in ("params", "model", "optimizer_dict"):
            if key in optimizer_kwargs:
                raise ValueError(f"optim={self.args.optim!r} builds its own parameter groups; use adamw_torch")
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


class RxTStageTrainer(RxTHubTrainerMixin, ComponentOptimizerMixin, Trainer):
    """Base of the stage trainers: saving as HF model directories, per-component optimizer groups,
    step-seeded randomness, component metrics and tokens/s logging. Hub pushes (`push_to_hub`,
    `args.push_to_hub`) go through `push_rxt_to_hub`: gated repository, RAML v1.0 card, model files only.

    Subclasses provide the stage module and may override :meth:`component_learning_rates`.
    """

    @property
    def loss_is_scaled_for_ga(self) -> bool:
        """Per-batch-mean losses are divided by the gradient-accumulation steps (by ``Trainer``); a loss normalised
        by the step's counts (:meth:`RxTStageModel.loss_item_counts`) is already its micro-batch's share."""
        return self._counts_loss_items

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.accelerator.unwrap_model(self.model), RxTStageModel):
            raise TypeError(f"{type(self).__name__} trains an RxTStageModel, got {type(self.model).__name__}")
        stage_model = self.accelerator.unwrap_model(self.model)
        self._counts_loss_items = type(stage_model).loss_item_counts is not RxTStageModel.loss_item_counts
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._rng_step, self._rng_micro, self._eval_batches = -1, 0, 0
        self._tokens_unsynced = 0  # tokens this process trained on since the last _sync_tokens
        self._tokens_interval = 0  # tokens of all processes since the last training log
        self._tokens_session = 0  # tokens of all processes in this train() call
        self._interval_start = time.perf_counter()
        self.add_callback(_SyncTokensBeforeSave(self))

    # ------------------------------------------------------------------ randomness
    def step_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, global step, micro-batch, process, train/eval).

        The Trainer restores its RNG state on resume only after it has fetched the next batch; drawing every
        random number of a step from this generator instead makes the resumed step identical.
        """
        if self.model.training:
            step = self.state.global_step
            self._rng_micro = self._rng_micro + 1 if step == self._rng_step else 0
            self._rng_step = step
            seed = _mix_seed(self.args.seed, step, self._rng_micro, self.args.process_index, 0)
        else:
            seed = _mix_seed(self.args.seed, self._eval_batches, self.args.process_index, 1)
            self._eval_batches += 1
        return torch.Generator(device=device).manual_seed(seed)

    def evaluate(self, *args: Any, **kwargs: Any):
        self._eval_batches = 0  # every evaluation draws the same noise
        return super().evaluate(*args, **kwargs)

    # ------------------------------------------------------------------ loss
    def count_tokens(self, inputs: Mapping[str, Any]) -> int:
        """Real tokens of a batch (what tokens/s counts): the attention mask's sum."""
        mask = inputs.get("attention_mask")
        return int(mask.sum()) if isinstance(mask, torch.Tensor) else 0

    def prepare_stage_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Hook: turn a collated batch into the stage module's keyword arguments (e.g. MLM masking)."""
        return inputs

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """``Trainer``'s micro-batches of one optimizer step, with (for a stage model that has
        :meth:`~RxTStageModel.loss_item_counts`) their counts summed over the micro-batches and all processes.

        The counts may depend on the step's random draws (stage 1-2's MLM masking), so each micro-batch is
        prepared here (:meth:`prepare_stage_inputs`) with its step generator, drawn in the order
        :meth:`compute_loss` would draw them; the generator travels with the batch and the forward continues
        from it (a run draws the same numbers as when the batches were prepared inside the loss)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self._counts_loss_items or not batch_samples:
            return batch_samples, num_items_in_batch
        model = self.accelerator.unwrap_model(self.model)
        prepared = []
        for batch in batch_samples:
            generator = self.step_generator(device)
            prepared.append({**self.prepare_stage_inputs(dict(batch), generator), _STEP_GENERATOR: generator})
        batch_samples = prepared
        counts = [model.loss_item_counts(batch).to(device) for batch in batch_samples]
        total = torch.zeros(max(len(c) for c in counts), dtype=torch.long, device=device)
        for c in counts:
            total[: len(c)] += c
        if self.accelerator.num_processes > 1:  # processes may hold different numbers of turns: pad, then sum
            total = self.accelerator.reduce(self.accelerator.pad_across_processes(total), "sum")
        return batch_samples, total

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        inputs = dict(inputs)
        generator = inputs.pop(_STEP_GENERATOR, None)
        if generator is None:  # not prepared by get_batch_samples (evaluation, a stage without counts)
            generator = self.step_generator(next(self.model.parameters()).device)
            inputs = self.prepare_stage_inputs(inputs, generator)
        if self._counts_loss_items and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs, generator=generator)
        mode = "train" if self.model.training else "eval"
        for key, value in (outputs.metrics or {}).items():
            if value is not None:
                self._metrics[mode][key].append(float(value))
        loss = outputs.loss
        if mode == "train":
            self._tokens_unsynced += self.count_tokens(inputs)
            if "num_items_in_batch" in inputs:
                # this process's share of the step's loss; the data-parallel backward averages over processes
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ logging
    def _gather_metrics(self, mode: str) -> dict[str, float]:
        local = {k: (sum(v), len(v)) for k, v in self._metrics[mode].items() if v}
        self._metrics[mode].clear()
        if self.accelerator.num_processes > 1:
            # gather_object tolerates different key sets on different ranks (e.g. per-turn metrics).
            merged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
            for part in gather_object([local]):
                for k, (s, n) in part.items():
                    merged[k][0] += s
                    merged[k][1] += n
            local = {k: (s, n) for k, (s, n) in merged.items()}
        return {k: round(s / n, 6) for k, (s, n) in sorted(local.items()) if n}

    def _global_tokens(self, count: int) -> int:
        if self.accelerator.num_processes > 1:
            return int(sum(gather_object([count])))
        return count

    def _sync_tokens(self) -> None:
        """Add every process's tokens since the last sync to the counters (collective: all processes call it, at
        logs and checkpoint saves). The stage's total lives in ``state.num_input_tokens_seen``, which checkpoints
        save, so a resumed stage reports the tokens of the steps before its checkpoint too. When
        ``include_num_input_tokens_seen`` is on, ``Trainer`` keeps that total itself."""
        tokens = self._global_tokens(self._tokens_unsynced)
        self._tokens_unsynced = 0
        self._tokens_interval += tokens
        self._tokens_session += tokens
        if self.args.include_num_input_tokens_seen in (False, None, "no"):
            self.state.num_input_tokens_seen += tokens

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if any(k.startswith("eval_") for k in logs):
            logs.update({f"eval_{k}": v for k, v in self._gather_metrics("eval").items()})
        elif "loss" in logs:
            logs.update(self._gather_metrics("train"))
            self._sync_tokens()
            now = time.perf_counter()
            logs["tokens_per_second"] = round(self._tokens_interval / max(now - self._interval_start, 1e-9), 1)
            self._tokens_interval, self._interval_start = 0, now
        elif "train_runtime" in logs:
            self._sync_tokens()
            logs["train_tokens"] = self.state.num_input_tokens_seen  # the whole stage's, across resumes
            logs["train_tokens_per_second"] = round(self._tokens_session / max(logs["train_runtime"], 1e-9), 1)
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any):
        self._tokens_unsynced = self._tokens_interval = self._tokens_session = 0
        self._interval_start = time.perf_counter()
        return super().train(*args, **kwargs)


class _SyncTokensBeforeSave(TrainerCallback):
    """Before a checkpoint is written, add every process's tokens to ``state.num_input_tokens_seen``, so that
    the checkpoint's state holds all tokens of the steps it covers (runs after ``DefaultFlowCallback`` has
    decided to save, on every process: the sync is collective)."""

    def __init__(self, trainer: RxTStageTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.trainer._sync_tokens()

    on_epoch_end = on_step_end


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dim (fp32 maths)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)
