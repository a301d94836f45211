"""Make a transformers `Trainer` publish RxT models through the package's one push path, `push_rxt_to_hub`.

The stage trainers (`transformers_rxt.training`) mix it in through their common base; any other `Trainer`
(or subclass) can too::

    class MyTrainer(RxTHubTrainerMixin, Trainer):
        rxt_stage = "joint-sft"

Then:

* the Hub repository is created gated (`open_gated_repo`) when the Trainer opens it (`args.push_to_hub=True`
  at construction, or the first `push_to_hub()`), before anything is uploaded;
* `trainer.push_to_hub()` and the pushes after each save (`hub_strategy="every_save"`) upload only the model's
  own files with the RAML v1.0 card (this run appended to the stage history), through `push_rxt_to_hub`;
* `hub_strategy="checkpoint"` / `"all_checkpoints"` are refused: they upload optimizer, scheduler and RNG states;
* `trainer.create_model_card(...)` writes the card, `LICENSE` pointer and stage history into `args.output_dir`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Union

from transformers.trainer_utils import HubStrategy

from .cards import RAML_LICENSE_NAME, build_model_card, load_training_stages, stage_record_from_trainer_state
from .push import GatedMode, _check_gated, _write_card_files, hub_api, open_gated_repo, push_rxt_to_hub

__all__ = ["RxTHubTrainerMixin"]


class RxTHubTrainerMixin:
    """Trainer mixin: gated Hub repository, RAML v1.0 card, pushes through `push_rxt_to_hub`.

    Class attributes:
        rxt_stage: the curriculum stage this trainer runs (recorded in the card's training table).
        rxt_gated: the gating mode of the repository, "auto" or "manual", or None to keep the mode of an
            existing gated repository (refused for a new or ungated one). False (ungated) is refused.
    """

    rxt_stage: Optional[str] = None
    rxt_gated: GatedMode = "auto"

    # The attributes used below (args, state, model, processing_class, ...) are those of `Trainer`.

    # ------------------------------------------------------------------------------------------ hub repo
    def init_hf_repo(self, token: Optional[str] = None, private: Optional[bool] = None) -> None:
        """Create the repository `args.hub_model_id` (default: the output directory's name) and gate it."""
        _check_gated(self.rxt_gated)
        strategy = self.args.hub_strategy
        if self.args.push_to_hub and strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            raise ValueError(f"hub_strategy={strategy.value!r} uploads the optimizer, scheduler and RNG states of "
                             "checkpoints, which are not part of a published RxT model; use "
                             "hub_strategy='every_save' or 'end'")
        if not self.is_world_process_zero():
            return
        name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        private = private if private is not None else self.args.hub_private_repo
        self.hub_model_id = open_gated_repo(hub_api(token), name, private=private, gated=self.rxt_gated)
        self.push_in_progress = None

    # ------------------------------------------------------------------------------------------ push
    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        **kwargs: Any,
    ):
        """Save the model and upload it with `push_rxt_to_hub` (gated repository, RAML card, model files only).

        Same arguments as `Trainer.push_to_hub`; `kwargs` are `create_model_card` arguments (`dataset`, `tags`,
        `language`, `finetuned_from`, `model_name`, `eval_results`). The upload runs in the foreground:
        `blocking=False` is refused. Returns the `CommitInfo` (None on processes other than the main one).
        """
        if not blocking:
            raise ValueError("blocking=False: RxT pushes run in the foreground (the card is staged for the push "
                             "only); call push_to_hub() with blocking=True")
        card_kwargs = self._rxt_card_kwargs(**kwargs)  # bad card arguments fail before anything is saved
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)  # the local copy in output_dir
        self._finish_current_push()
        return self._rxt_push(self.args.output_dir, commit_message, token=token, revision=revision,
                              private=private, **card_kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """After a save with `hub_strategy="every_save"`: push the checkpoint's model files the same way."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self._rxt_push(checkpoint_folder, f"Training in progress, step {self.state.global_step}",
                       token=self.args.hub_token, **self._rxt_card_kwargs())

    def _rxt_push(self, folder: str, commit_message: Optional[str], *, token: Optional[str],
                  revision: Optional[str] = None, private: Optional[bool] = None, **card_kwargs: Any):
        return push_rxt_to_hub(
            folder,
            self.hub_model_id,
            tokenizer=self.processing_class,
            private=private if private is not None else self.args.hub_private_repo,
            gated=self.rxt_gated,
            token=token,
            commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
            **card_kwargs,
        )

    # ------------------------------------------------------------------------------------------ card
    def rxt_stage_record(self, dataset: Union[str, list, None] = None) -> dict[str, Any]:
        """This run as a stage record (steps, epochs, tokens seen, last loss) for the card's training table."""
        state = dataclasses.asdict(self.state)
        return stage_record_from_trainer_state(state, stage=self.rxt_stage or type(self).__name__, dataset=dataset)

    def _rxt_model(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "as_rxt"):  # a stage model (transformers_rxt.training): the RxT model without its heads
            model = model.as_rxt()
        if hasattr(model, "get_base_model"):  # a peft wrapper: describe the base model
            model = model.get_base_model()
        return model

    def _rxt_card_kwargs(
        self,
        language: Optional[str] = None,
        license: Optional[str] = None,
        tags: Union[str, list[str], None] = None,
        model_name: Optional[str] = None,
        finetuned_from: Optional[str] = None,
        tasks: Union[str, list[str], None] = None,
        dataset_tags: Union[str, list[str], None] = None,
        dataset: Union[str, list[str], None] = None,
        dataset_args: Union[str, list[str], None] = None,
        eval_results: Optional[dict] = None,
    ) -> dict[str, Any]:
        """`build_model_card` arguments from `create_model_card` ones, with the stage history plus this run."""
        if license not in (None, "other", RAML_LICENSE_NAME):
            raise ValueError(f"license={license!r}: RxT models are published under RAML v1.0 ({RAML_LICENSE_NAME})")
        source = getattr(self._rxt_model(), "name_or_path", "") or ""
        history = load_training_stages(source) if source and Path(source).is_dir() else []
        return {
            "stages": history + [self.rxt_stage_record(dataset)],
            "eval_results": eval_results,
            "datasets": dataset,
            "language": language or ("en",),
            "base_model": finetuned_from,
            "model_name": model_name,
            "tags": [tags] if isinstance(tags, str) else (tags or ()),
        }

    def create_model_card(self, **kwargs: Any) -> None:
        """Write the RAML v1.0 card, `LICENSE` pointer and stage history into `args.output_dir`.

        Same arguments as `Trainer.create_model_card` (`tasks`, `dataset_tags` and `dataset_args` are not
        used: the card's task is always text generation), plus `eval_results` for the evaluation section.
        `license` can only be None/"other"/"raml-v1.0": RxT models are published under RAML v1.0.
        """
        card_kwargs = self._rxt_card_kwargs(**kwargs)
        if not self.is_world_process_zero():
            return
        # With rxt_gated=None (keep) this local copy says "auto"; the pushed card states the repository's mode.
        card = build_model_card(self._rxt_model(), repo_id=getattr(self, "hub_model_id", None),
                                tokenizer=self.processing_class, gated=self.rxt_gated or "auto", **card_kwargs)
        out_dir = Path(self.args.output_dir)
        os.makedirs(out_dir, exist_ok=True)
        _write_card_files(out_dir, card, card_kwargs["stages"], kwargs.get("model_name") or out_dir.name)
