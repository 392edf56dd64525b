from .checks import InputError
from .loading import build_tokenizer, load_vim
from .mage import (MAGE, MODEL_FACTORIES, mage_vit_base_patch16, mage_vit_large_patch16, mage_vit_tiny)
from .state_dict import CheckpointError, describe_state_dict, load_checkpoint, read_state_dict
from .vqgan import OFFICIAL_VQGAN_CONFIG, VQModel

__all__ = ["MAGE", "MODEL_FACTORIES", "mage_vit_base_patch16", "mage_vit_large_patch16", "mage_vit_tiny",
           "VQModel", "OFFICIAL_VQGAN_CONFIG", "load_checkpoint", "read_state_dict", "describe_state_dict",
           "CheckpointError", "InputError", "build_tokenizer", "load_vim"]
from .vim import VIM, vim_base, vim_tiny
from .vit_vqgan import ViTVQGAN, count_parameters, vit_vqgan_base, vit_vqgan_small, vit_vqgan_tiny

__all__ += ["VIM", "vim_base", "vim_tiny", "ViTVQGAN", "count_parameters", "vit_vqgan_base", "vit_vqgan_small",
            "vit_vqgan_tiny"]
