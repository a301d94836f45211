"""Hub publishing for Reactive Transformer models: RAML v1.0 model cards, gated pushes, LoRA target presets.

Models trained with this package are published under the Reactive AI Model & Architecture License (RAML) v1.0
(gated, non-commercial); the package's own code is Apache-2.0 (see LICENSE and NOTICE at the repository root).
"""

from .cards import (
    GATED_DESCRIPTIONS,
    RAML_LICENSE_NAME,
    RAML_LICENSE_TITLE,
    RAML_LICENSE_URL,
    RXT_CARD_TAGS,
    RxTCardValidationError,
    build_model_card,
    count_parameters,
    describe_architecture,
    gating_metadata,
    license_pointer_text,
    load_training_stages,
    stage_record_from_trainer_state,
    validate_model_card,
)
from .lora import RXT_LORA_PARTS, rxt_lora_target_modules, rxt_lora_target_parameters
from .push import add_push_parser, check_remote_code, open_gated_repo, push_rxt_to_hub, save_hub_ready
from .trainer import RxTHubTrainerMixin

__all__ = [
    "GATED_DESCRIPTIONS",
    "RAML_LICENSE_NAME",
    "RAML_LICENSE_TITLE",
    "RAML_LICENSE_URL",
    "RXT_CARD_TAGS",
    "RXT_LORA_PARTS",
    "RxTCardValidationError",
    "RxTHubTrainerMixin",
    "add_push_parser",
    "build_model_card",
    "check_remote_code",
    "count_parameters",
    "describe_architecture",
    "gating_metadata",
    "license_pointer_text",
    "load_training_stages",
    "open_gated_repo",
    "push_rxt_to_hub",
    "rxt_lora_target_modules",
    "rxt_lora_target_parameters",
    "save_hub_ready",
    "stage_record_from_trainer_state",
    "validate_model_card",
]
