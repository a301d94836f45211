"""Conversion between reference (rxlm) checkpoints and HF model directories."""

from .rxlm import (
    convert_rxlm_checkpoint,
    load_rxlm_memory_attention,
    load_rxlm_model,
    rxlm_config_to_rxt,
    save_rxlm_checkpoint,
)

__all__ = ["convert_rxlm_checkpoint", "load_rxlm_memory_attention", "load_rxlm_model", "rxlm_config_to_rxt",
           "save_rxlm_checkpoint"]
