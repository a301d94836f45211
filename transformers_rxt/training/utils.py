"""Pieces shared by the stage trainers: the container module, the base trainer, parameter groups and freezing.

Why a container module: ``Trainer`` (and DDP under ``accelerate launch``) drives exactly one ``nn.Module``.
Every stage needs more than the RxT model's own ``forward`` (an MLM head in stages 1-2, a loop over the turns
of an episode in stages 3-4), and DDP requires all trainable computation of a step to happen inside the
wrapped module's ``forward`` (calling a sub-module directly outside of it breaks gradient synchronisation).
So each stage defines an :class:`RxTStageModule` whose ``forward`` computes the whole loss of one batch.

What is saved: checkpoints and the final output of every stage are HF model directories. The RxT model is
written with ``save_pretrained`` (``config.json``, ``model.safetensors``, the remote-code files) and loads with
``RxTForConversationalGeneration.from_pretrained(dir)``; stage-only heads (the MLM head) go next to it as
``<name>.safetensors``. The next stage loads the previous stage's directory.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import safetensors.torch
import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from ..hub.trainer import RxTHubTrainerMixin
from ..modeling_rxt import RxTForConversationalGeneration, RxTMLMHead, flat_rxt_key

logger = logging.get_logger(__name__)

__all__ = [
    "COMPONENTS",
    "RxTStageModule",
    "RxTStageTrainer",
    "component_of",
    "load_rxt_model",
    "load_mlm_head",
    "masked_token_accuracy",
    "set_component_trainable",
]

#: The trainable parts of an RxT model, in the order the gradual-unfreeze schedule turns them on. The shared
#: token embedding is its own group: it feeds both the decoder and the encoder.
COMPONENTS: tuple[str, ...] = ("embedding", "decoder", "memory_attention", "encoder")


def component_of(name: str) -> str:
    """The component a parameter of an RxT model (or of a stage module, ``rxt.`` prefix) belongs to; names of
    stage-only heads (e.g. ``mlm_head.*``) map to their first segment."""
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


def load_mlm_head(path: str | os.PathLike, embed_dim: int, vocab_size: int) -> RxTMLMHead | None:
    """The MLM head saved next to a stage-1/2 model (``mlm_head.safetensors``), or None if there is none."""
    file = os.path.join(path, "mlm_head.safetensors")
    if not os.path.isfile(file):
        return None
    head = RxTMLMHead(embed_dim, vocab_size)
    head.load_state_dict(safetensors.torch.load_file(file))
    return head


class RxTStageModule(nn.Module):
    """Container of an RxT model (``rxt``) and optional stage-only heads; ``forward`` returns a dict with the
    batch's ``loss`` and float metrics (anything else the stage wants to log).

    Subclasses implement ``forward(**batch, generator=None)``. ``generator`` is the step-seeded random
    generator the trainer passes in, so that every random draw of a step (memory init, noise, masking) is a
    function of (seed, step, process) and resuming from a checkpoint repeats it exactly.
    """

    # Trainer must not inject `num_items_in_batch` into forward: our losses are per-batch means.
    accepts_loss_kwargs = False
    main_input_name = "input_ids"
    #: stage-only heads saved as `<name>.safetensors` next to the RxT model
    extra_modules: tuple[str, ...] = ()

    def __init__(self, rxt: RxTForConversationalGeneration):
        super().__init__()
        self.rxt = rxt

    @property
    def config(self):
        return self.rxt.config

    # ------------------------------------------------------------------ saving / loading
    def save_stage(self, output_dir: str | os.PathLike, is_main_process: bool = True) -> None:
        """Write the RxT model (HF directory with remote code) and the stage heads into ``output_dir``."""
        self.rxt.save_pretrained(output_dir, is_main_process=is_main_process)
        if not is_main_process:
            return
        for name in self.extra_modules:
            module = getattr(self, name, None)
            if module is not None:
                state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                safetensors.torch.save_file(state, os.path.join(output_dir, f"{name}.safetensors"))

    def load_stage(self, path: str | os.PathLike) -> None:
        """Load weights written by :meth:`save_stage` into this module, strictly (same architecture)."""
        loaded = RxTForConversationalGeneration.from_pretrained(path)
        self.rxt.load_state_dict(loaded.state_dict(), strict=True)
        for name in self.extra_modules:
            module = getattr(self, name, None)
            file = os.path.join(path, f"{name}.safetensors")
            if module is not None:
                if not os.path.isfile(file):
                    raise FileNotFoundError(f"{path} has no {name}.safetensors, which this stage needs")
                module.load_state_dict(safetensors.torch.load_file(file), strict=True)


def _mix_seed(*parts: int) -> int:
    # Python's hash of a tuple of ints is not salted, so this is stable across processes and runs.
    return hash(tuple(int(p) for p in parts)) & 0x7FFF_FFFF_FFFF_FFFF


class RxTStageTrainer(RxTHubTrainerMixin, Trainer):
    """Base of the stage trainers: saving as HF model directories, per-component optimizer groups,
    step-seeded randomness, component metrics and tokens/s logging. Hub pushes (`push_to_hub`,
    `args.push_to_hub`) go through `push_rxt_to_hub`: gated repository, RAML v1.0 card, model files only.

    Subclasses provide the stage module and may override :meth:`component_learning_rates`.
    """

    # Our losses are per-batch means; Trainer divides them by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, RxTStageModule):
            raise TypeError(f"{type(self).__name__} trains an RxTStageModule, got {type(self.model).__name__}")
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._rng_step, self._rng_micro, self._eval_batches = -1, 0, 0
        self._tokens_unsynced = 0  # tokens this process trained on since the last _sync_tokens
        self._tokens_interval = 0  # tokens of all processes since the last training log
        self._tokens_session = 0  # tokens of all processes in this train() call
        self._interval_start = time.perf_counter()

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

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        device = next(self.model.parameters()).device
        generator = self.step_generator(device)
        inputs = self.prepare_stage_inputs(dict(inputs), generator)
        outputs = model(**inputs, generator=generator)
        mode = "train" if self.model.training else "eval"
        for key, value in outputs.items():
            if key != "loss" and value is not None:
                self._metrics[mode][key].append(float(value))
        if mode == "train":
            self._tokens_unsynced += self.count_tokens(inputs)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

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

    def _save_checkpoint(self, model, trial) -> None:
        self._sync_tokens()  # the checkpoint's state must hold every token of the steps it covers
        return super()._save_checkpoint(model, trial)

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

    # ------------------------------------------------------------------ optimizer
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

    # ------------------------------------------------------------------ saving / loading
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save an HF model directory (RxT model + stage heads + tokenizer), not the container's state dict."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        module.save_stage(output_dir, is_main_process=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        module = self.accelerator.unwrap_model(self.model if model is None else model)
        logger.info(f"Loading stage weights from {resume_from_checkpoint}")
        module.load_stage(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dim (fp32 maths)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)
