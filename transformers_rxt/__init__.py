"""transformers-rxt: the Reactive Transformer (RxT), native to transformers.

Importing the package registers model types "rxt" and "rxt_memory_attention" with the Auto classes, the
"sqa" attention implementation for ordinary decoder-only models, and RxT's "text-generation" pipeline (the
earlier turns of a chat written into a fresh memory, then the last user message answered; other models'
pipelines are unchanged).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_rxt import MemoryUpdateError, STMCache
from .configuration_rxt import RxTComponentConfig, RxTConfig, RxTMemoryAttentionConfig, RxTMemoryAttentionOptions
from .modeling_rxt import (
    RxTCache,
    RxTForConversationalGeneration,
    RxTMemoryAttention,
    RxTMLMHead,
    RxTModel,
    RxTModelOutput,
    RxTOutput,
)
from .conversion import rxlm_config_to_rxt
from .interaction_rxt import RxTInteractor

from .pipeline_rxt import RxTTextGenerationPipeline, register_text_generation_pipeline
from .sqa import (
    SQAAttention,
    convert_to_sqa,
    register_sqa_attention,
    sqa_attention_forward,
    sqa_config,
    sqa_head_counts,
    theoretical_speedup,
)
from .tokenization_rxt import (
    RXT_ALPHA_TOKEN_IDS,
    RXT_BETA_TOKEN_IDS,
    RXT_CHAT_TEMPLATE,
    RXT_SPECIAL_TOKENS,
    load_rxt_tokenizer,
    rxt_token_ids,
    tokenize_interaction,
    tokenize_interactions,
    tokenize_prompt,
    tokenize_prompts,
    tokenize_query,
    tokenize_system_prompt,
    train_rxt_tokenizer,
)

__version__ = "0.1.0"

AutoConfig.register("rxt", RxTConfig, exist_ok=True)
AutoConfig.register("rxt_memory_attention", RxTMemoryAttentionConfig, exist_ok=True)
AutoModel.register(RxTConfig, RxTModel, exist_ok=True)
AutoModelForCausalLM.register(RxTConfig, RxTForConversationalGeneration, exist_ok=True)
AutoModel.register(RxTMemoryAttentionConfig, RxTMemoryAttention, exist_ok=True)
register_sqa_attention()  # attn_implementation="sqa" for Llama/Qwen2/Mistral-style models
register_text_generation_pipeline()  # pipeline("text-generation") on RxT: chat history -> fresh memory -> answer

__all__ = [
    "RxTInteractor",
    "RxTTextGenerationPipeline",
    "SQAAttention",
    "convert_to_sqa",
    "register_sqa_attention",
    "sqa_attention_forward",
    "sqa_config",
    "sqa_head_counts",
    "theoretical_speedup",
    "RXT_ALPHA_TOKEN_IDS",
    "RXT_BETA_TOKEN_IDS",
    "RXT_CHAT_TEMPLATE",
    "RXT_SPECIAL_TOKENS",
    "load_rxt_tokenizer",
    "rxt_token_ids",
    "tokenize_interaction",
    "tokenize_interactions",
    "tokenize_prompt",
    "tokenize_prompts",
    "tokenize_query",
    "tokenize_system_prompt",
    "train_rxt_tokenizer",
    "MemoryUpdateError",
    "RxTCache",
    "RxTComponentConfig",
    "RxTConfig",
    "RxTForConversationalGeneration",
    "RxTMLMHead",
    "RxTModel",
    "RxTModelOutput",
    "RxTMemoryAttention",
    "RxTMemoryAttentionConfig",
    "RxTMemoryAttentionOptions",
    "RxTOutput",
    "STMCache",
    "rxlm_config_to_rxt",
]
