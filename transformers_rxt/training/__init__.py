"""The supervised RxT curriculum as `transformers.Trainer` subclasses (training.md §2-§4).

- stage 0: :func:`transformers_rxt.train_rxt_tokenizer` (see :mod:`.stages.stage0_tokenizer`);
- stages 1-2: :class:`JointLMTrainer` / :class:`JointLMConfig` (joint LM pre-training, joint interaction SFT);
- stage 3: :class:`MemoryAttentionTrainer` / :class:`MemoryAttentionConfig` (self-supervised memory attention);
- stage 4: :class:`MemoryAwareTrainer` / :class:`MemoryAwareConfig` (supervised memory-aware training);
- stage 5: :class:`IMPOTrainer` / :class:`IMPOConfig` (memory reinforcement learning) and
  :class:`DMPOTrainer` / :class:`DMPOConfig` (memory-aware preference optimisation);
- :func:`evaluate_memory_retention`: fact recall per distance, memory carried vs reset;
- :mod:`.stages`: each stage's entry point ``main(argv)`` (a YAML preset plus overrides), what ``rxt train`` calls.

Each stage trains a ``PreTrainedModel`` (:class:`RxTStageModel` subclasses: :class:`RxTForJointLMTraining`,
:class:`RxTForMemoryAttentionTraining`, :class:`RxTForMemoryAwareTraining`, :class:`RxTForIMPOTraining`,
:class:`RxTForDMPOTraining`) that ``Trainer`` saves, loads and resumes itself; every stage output is an HF model
directory that loads with ``RxTForConversationalGeneration.from_pretrained``.
"""

from .episodes import Turn, compute_memory_update, iter_turns, sequence_log_probs, trim_padding
from .evaluation import (
    compare_retention,
    describe_retention,
    evaluate_heldout_retention,
    evaluate_memory_retention,
    forced_choice_recall,
    format_retention,
)
from .joint import JointLMConfig, JointLMOutput, JointLMTrainer, RxTForJointLMTraining
from .memory_attention import (
    MemoryAttentionConfig,
    MemoryAttentionTrainer,
    RxTForMemoryAttentionTraining,
    segment_pooling,
)
from .memory_aware import GradualUnfreezeCallback, MemoryAwareConfig, MemoryAwareTrainer, RxTForMemoryAwareTraining
from .utils import COMPONENTS, RxTStageModel, RxTStageOutput, RxTStageTrainer, load_rxt_model

# Stage 5 is built on TRL's trainers (the `train` extra): imported on first use, so that the package (stages 1-4)
# imports without TRL; without it, these names raise an ImportError naming the extra.
_STAGE5 = {
    "dmpo": ("DataCollatorForDMPO", "DMPOConfig", "DMPOTrainer", "RxTForDMPOTraining", "make_dmpo_records",
             "tokenize_dmpo_dataset"),
    "impo": ("EmbeddingCosineReward", "IMPOConfig", "IMPOStage", "IMPOTrainer", "RxTForIMPOTraining",
             "RxTValueCritic", "TopicChangeReward", "default_impo_rewards", "exponential_schedule",
             "run_impo_curriculum"),
}


def __getattr__(name: str):
    for module, names in _STAGE5.items():
        if name in names:
            import importlib

            return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Turn",
    "compute_memory_update",
    "iter_turns",
    "sequence_log_probs",
    "trim_padding",
    "DMPOConfig",
    "DMPOTrainer",
    "DataCollatorForDMPO",
    "EmbeddingCosineReward",
    "IMPOConfig",
    "RxTForIMPOTraining",
    "RxTForDMPOTraining",
    "IMPOStage",
    "IMPOTrainer",
    "RxTValueCritic",
    "TopicChangeReward",
    "default_impo_rewards",
    "exponential_schedule",
    "make_dmpo_records",
    "run_impo_curriculum",
    "tokenize_dmpo_dataset",
    "COMPONENTS",
    "GradualUnfreezeCallback",
    "JointLMConfig",
    "JointLMOutput",
    "RxTForJointLMTraining",
    "JointLMTrainer",
    "MemoryAttentionConfig",
    "RxTForMemoryAttentionTraining",
    "MemoryAttentionTrainer",
    "MemoryAwareConfig",
    "RxTForMemoryAwareTraining",
    "MemoryAwareTrainer",
    "RxTStageModel",
    "RxTStageOutput",
    "RxTStageTrainer",
    "evaluate_heldout_retention",
    "forced_choice_recall",
    "evaluate_memory_retention",
    "format_retention",
    "compare_retention",
    "describe_retention",
    "load_rxt_model",
    "segment_pooling",
]
