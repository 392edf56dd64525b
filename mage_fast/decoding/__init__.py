"""The sampler: ``generate`` and everything it is made of.

- :mod:`.generate`: :func:`generate`, for every task and mode.
- :mod:`.config`: :class:`SamplingConfig`, the settings of a run, checked once.
- :mod:`.schedule`: mask schedules, noise annealing, guidance schedules, :class:`MaskPlan`.
- :mod:`.loop`: the one sampling loop; :mod:`.remask`: the re-masking rules it applies.
- :mod:`.protocol`: :class:`NetworkPass` and :class:`DecodingMode`, what a mode must provide;
  :mod:`.registry` / :data:`MODES`: the named modes.
- :mod:`.modes`: :class:`DecodeMode`, the built-in strategies for the network pass (token
  dropping, cached keys/values, focus), :mod:`.quant` (int8/fp8/bf16 weights), :mod:`.stack`
  (cached transformer passes), :mod:`.graph` (the loop as one CUDA graph).
- :mod:`.official`: the official sampler, step for step.
"""
from .config import ORDERS, SAMPLERS, SamplingConfig
from .generate import generate
from .loop import cfg_logits, decode_run
from .modes import AUTO, DROP_KINDS, MODES, auto_mode, SPEC_HELP, DecodeMode, ModePass, encode_dropped, mode_name, resolve_mode
from .official import official_gen_image, official_remask
from .protocol import DecodingMode, NetworkPass
from .quant import (QUANT_KINDS, SlowModeWarning, bf16_native, int8_native, quant_slow_reason, quant_support,
                    quantized_weights, slow_mode_message)
from .registry import FactoryMode, ModeRegistry
from .remask import ConfidenceRemask, HaltonRemask, OfficialRemask, Remask
from .token_filter import filter_logits
from .schedule import (GUIDANCE_SCHEDULES, SCHEDULES, TEMPERATURE_ANNEALING, MaskPlan, mask_schedule, run_counts,
                       schedule_from)

__all__ = ["AUTO", "ConfidenceRemask", "auto_mode", "DROP_KINDS", "DecodeMode", "DecodingMode", "FactoryMode", "GUIDANCE_SCHEDULES",
           "HaltonRemask", "MODES", "MaskPlan", "ModePass", "ModeRegistry", "NetworkPass", "ORDERS", "OfficialRemask",
           "QUANT_KINDS", "Remask", "SAMPLERS", "SCHEDULES", "SPEC_HELP", "SamplingConfig", "SlowModeWarning",
           "TEMPERATURE_ANNEALING", "bf16_native", "cfg_logits", "decode_run", "encode_dropped", "filter_logits", "generate",
           "int8_native", "mask_schedule", "mode_name", "official_gen_image", "official_remask", "quant_slow_reason",
           "quant_support", "quantized_weights", "resolve_mode", "run_counts", "schedule_from", "slow_mode_message"]
