"""Make a transformers `Trainer` publish RxT models the same way `push_rxt_to_hub` does.

Mix :class:`RxTHubTrainerMixin` in front of `Trainer` (or any subclass, e.g. the curriculum stage trainers)::

    class JointPretrainingTrainer(RxTHubTrainerMixin, Trainer):
        rxt_stage = "joint-pretraining"

Then `trainer.create_model_card(...)` writes the RAML v1.0 card (with this run appended to the stage history)
into `args.output_dir`, and `trainer.push_to_hub()` / `args.push_to_hub=True` upload it. Gating is switched on
when the Trainer creates its Hub repository, before the first upload.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import HfApi

from .cards import RAML_LICENSE_NAME, build_model_card, load_training_stages, stage_record_from_trainer_state
from .push import GatedMode, _check_gated, _write_card_files

__all__ = ["RxTHubTrainerMixin"]


class RxTHubTrainerMixin:
    """Trainer mixin: RAML v1.0 card from `create_model_card`, gated Hub repository from `init_hf_repo`.

    Class attributes:
        rxt_stage: the curriculum stage this trainer runs (recorded in the card's training table).
        rxt_gated: the gating mode set on the repository ("auto", "manual", False, or None to leave it).
    """

    rxt_stage: Optional[str] = None
    rxt_gated: GatedMode = "auto"

    # ------------------------------------------------------------------------------------------ hub repo
    def init_hf_repo(self, token: Optional[str] = None, private: Optional[bool] = None) -> None:
        super().init_hf_repo(token=token, private=private)  # type: ignore[misc]
        gated = _check_gated(self.rxt_gated)
        if gated is not None and self.is_world_process_zero():  # type: ignore[attr-defined]
            HfApi().update_repo_settings(self.hub_model_id, gated=gated,  # type: ignore[attr-defined]
                                         token=token or self.args.hub_token)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------------------ card
    def rxt_stage_record(self, dataset: Union[str, list, None] = None) -> dict[str, Any]:
        """This run as a stage record (steps, epochs, tokens seen, last loss) for the card's training table."""
        state = dataclasses.asdict(self.state)  # type: ignore[attr-defined]
        return stage_record_from_trainer_state(state, stage=self.rxt_stage or type(self).__name__, dataset=dataset)

    def create_model_card(
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
        **kwargs: Any,
    ) -> None:
        """Write the RAML v1.0 card, `LICENSE` pointer and stage history into `args.output_dir`.

        Same arguments as `Trainer.create_model_card` (`tasks`, `dataset_tags` and `dataset_args` are not
        used: the card's task is always text generation), plus `eval_results` for the evaluation section.
        `license` can only be None/"other"/"raml-v1.0": RxT models are published under RAML v1.0.
        """
        if not self.is_world_process_zero():  # type: ignore[attr-defined]
            return
        if license not in (None, "other", RAML_LICENSE_NAME):
            raise ValueError(f"license={license!r}: RxT models are published under RAML v1.0 ({RAML_LICENSE_NAME})")
        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        model = getattr(model, "rxt", model)  # the stage trainers' container module holds the model as `rxt`
        if hasattr(model, "get_base_model"):  # a peft wrapper: describe the base model
            model = model.get_base_model()
        source = getattr(model, "name_or_path", "") or ""
        history = load_training_stages(source) if source and Path(source).is_dir() else []
        stages = history + [self.rxt_stage_record(dataset)]
        if isinstance(tags, str):
            tags = [tags]
        card = build_model_card(
            model,
            repo_id=getattr(self, "hub_model_id", None),
            tokenizer=self.processing_class,  # type: ignore[attr-defined]
            stages=stages,
            eval_results=eval_results,
            datasets=dataset,
            language=language or ("en",),
            base_model=finetuned_from,
            model_name=model_name,
            tags=tags or (),
        )
        out_dir = Path(self.args.output_dir)  # type: ignore[attr-defined]
        os.makedirs(out_dir, exist_ok=True)
        _write_card_files(out_dir, card, stages, model_name or out_dir.name)
