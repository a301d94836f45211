"""transformers-rxt: the Reactive Transformer (RxT), native to transformers.

Importing the package registers model types "rxt" and "rxt_memory_attention" with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_rxt import MemoryUpdateError, STMCache
from .configuration_rxt import RxTComponentConfig, RxTConfig, RxTMemoryAttentionConfig, RxTMemoryAttentionOptions
from .modeling_rxt import (
    RxTForConversationalGeneration,
    RxTMemoryAttention,
    RxTMLMHead,
    RxTOutput,
    rxlm_config_to_rxt,
)

__version__ = "0.1.0"

AutoConfig.register("rxt", RxTConfig, exist_ok=True)
AutoConfig.register("rxt_memory_attention", RxTMemoryAttentionConfig, exist_ok=True)
AutoModel.register(RxTConfig, RxTForConversationalGeneration, exist_ok=True)
AutoModelForCausalLM.register(RxTConfig, RxTForConversationalGeneration, exist_ok=True)
AutoModel.register(RxTMemoryAttentionConfig, RxTMemoryAttention, exist_ok=True)

__all__ = [
    "MemoryUpdateError",
    "RxTComponentConfig",
    "RxTConfig",
    "RxTForConversationalGeneration",
    "RxTMLMHead",
    "RxTMemoryAttention",
    "RxTMemoryAttentionConfig",
    "RxTMemoryAttentionOptions",
    "RxTOutput",
    "STMCache",
    "rxlm_config_to_rxt",
]
