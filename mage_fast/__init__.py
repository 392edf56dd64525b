"""mage_fast: a performance-first engine for MAGE, MaskGIT decoding and VQGAN tokenizers."""
from . import ops
from .models import (MAGE, CheckpointError, InputError, VQModel, describe_state_dict, load_checkpoint,
                     mage_vit_base_patch16, mage_vit_large_patch16, mage_vit_tiny)
from . import vim_sampling
from .models import VIM, ViTVQGAN
from .decoding import SamplingConfig, generate, mask_schedule, official_gen_image

__version__ = "0.1.0"

__all__ = ["MAGE", "VQModel", "CheckpointError", "InputError", "describe_state_dict", "generate", "load_checkpoint",
           "mage_vit_base_patch16", "mage_vit_large_patch16", "mage_vit_tiny", "mask_schedule",
           "official_gen_image", "ops", "SamplingConfig", "VIM", "ViTVQGAN", "vim_sampling", "__version__"]
