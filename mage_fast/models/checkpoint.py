"""Checkpoint loading under its historical import path: the names of the state-dict layer
(:mod:`mage_fast.models.state_dict`: read, verify, describe, load strictly) and of the loading
layer (:mod:`mage_fast.models.loading`: build a model from a checkpoint, model cards), re-exported.
New code imports from the layer it needs; models import only the state-dict layer."""
from .loading import build_from_checkpoint, build_tokenizer, load_vim, read_model_card, tokenizer_export
from .state_dict import (TOKENIZER_ARCHS, CheckpointError, StateDict, check_saved_config, describe_state_dict,
                         infer_config, load_checkpoint, load_state_dict_strict, load_tokenizer, load_torch_file,
                         read_checkpoint, read_state_dict, tokenizer_checksum)

__all__ = ["TOKENIZER_ARCHS", "CheckpointError", "StateDict", "build_from_checkpoint", "build_tokenizer",
           "check_saved_config", "describe_state_dict", "infer_config", "load_checkpoint", "load_state_dict_strict",
           "load_tokenizer", "load_torch_file", "load_vim", "read_checkpoint", "read_model_card", "read_state_dict",
           "tokenizer_checksum", "tokenizer_export"]
