"""Inpainting, outpainting and editing with MAGE's iterative decoder (MaskGIT style).

From an image and a region (a pixel mask or a box), the tokens whose cells touch the region are
regenerated, grown by ``grow`` tokens on each side so the new content has context to blend into;
decoding starts from the partly known token state at the matching schedule step; the decoded
pixels are blended into the original through a blurred version of the regenerated area.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .decoding.config import SamplingConfig
from .decoding.generate import generate
from .models.checks import InputError, InputTypeError, check_model, check_number


def box_to_pixel_mask(box: Sequence[int], size: int, device=None) -> torch.Tensor:
    """(x0, y0, x1, y1) in pixels, end-exclusive -> (size, size) bool mask."""
    if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4:
        raise InputError(f"box must be (x0, y0, x1, y1) in pixels, got {box!r}")
    for v in box:  # pixels are whole: 0.5 is refused, not rounded
        check_number(v, "box coordinates", integer=True)
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise InputError(f"box must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}, got {tuple(box)}")
    m = torch.zeros(size, size, dtype=torch.bool, device=device)
    m[y0:y1, x0:x1] = True
    return m


def token_region(pixel_mask: torch.Tensor, grid: int, grow: int = 1) -> torch.Tensor:
    """(H, W) bool pixel mask -> (grid, grid) bool token mask: every token whose cell holds a
    masked pixel, dilated by ``grow`` tokens on each side (a square neighbourhood)."""
    if pixel_mask.dim() != 2 or pixel_mask.shape[0] % grid or pixel_mask.shape[1] % grid:
        raise InputError(f"pixel mask must be (H, W) with H and W multiples of the token grid {grid}, "
                         f"got {tuple(pixel_mask.shape)}")
    cells = F.adaptive_max_pool2d(pixel_mask.float()[None, None], grid)  # any pixel in the cell
    if grow > 0:
        cells = F.max_pool2d(cells, 2 * grow + 1, stride=1, padding=grow)
    return cells[0, 0] > 0


def soft_composite_mask(tokens: torch.Tensor, size: int, blur_sigma: float) -> torch.Tensor:
    """(grid, grid) bool token mask -> (size, size) float in [0, 1]: the regenerated area,
    upsampled to pixels and blurred with a Gaussian of ``blur_sigma`` pixels (0: hard edge)."""
    m = F.interpolate(tokens.float()[None, None], size=(size, size), mode="nearest")
    if blur_sigma > 0:
        r = max(1, int(3 * blur_sigma))
        x = torch.arange(-r, r + 1, dtype=torch.float32, device=m.device)
        k = torch.exp(-0.5 * (x / blur_sigma) ** 2)
        k = k / k.sum()
        m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    # keep everything outside the grown token area exactly original
    return (m[0, 0] * F.interpolate(tokens.float()[None, None], size=(size, size), mode="nearest")[0, 0]).clamp(0, 1)


_INPAINT_DEFAULTS = dict(num_iter=12, temperature=4.5, seed=0, guidance_scale=0.0, schedule="cosine",
                         temperature_annealing="linear")


@torch.no_grad()
def inpaint(model, image: torch.Tensor, region: torch.Tensor, *, num_samples: int = 1, num_iter: int = 12,
            temperature: float = 4.5, seed: int = 0, grow: int = 1, blur_sigma: Optional[float] = None,
            class_id: Optional[int] = None, guidance_scale: float = 0.0, schedule: str = "cosine",
            temperature_annealing: str = "linear", progress: bool = False,
            config: Optional[SamplingConfig] = None) -> dict:
    """Regenerate the part of ``image`` under ``region``.

    Args:
        model: a :class:`mage_fast.MAGE` in eval mode.
        image: (3, S, S) or (1, 3, S, S) in [0, 1], S = ``model.img_size``.
        region: (S, S) bool pixel mask, True = regenerate (see :func:`box_to_pixel_mask`).
        num_samples: how many alternatives to draw.
        grow: tokens added on each side of the region (context for blending).
        blur_sigma: composite blur in pixels (default: half a token cell).
        class_id: a class for the regenerated region (editing, class-conditional models).
        config: the sampling settings as one :class:`mage_fast.decoding.SamplingConfig` (its sampler
            ``"torch"``), instead of num_iter, temperature, seed, guidance_scale, schedule and
            temperature_annealing (then left unset).
        Other arguments as :func:`mage_fast.generate` (``rng="torch"`` sampling).

    Returns:
        dict with ``images`` (N, 3, S, S) composited results, ``decoded`` the raw decodes,
        ``token_mask`` (grid, grid) regenerated tokens, ``start_step`` the schedule step decoding
        started at, ``composite_mask`` (S, S) the blend weights.
    """
    check_model(model)
    given = dict(num_iter=num_iter, temperature=temperature, seed=seed, guidance_scale=guidance_scale,
                 schedule=schedule, temperature_annealing=temperature_annealing)
    if config is None:
        config = SamplingConfig(sampler="torch", **given)
    else:
        if not isinstance(config, SamplingConfig):
            raise InputTypeError(f"config must be a mage_fast.decoding.SamplingConfig, got {type(config).__name__}")
        if config.sampler != "torch":
            raise InputError("inpaint samples with rng='torch' (partial starts); config.sampler must be 'torch'")
        also = sorted(k for k, v in given.items() if v != _INPAINT_DEFAULTS[k])
        if also:
            raise InputError(f"inpaint got config= and also {', '.join(also)}: give the sampling settings one way")
    check_number(num_samples, "num_samples", lo=1, integer=True)
    check_number(grow, "grow", lo=0, integer=True)
    if class_id is not None:
        check_number(class_id, "class_id", lo=0, integer=True)
    for name, t in (("image", image), ("region", region)):
        if not isinstance(t, torch.Tensor):
            hint = " (convert with torch.from_numpy(a).permute(2, 0, 1).float() / 255)" \
                if name == "image" and type(t).__module__ == "numpy" else ""
            raise InputTypeError(f"inpaint: {name} must be a torch.Tensor, got {type(t).__name__}{hint}")
    if image.dim() not in (3, 4):
        raise InputError(f"inpaint: image must be (3, S, S) or (1, 3, S, S), got shape {tuple(image.shape)}")
    img = image if image.dim() == 4 else image.unsqueeze(0)
    if img.shape[0] != 1:
        raise InputError(f"inpaint takes one image, got a batch of {img.shape[0]}")
    dev = next(model.parameters()).device
    img = img.to(dev)
    S, grid = model.img_size, model.token_grid
    if tuple(region.shape) != (S, S):
        raise InputError(f"region must be a ({S}, {S}) mask, got {tuple(region.shape)}")
    codes = model.tokenize(img)  # (1, L)
    tmask = token_region(region.to(dev).bool(), grid, grow)
    if not bool(tmask.any()):
        raise InputError("the region covers no token: nothing to regenerate")
    init = torch.where(tmask.view(1, -1), model.mask_token_label, codes).expand(num_samples, -1)
    decoded, ids, trace = generate(model, num_samples, config=config,
                                   class_ids=None if class_id is None else torch.tensor([class_id]),
                                   init_ids=init, return_ids=True, return_trace=True, progress=progress)
    sigma = (S / grid) / 2 if blur_sigma is None else blur_sigma
    w = soft_composite_mask(tmask, S, sigma)
    images = w * decoded + (1 - w) * img
    return {"images": images, "decoded": decoded, "token_mask": tmask, "start_step": trace["start_step"],
            "composite_mask": w, "ids": ids}


def outpaint(model, image: torch.Tensor, keep_box: Sequence[int], **kwargs) -> dict:
    """Regenerate everything outside ``keep_box`` (x0, y0, x1, y1): :func:`inpaint` of the rest."""
    check_model(model)
    if not isinstance(image, torch.Tensor):
        raise InputTypeError(f"outpaint: image must be a torch.Tensor, got {type(image).__name__}")
    keep = box_to_pixel_mask(keep_box, model.img_size, device=image.device)
    kwargs.setdefault("grow", 0)  # growing would eat into the kept box
    return inpaint(model, image, ~keep, **kwargs)
