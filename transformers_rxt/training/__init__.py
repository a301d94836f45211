"""The supervised RxT curriculum as `transformers.Trainer` subclasses (training.md §2-§4).

- stage 0: :func:`transformers_rxt.train_rxt_tokenizer` (see ``trainers/stage0_tokenizer.py``);
- stages 1-2: :class:`JointLMTrainer` / :class:`JointLMConfig` (joint LM pre-training, joint interaction SFT);
- stage 3: :class:`MemoryAttentionTrainer` / :class:`MemoryAttentionConfig` (self-supervised memory attention);
- stage 4: :class:`MemoryAwareTrainer` / :class:`MemoryAwareConfig` (supervised memory-aware training);
- stage 5: :class:`IMPOTrainer` / :class:`IMPOConfig` (memory reinforcement learning) and
  :class:`DMPOTrainer` / :class:`DMPOConfig` (memory-aware preference optimisation);
- :func:`evaluate_memory_retention`: fact recall per distance, memory carried vs reset.

Every stage reads and writes HF model directories (``RxTForConversationalGeneration.from_pretrained``).
"""

from .dmpo import DataCollatorForDMPO, DMPOConfig, DMPOTrainer, make_dmpo_records, tokenize_dmpo_dataset
from .evaluation import (
    compare_retention,
    describe_retention,
    evaluate_heldout_retention,
    evaluate_memory_retention,
    forced_choice_recall,
    format_retention,
)
from .impo import IMPOConfig, IMPOModule, IMPOStage, IMPOTrainer, RxTValueCritic, exponential_schedule, run_impo_curriculum
from .joint import JointLMConfig, JointLMModule, JointLMTrainer
from .memory_attention import (
    MemoryAttentionConfig,
    MemoryAttentionModule,
    MemoryAttentionTrainer,
    segment_pooling,
)
from .memory_aware import GradualUnfreezeCallback, MemoryAwareConfig, MemoryAwareModule, MemoryAwareTrainer
from .utils import COMPONENTS, RxTStageModule, RxTStageTrainer, load_mlm_head, load_rxt_model

__all__ = [
    "DMPOConfig",
    "DMPOTrainer",
    "DataCollatorForDMPO",
    "IMPOConfig",
    "IMPOModule",
    "IMPOStage",
    "IMPOTrainer",
    "RxTValueCritic",
    "exponential_schedule",
    "make_dmpo_records",
    "run_impo_curriculum",
    "tokenize_dmpo_dataset",
    "COMPONENTS",
    "GradualUnfreezeCallback",
    "JointLMConfig",
    "JointLMModule",
    "JointLMTrainer",
    "MemoryAttentionConfig",
    "MemoryAttentionModule",
    "MemoryAttentionTrainer",
    "MemoryAwareConfig",
    "MemoryAwareModule",
    "MemoryAwareTrainer",
    "RxTStageModule",
    "RxTStageTrainer",
    "evaluate_heldout_retention",
    "forced_choice_recall",
    "evaluate_memory_retention",
    "format_retention",
    "compare_retention",
    "describe_retention",
    "load_mlm_head",
    "load_rxt_model",
    "segment_pooling",
]
