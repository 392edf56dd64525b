"""Training data loaders: a DALI pipeline (GPU, or CPU when DALI is installed without a GPU) or a
PyTorch DataLoader over :class:`ImageFolder`, with the same augmentation and layout.

The PyTorch loader resumes exactly (sample order and augmentation depend only on seed, epoch and
index); DALI's reader keeps its own random state, so a resumed DALI run restarts its epoch in a
fresh order (logged as such).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from ..image_folder import list_image_folder
from .datasets import ImageFolder, SyntheticImages, TokenCache, TwoViews
from .sampler import ResumableSampler
from .transforms import EvalTransform, TrainTransform

log = logging.getLogger("mage_fast.data")
BACKENDS = ("auto", "torch", "dali")


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace at all
        return False


def choose_backend(requested: str, source: str) -> Tuple[str, str]:
    """-> (backend, why). ``source`` is 'folder', 'synthetic' or 'tokens' (only folders use DALI);
    'auto' picks DALI only where it can decode: installed, and a CUDA device present."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown data backend {requested!r}; choose from {BACKENDS}")
    if source != "folder":
        if requested == "dali":
            raise ValueError(f"the DALI backend reads image folders, not {source} data")
        return "torch", f"{source} data uses the PyTorch DataLoader"
    if requested == "torch":
        return "torch", "requested"
    if not dali_available():
        if requested == "dali":
            raise RuntimeError("nvidia-dali is not installed (pip install nvidia-dali-cuda130)")
        return "torch", "nvidia-dali is not installed"
    if requested == "auto" and not torch.cuda.is_available():
        # DALI decodes with nvImageCodec, which needs a CUDA device: without one it fails on the first
        # image (and names no file); the PyTorch loader decodes anywhere and names an unreadable image
        return "torch", "no CUDA device for DALI's decoder"
    where = "GPU" if torch.cuda.is_available() else "CPU"
    return "dali", f"nvidia-dali found, pipeline on the {where}"


@dataclass
class LoaderSpec:
    """What to load. ``source``: 'folder' (``path`` an ImageFolder), 'synthetic', or 'tokens'
    (``path`` a token cache)."""
    source: str
    path: Optional[str] = None
    img_size: int = 256
    batch_size: int = 32  # per rank, per micro-step
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    num_workers: int = 2
    seed: int = 0
    synthetic_length: int = 1024
    backend: str = "auto"
    two_views: bool = False  # MAGE-C: each sample as two augmented views, (2, ...)


class EpochLoader:
    """Iterates micro-batches epoch after epoch from a given (epoch, batch) position.

    ``state()`` / ``load_state()`` give the position to checkpoint; ``batches(epoch, start)``
    yields (inputs, labels) for one epoch from batch ``start``.
    """

    def __init__(self, spec: LoaderSpec, rank: int = 0, world_size: int = 1):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.backend, why = choose_backend(spec.backend, spec.source)
        log.info("data: %s source, %s backend (%s)", spec.source, self.backend, why)
        self.description = f"{spec.source} via {self.backend} ({why})"
        if spec.source == "folder":
            if spec.path is None:
                raise ValueError("an image-folder source needs a path")
            if self.backend == "torch":
                self.dataset = ImageFolder(spec.path, TrainTransform(spec.img_size, spec.crop_scale), seed=spec.seed)
                n = len(self.dataset)
            else:  # DALI reads the files the one image-folder reader lists, not its own walk of the folder
                self.items = list_image_folder(spec.path)[0]
                n = len(self.items)
        elif spec.source == "synthetic":
            self.dataset = SyntheticImages(spec.img_size, spec.synthetic_length, seed=spec.seed)
            n = len(self.dataset)
        elif spec.source == "tokens":
            self.dataset = TokenCache(spec.path, seed=spec.seed)
            n = len(self.dataset)
        else:
            raise ValueError(f"unknown data source {spec.source!r}")
        if spec.two_views:
            if self.backend == "dali":
                raise ValueError("two-view (MAGE-C) batches use the PyTorch loader; pass --data_backend torch")
            self.dataset = TwoViews(self.dataset)
        self.num_samples = n
        self.batches_per_epoch = (n // world_size) // spec.batch_size
        if self.batches_per_epoch == 0:
            from ..models.checks import InputError  # a ValueError: one line under the scripts
            raise InputError(f"{n} samples over {world_size} rank(s) give no full batch of {spec.batch_size} "
                             f"({spec.source}{' ' + spec.path if spec.path else ''}): lower --batch_size")
        self.sampler = ResumableSampler(n, rank, world_size, shuffle=True, seed=spec.seed)

    def batches(self, epoch: int, start: int = 0) -> Iterator:
        if self.backend == "dali":
            yield from _dali_batches(self.spec, self.items, self.rank, self.world_size, epoch, start,
                                     self.batches_per_epoch)
            return
        self.sampler.set_epoch(epoch, start * self.spec.batch_size)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.spec.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.spec.num_workers, persistent_workers=False,
            generator=torch.Generator().manual_seed(self.spec.seed),  # keeps the global RNG untouched
            pin_memory=torch.cuda.is_available())
        yield from loader


def _dali_batches(spec: LoaderSpec, items: list, rank: int, world_size: int, epoch: int, start: int, per_epoch: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    gpu = torch.cuda.is_available()
    device_id = torch.cuda.current_device() if gpu else None

    @pipeline_def(batch_size=spec.batch_size, num_threads=max(1, spec.num_workers), device_id=device_id,
                  seed=spec.seed * 1000 + epoch * 16 + rank)
    def pipe():
        jpegs, labels = fn.readers.file(files=[p for p, _ in items], labels=[y for _, y in items], random_shuffle=True,
                                        shard_id=rank, num_shards=world_size, seed=spec.seed + epoch, name="reader")
        imgs = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        imgs = fn.random_resized_crop(imgs, size=(spec.img_size, spec.img_size),
                                      random_area=list(spec.crop_scale), random_aspect_ratio=[3 / 4, 4 / 3],
                                      interp_type=types.INTERP_CUBIC)
        imgs = fn.crop_mirror_normalize(imgs, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3,
                                        std=[255.0] * 3, mirror=fn.random.coin_flip(probability=0.5))
        return imgs, labels

    try:  # the iterator decodes its first batches when it is made
        p = pipe()
        p.build()
        it = DALIGenericIterator([p], ["images", "labels"], reader_name="reader",
                                 last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        batches = enumerate(it)
    except RuntimeError as e:  # DALI's decoder names no file ("nvImageCodec failure: '#3'")
        raise _dali_decode_error(spec.path, e) from e
    while True:
        try:
            b, out = next(batches)
        except StopIteration:
            return
        except RuntimeError as e:
            raise _dali_decode_error(spec.path, e) from e
        if b >= per_epoch:
            break
        if b < start:
            continue
        yield out[0]["images"].clamp_(0, 1), out[0]["labels"].view(-1).long()


def _dali_decode_error(root: str, e: RuntimeError) -> Exception:
    """The image DALI could not decode, named: DALI reports a failed pipeline without the file, so
    the folder's images are opened with PIL (only on this failure) to find the first unreadable
    one. Returns an :class:`ImageReadError` naming it (or saying that PIL opens them all), or ``e``
    itself when the failure was not the decoder's."""
    from ..image_folder import IMAGE_READ_ERRORS, ImageReadError
    from PIL import Image
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "failure" in ln.lower()), "it stopped the pipeline")
    if "decoders.image" not in str(e) and "nvImageCodec" not in str(e):
        return e
    for path, _ in list_image_folder(root)[0]:
        try:
            with Image.open(path) as img:
                img.load()
        except IMAGE_READ_ERRORS as pil:
            return ImageReadError(f"{path}: not a readable image (DALI's decoder: {why}; PIL: {type(pil).__name__}: "
                                  f"{pil}); remove or replace it")
    return ImageReadError(f"DALI's decoder failed on an image under {root} ({why}), and every image there opens "
                          f"with PIL; --data_backend torch reads them")


def eval_images(root: str, img_size: int) -> ImageFolder:
    """An ImageFolder with the evaluation transform (resize only), e.g. for the linear probe."""
    return ImageFolder(root, EvalTransform(img_size))
