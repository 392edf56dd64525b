"""Writing generated images: PNG files the way the official script writes them, and grids."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float, nominally [0, 1] -> (B, H, W, 3) uint8, as the official script:
    ``clip(x * 255, 0, 255)`` then truncation to uint8 (not rounding), so FID inputs match."""
    x = imgs.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def save_pngs(imgs: torch.Tensor, out_dir: str, first_index: int = 0) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(imgs)):
        p = os.path.join(out_dir, f"{first_index + i:05d}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def make_grid(images: Sequence[np.ndarray], ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """List of (H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 picture."""
    if not len(images):
        raise ValueError("no images to put in a grid")
    n = len(images)
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    h, w = images[0].shape[:2]
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return grid


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_strip(width: int, height: int, texts: Sequence[tuple[float, str]], font_size: int) -> np.ndarray:
    """A white (height, width, 3) strip with each text centred at its x position."""
    from PIL import ImageDraw
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(strip), _font(font_size)
    for x, text in texts:
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        draw.text((max(0, min(width - (r - l), x - (r - l) / 2)), (height - (b - t)) / 2 - t), text,
                  fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def save_grid(images: Sequence[np.ndarray], path: str, ncol: int | None = None, min_tile: int = 64,
              col_labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
              footer: Optional[np.ndarray] = None, scale: int = 1) -> str:
    """Write ``make_grid(images, ncol)`` as a PNG; tiles smaller than ``min_tile`` pixels are enlarged
    by an integer factor (nearest neighbour: each pixel stays a visible square), so a grid of 28-px
    samples is viewable. The individual PNGs are never resized. The project's one grid writer.

    ``col_labels`` writes a name above each column (class names, step numbers); ``title`` a line
    above everything; ``footer`` (h, w, 3) uint8 is placed under the grid (a legend). ``scale``
    enlarges the finished picture, gaps included, by that integer factor (nearest neighbour)."""
    h = images[0].shape[0] if len(images) else min_tile
    k = max(1, -(-min_tile // h))
    if k > 1:
        images = [np.repeat(np.repeat(im, k, axis=0), k, axis=1) for im in images]
    pad = 2
    grid = make_grid(images, ncol)
    width = grid.shape[1]
    font_size = 12 if images[0].shape[1] >= 48 else 9
    parts = []
    if title:
        parts.append(_text_strip(width, font_size + 8, [(width / 2, title)], font_size + 1))
    if col_labels:
        tw = images[0].shape[1]
        labels = [(pad + c * (tw + pad) + tw / 2, str(t)) for c, t in enumerate(col_labels)]
        parts.append(_text_strip(width, font_size + 6, labels, font_size))
    parts.append(grid)
    if footer is not None:
        fw = np.full((footer.shape[0], width, 3), 255, np.uint8)
        fw[:, : min(width, footer.shape[1])] = footer[:, :width]
        parts.append(fw)
    picture = Image.fromarray(np.concatenate(parts, axis=0))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
    return path


BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}


def _image_error(msg: str) -> Exception:
    from .models.checks import InputError
    return InputError(msg)


def read_rgb(path: str, background: str = "black", notes: Optional[list] = None) -> np.ndarray:
    """An image file -> (H, W, 3) float32 in [0, 1], converted without loss of meaning:
    16-bit and 32-bit grayscale scaled by their bit depth (not clipped to 8 bits), palette images
    through their palette, transparency composited over ``background`` (black, white or gray:
    stated in ``notes``), CMYK / YCbCr / LAB through PIL's conversion, grayscale repeated to RGB,
    the first frame of an animation. Files that are not images raise an error naming the file."""
    from .models.checks import check_file
    check_file(path, "an image")
    if background not in BACKGROUNDS:
        raise _image_error(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise _image_error(f"{path} is not an image PIL can read ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:160]})") from e
    note = notes.append if notes is not None else (lambda _m: None)
    if getattr(im, "n_frames", 1) > 1:
        note(f"{path} has {im.n_frames} frames; using the first")
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        scale = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if mode == "I" and a.max(initial=0) > 65535:
            scale = 2.0 ** 32 - 1
        gray = np.clip(a / scale, 0, 1).astype(np.float32)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise _image_error(f"{path} is a floating-point image with values outside [0, 1]; "
                               f"expected [0, 1] (or an 8/16-bit image)")
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("L", "1") and "transparency" in im.info:
        im = im.convert("LA")
    elif mode == "RGB" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        if (alpha < 1).any():
            bg = np.asarray(BACKGROUNDS[background], dtype=np.float32) / 255.0
            note(f"{path} has transparency: composited over {background} (--background)")
            return rgba[..., :3] * alpha + bg * (1 - alpha)
        return np.ascontiguousarray(rgba[..., :3])
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str, size: int, *, background: str = "black", notes: Optional[list] = None,
               min_size: Optional[int] = None) -> torch.Tensor:
    """An image file -> (3, size, size) float in [0, 1]: converted by :func:`read_rgb`,
    centre-cropped to a square, resized with bicubic filtering (PIL, on 8-bit RGB as the official
    evaluation preprocessing; 16-bit inputs are resized in float). With ``notes`` (a list), what was
    done (crop, resize, transparency) is appended as sentences. Images whose shorter side is below
    ``min_size`` are refused: upscaling them cannot give a meaningful input."""
    a = read_rgb(path, background, notes)
    h, w = a.shape[:2]
    s = min(w, h)
    if min_size is not None and s < min_size:
        raise _image_error(f"{path} is {w}x{h} pixels; expected at least {min_size}x{min_size} "
                           f"(the model takes {size}x{size})")
    note = notes.append if notes is not None else (lambda _m: None)
    if w != h:
        y0, x0 = (h - s) // 2, (w - s) // 2
        a = a[y0:y0 + s, x0:x0 + s]
        note(f"{path} is {w}x{h}: centre-cropped to {s}x{s}")
    if s != size:
        note(f"{path}: resized {s}x{s} -> {size}x{size} (bicubic)")
        eight_bit = np.allclose(a * 255, np.round(a * 255), atol=1e-4)
        if eight_bit:
            im = Image.fromarray(np.round(a * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
        else:
            chans = [np.asarray(Image.fromarray(a[..., c]).resize((size, size), Image.BICUBIC)) for c in range(3)]
            a = np.clip(np.stack(chans, -1), 0, 1).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(2, 0, 1).contiguous()


def shade_tokens(img: np.ndarray, token_mask: np.ndarray, level: int = 128, alpha: float = 0.75) -> np.ndarray:
    """(H, W, 3) uint8 with the cells of ``token_mask`` (grid, grid) bool shaded grey."""
    g = token_mask.shape[0]
    cell = img.shape[0] // g
    m = np.kron(token_mask.astype(np.float32), np.ones((cell, cell), np.float32))[..., None]
    return (img * (1 - alpha * m) + level * alpha * m).astype(np.uint8)


def step_heatmap(fixed_at: np.ndarray, num_steps: int, size: int) -> np.ndarray:
    """(grid, grid) step at which each token was fixed (-1 = given) -> (size, size, 3) uint8:
    dark blue = early, yellow = late, grey = given."""
    g = fixed_at.shape[0]
    t = np.clip(fixed_at / max(1, num_steps - 1), 0, 1)
    rgb = np.stack([255 * t, 64 + 160 * t, 200 * (1 - t)], -1)
    rgb[fixed_at < 0] = 160
    return np.kron(rgb, np.ones((size // g, size // g, 1))).astype(np.uint8)


def heatmap_legend(num_steps: int, width: int, height: int = 30) -> np.ndarray:
    """A legend strip for :func:`step_heatmap`: the colour ramp from step 1 to ``num_steps`` and the
    grey of given tokens, labelled."""
    ramp_w = max(40, width // 2)
    t = np.linspace(0, 1, ramp_w)
    ramp = np.stack([255 * t, 64 + 160 * t, 200 * (1 - t)], -1).astype(np.uint8)
    out = _text_strip(width, height, [(ramp_w / 2, f"fixed at step: 1 ... {num_steps}"),
                                      (ramp_w + (width - ramp_w) / 2, "grey: given")], 10)
    out = out.copy()
    out[height - 8: height - 2, :ramp_w] = ramp[None]
    out[height - 8: height - 2, ramp_w + 4: ramp_w + 16] = 160
    return out
