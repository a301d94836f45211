"""Conversion between reference (rxlm) checkpoints and HF model directories."""

from .rxlm import convert_rxlm_checkpoint, save_rxlm_checkpoint

__all__ = ["convert_rxlm_checkpoint", "save_rxlm_checkpoint"]
