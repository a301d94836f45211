"""Stages 1-2: joint LM pre-training and joint interaction SFT (training.md §2).

One batch, two views: the encoder reads an MLM-masked copy and is trained with a masked-LM head; the decoder
reads the clean ids and is trained autoregressively while its memory cross-attention reads the encoder's
per-layer outputs of the same sequence ("fake STM"), **detached** so no gradient flows from the decoder into
the encoder. This aligns the encoder's output space with what the decoder's memory cross-attention reads
before any real memory exists. Because that memory encodes the current sequence, the decoder can partly
"cheat"; slot dropout (``memory_dropout``) and Gaussian noise (``memory_noise``) make it rely on its own
self-attention too.

Stage 1 uses plain text (every real token trained); stage 2 uses ``[BOS][Q]query[A]answer[EOS]`` interactions
(only the answer side trained). Same trainer, different data.

Differences from the reference, on purpose: pad positions are never trained; noise and slot dropout apply
only in training mode (the reference applies them in evaluation as well); MLM masking excludes special
tokens and uses BERT's 80/10/10 replacement (``mask_replace_prob=1, random_replace_prob=0`` gives the
reference's all-``[MASK]`` scheme); an MoE encoder's routers are balanced too (the reference ignores them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from ..data.collators import DataCollatorForRxTDecoder, DataCollatorForRxTMLM
from ..modeling_rxt import RxTForConversationalGeneration, RxTMLMHead
from .utils import RxTStageModel, RxTStageOutput, RxTStageTrainer, masked_token_accuracy, resolve_stage_args

__all__ = ["JointLMConfig", "JointLMOutput", "JointLMTrainer", "RxTForJointLMTraining"]


@dataclass
class JointLMConfig(TrainingArguments):
    r"""Configuration of [`JointLMTrainer`] (stages 1-2). Extends `TrainingArguments`.

    Parameters:
        encoder_loss_weight (`float`, defaults to `1.0`): weight β of the encoder MLM loss.
        decoder_loss_weight (`float`, defaults to `1.0`): weight α of the decoder autoregressive loss.
        moe_aux_loss_weight (`float`, *optional*): weight of the MoE load-balancing loss (mean over the
            decoder's and encoder's routers); None uses the model config's `router_aux_loss_coef`.
        memory_noise (`float`, defaults to `0.0`): std of Gaussian noise added to the detached encoder states
            the decoder reads (reference `noise_level`).
        memory_dropout (`float`, defaults to `0.0`): probability of zeroing a whole memory position (per
            layer, row and position; reference `masking_prob`).
        mlm_probability (`float`, defaults to `0.15`): share of (non-special) tokens selected for MLM.
        mask_replace_prob (`float`, defaults to `0.8`), random_replace_prob (`float`, defaults to `0.1`):
            what a selected token becomes (`[MASK]` / a random token / unchanged otherwise).
    """

    encoder_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the encoder MLM loss."})
    decoder_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the decoder AR loss."})
    moe_aux_loss_weight: float | None = field(
        default=None, metadata={"help": "MoE aux loss weight; None = the model config's router_aux_loss_coef."}
    )
    memory_noise: float = field(default=0.0, metadata={"help": "Std of noise on the decoder's fake memory."})
    memory_dropout: float = field(default=0.0, metadata={"help": "Drop probability of fake-memory positions."})
    mlm_probability: float = field(default=0.15, metadata={"help": "MLM selection probability."})
    mask_replace_prob: float = field(default=0.8, metadata={"help": "Selected tokens replaced by [MASK]."})
    random_replace_prob: float = field(default=0.1, metadata={"help": "Selected tokens replaced at random."})
    # TrainingArguments defaults that do not fit custom-collated RxT batches
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all collated columns."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})


@dataclass
class JointLMOutput(RxTStageOutput):
    """Output of [`RxTForJointLMTraining`]: the weighted loss, its two parts and the logits of both heads.

    Args:
        mlm_loss: the encoder's masked-LM loss (over the masked positions).
        lm_loss: the decoder's autoregressive loss.
        mlm_logits: the MLM head's logits `[B, T, V]`.
        logits: the decoder's logits `[B, T, V]`.
    """

    mlm_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class RxTForJointLMTraining(RxTStageModel):
    """Stages 1-2: the RxT model plus the encoder's MLM head (``mlm_head``); ``forward`` trains the encoder
    (MLM) and the decoder (autoregressive, reading the encoder's detached states) on one batch.

    Loss weights, memory noise and dropout come from ``stage_args`` (a [`JointLMConfig`]; defaults without).
    """

    stage_heads = ("mlm_head",)
    # a plain RxT directory (e.g. a converted checkpoint) has no MLM head: it starts fresh
    _keys_to_ignore_on_load_missing = [r"^mlm_head\."]

    def __init__(self, config, stage_args: JointLMConfig | None = None):
        super().__init__(config, stage_args)
        self.mlm_head = self.new_stage_head("mlm_head")

    def new_stage_head(self, name: str) -> RxTMLMHead:
        if name != "mlm_head":
            return super().new_stage_head(name)
        return RxTMLMHead(self.config.hidden_size, self.config.vocab_size)

    def fake_memory(self, encoded: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The decoder's memory: the detached encoder states with slot dropout and noise (training only)."""
        memory = encoded.detach()
        dropout, noise_std = self.stage_arg("memory_dropout", 0.0), self.stage_arg("memory_noise", 0.0)
        if self.training and dropout > 0:
            shape = memory.shape[:-1] + (1,)
            keep = torch.rand(shape, generator=generator, device=memory.device) >= dropout
            memory = memory * keep.to(memory.dtype)
        if self.training and noise_std > 0:
            noise = torch.randn(memory.shape, generator=generator, device=memory.device, dtype=memory.dtype)
            memory = memory + noise_std * noise
        return memory

    def loss_item_counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """[MLM-masked tokens, trained decoder tokens (shifted labels)] of a prepared batch (after masking): each
        loss is a token mean over the optimizer step's whole batch, so data parallelism and gradient
        accumulation give the update of one process on the concatenated batch."""
        mlm = (batch["encoder_labels"] != -100).sum()
        lm = (batch["decoder_labels"][:, 1:] != -100).sum()
        return torch.stack([mlm, lm])

    def forward(
        self,
        encoder_input_ids: torch.LongTensor,
        encoder_labels: torch.LongTensor,
        decoder_input_ids: torch.LongTensor,
        decoder_labels: torch.LongTensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        num_items_in_batch: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> JointLMOutput:
        """The weighted MLM and autoregressive losses of the batch (token means). With ``num_items_in_batch``
        (the :meth:`loss_item_counts` of the optimizer step's whole batch, from the trainer) each is this batch's
        share of the whole batch's token mean (its token-loss sum over the step's token count), as
        transformers' ``num_items_in_batch``."""
        mlm_tokens, lm_tokens = self.loss_item_counts({"encoder_labels": encoder_labels,
                                                       "decoder_labels": decoder_labels})
        mlm_total, lm_total = (None, None) if num_items_in_batch is None else num_items_in_batch.unbind()
        encoded, encoder_aux = self.encode(encoder_input_ids, attention_mask)
        mlm_logits = self.mlm_head(encoded[:, -1])
        if bool((encoder_labels != -100).any()):
            mlm_loss = F.cross_entropy(mlm_logits.flatten(0, 1).float(), encoder_labels.flatten(), ignore_index=-100,
                                       reduction="mean" if mlm_total is None else "sum")
            if mlm_total is not None:
                mlm_loss = mlm_loss / mlm_total
        else:  # nothing masked in this batch: keep the head in the graph with a zero loss
            mlm_loss = mlm_logits.sum() * 0.0
        out = super().forward(  # the decoder pass of the RxT model itself
            input_ids=decoder_input_ids,
            attention_mask=attention_mask,
            encoder_memory=self.fake_memory(encoded, generator),
            labels=decoder_labels,
            **({} if lm_total is None else {"num_items_in_batch": lm_total}),
        )
        aux_terms = ([out.aux_loss] if out.aux_loss is not None else []) + list(encoder_aux)
        aux = torch.stack([a.float() for a in aux_terms]).mean() if aux_terms else None
        loss = (self.stage_arg("encoder_loss_weight", 1.0) * mlm_loss
                + self.stage_arg("decoder_loss_weight", 1.0) * out.lm_loss)
        if aux is not None and self.training:
            share = 1.0 if lm_total is None else lm_tokens / lm_total.clamp(min=1)  # this batch's share of tokens
            loss = loss + self.stage_arg("moe_aux_loss_weight", self.config.router_aux_loss_coef) * aux * share
        with torch.no_grad():
            # this batch's own token means (the shares above are scaled by the whole step's counts)
            mlm_mean = mlm_loss if mlm_total is None else mlm_loss * mlm_total / mlm_tokens.clamp(min=1)
            lm_mean = out.lm_loss if lm_total is None else out.lm_loss * lm_total / lm_tokens.clamp(min=1)
            metrics = {
                "mlm_loss": mlm_mean.detach(),
                "lm_loss": lm_mean.detach(),
                "mlm_accuracy": masked_token_accuracy(mlm_logits, encoder_labels, shift=False),
                "lm_accuracy": masked_token_accuracy(out.logits, decoder_labels, shift=True),
            }
            if aux is not None:
                metrics["aux_loss"] = aux.detach()
        return JointLMOutput(loss=loss, metrics=metrics, mlm_loss=mlm_loss, lm_loss=out.lm_loss,
                             mlm_logits=mlm_logits, logits=out.logits)


class JointLMTrainer(RxTStageTrainer):
    """Stages 1-2 trainer (joint LM pre-training / joint interaction SFT).

    Args:
        model: an `RxTForConversationalGeneration` (trained in place, see `RxTStageModel.from_rxt`), or a
            path/Hub id (a previous stage's output: its MLM head, if any, is loaded too).
        args: a [`JointLMConfig`].
        mlm_head: the MLM head to train (default: loaded with `model` when it is a path, else a fresh one).
        train_dataset / eval_dataset: tokenized rows with `input_ids` (and `labels` for interactions, from
            `tokenize_sft_dataset`), or whatever `data_collator` accepts.
        data_collator: default `DataCollatorForRxTDecoder` (padding); MLM masking then happens in the trainer
            with the step-seeded generator (exact resume). A `DataCollatorForJointLM` that masks in the
            collator is accepted too.
        processing_class: the RxT tokenizer (saved with every checkpoint; gives the special ids for masking).

    Logs `mlm_loss`, `lm_loss`, `mlm_accuracy`, `lm_accuracy` (and `aux_loss` for MoE) next to `loss`.
    """

    rxt_stage = "joint-lm"  # the stage name in the model card's training table

    def __init__(
        self,
        model: RxTForConversationalGeneration | str | os.PathLike,
        args: JointLMConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        processing_class: Any = None,
        mlm_head: RxTMLMHead | None = None,
        **kwargs: Any,
    ):
        args = resolve_stage_args(args, JointLMConfig, "rxt-output-joint")
        if isinstance(model, (str, os.PathLike)):
            stage_model = RxTForJointLMTraining.from_pretrained(model).train()
            stage_model.stage_args = args
            if mlm_head is not None:
                stage_model.mlm_head = mlm_head
            else:
                _load_legacy_mlm_head(stage_model, model)
        else:
            stage_model = RxTForJointLMTraining.from_rxt(model, args, mlm_head=mlm_head)
        cfg = stage_model.config
        masking = {
            "mlm_probability": args.mlm_probability,
            "mask_replace_prob": args.mask_replace_prob,
            "random_replace_prob": args.random_replace_prob,
        }
        if processing_class is not None:
            self.masker = DataCollatorForRxTMLM.from_tokenizer(processing_class, **masking)
        else:
            self.masker = DataCollatorForRxTMLM(
                mask_token_id=4, pad_token_id=cfg.pad_token_id, vocab_size=cfg.vocab_size, **masking
            )
        if data_collator is None:
            data_collator = DataCollatorForRxTDecoder(pad_token_id=cfg.pad_token_id)
        super().__init__(
            model=stage_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            processing_class=processing_class,
            **kwargs,
        )

    def prepare_stage_inputs(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        if "encoder_input_ids" in inputs:  # already masked by a DataCollatorForJointLM
            return inputs
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = inputs.get("labels")
        if labels is None:
            labels = ids.masked_fill(mask == 0, -100)
        # The collator's masking runs on CPU tensors; seed its CPU generator from the step generator.
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        self.masker.generator = torch.Generator().manual_seed(seed)
        masked, mlm_labels = self.masker.mask_tokens(ids.cpu(), mask.cpu())
        return {
            "encoder_input_ids": masked.to(ids.device),
            "encoder_labels": mlm_labels.to(ids.device),
            "decoder_input_ids": ids,
            "decoder_labels": labels,
            "attention_mask": mask,
        }


def _load_legacy_mlm_head(model: RxTForJointLMTraining, path: str | os.PathLike) -> None:
    """Stage outputs written before the stage models were `PreTrainedModel`s kept the MLM head in
    ``mlm_head.safetensors`` next to the model (now it is in ``model.safetensors``): load it from there."""
    file = os.path.join(path, "mlm_head.safetensors")
    if os.path.isfile(file):
        model.mlm_head.load_state_dict(safetensors.torch.load_file(file, device=str(model.device)), strict=True)
