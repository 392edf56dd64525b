"""Data for pre-training: ImageFolder / synthetic / token-cache datasets, a resumable sampler, and
loaders (DALI when installed, PyTorch otherwise) with the MAGE augmentation."""
from .datasets import ImageFolder, SyntheticImages, TokenCache, TwoViews, scan_image_folder
from .idx import read_idx
from .loader import BACKENDS, EpochLoader, LoaderSpec, choose_backend, dali_available, eval_images
from .sampler import ResumableSampler
from .transforms import EvalTransform, TrainTransform, random_resized_crop_box, sample_rng

__all__ = ["ImageFolder", "TwoViews", "SyntheticImages", "TokenCache", "scan_image_folder", "read_idx", "BACKENDS",
           "EpochLoader", "LoaderSpec", "choose_backend", "dali_available", "eval_images", "ResumableSampler",
           "EvalTransform", "TrainTransform", "random_resized_crop_box", "sample_rng"]
