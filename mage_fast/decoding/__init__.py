"""Decoding modes for :func:`mage_fast.generate`: strategies for the network pass (token
dropping in the encoder, cached keys/values, int8/fp8 Linear layers)."""
from .modes import DROP_KINDS, MODES, DecodeMode, NetworkPass, encode_dropped, mode_name, resolve_mode, run_counts
from .quant import (QUANT_KINDS, SlowModeWarning, bf16_native, int8_native, quant_slow_reason, quant_support,
                    quantized_weights, slow_mode_message)

__all__ = ["DROP_KINDS", "MODES", "QUANT_KINDS", "DecodeMode", "bf16_native", "int8_native", "NetworkPass", "SlowModeWarning", "encode_dropped", "mode_name", "quant_slow_reason", "quant_support",
           "quantized_weights", "resolve_mode", "run_counts", "slow_mode_message"]
