"""Input validation shared by the models: clear errors instead of silently wrong numbers."""
from __future__ import annotations

import torch

# Images are expected in [0, 1]; values beyond this margin mean 0-255 or mean/std inputs.
RANGE_MARGIN = 0.25


class InputError(ValueError):
    """Bad input or settings from the user: the message says what was expected. The command line
    prints it as one line and exits with status 2."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (a NumPy array for a tensor, a path for a model, a float tensor
    for labels): an :class:`InputError`, and a ``TypeError`` as before."""


def check_images(imgs: torch.Tensor, size: int | tuple[int, int] | None, *, check_range: bool = True,
                 channels: int = 3) -> None:
    if not isinstance(imgs, torch.Tensor):
        raise InputTypeError(f"expected images as a torch.Tensor (B, {channels}, H, W), got {type(imgs).__name__}")
    if imgs.dim() != 4 or imgs.shape[1] != channels:
        raise InputError(f"expected images of shape (B, {channels}, H, W), got {tuple(imgs.shape)}")
    if not imgs.is_floating_point():
        raise InputTypeError(f"expected float images in [0, 1], got dtype {imgs.dtype} "
                        f"(convert uint8 with imgs.float() / 255)")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(imgs.shape[2:]) != hw:
            raise InputError(f"expected {hw[0]}x{hw[1]} images, got {imgs.shape[2]}x{imgs.shape[3]}")
    if check_range and imgs.numel():
        lo, hi = torch.aminmax(imgs.detach())
        lo, hi = float(lo), float(hi)
        if lo < -RANGE_MARGIN or hi > 1 + RANGE_MARGIN or lo != lo or hi != hi:
            raise InputError(f"expected image values in [0, 1] (no mean/std normalisation), got min {lo:.3g} "
                             f"max {hi:.3g}")


def check_token_ids(ids: torch.Tensor, num: int, what: str = "token ids") -> None:
    if not isinstance(ids, torch.Tensor):
        raise InputTypeError(f"{what} must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputTypeError(f"{what} must be an integer tensor, got {ids.dtype}")
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        if int(lo) < 0 or int(hi) >= num:
            raise InputError(f"{what} must lie in [0, {num}), got values in [{int(lo)}, {int(hi)}]")


def check_number(value, what: str, *, lo: float | None = None, hi: float | None = None, integer: bool = False,
                 lo_open: bool = False) -> None:
    """A setting must be a finite number in [lo, hi] (``(lo, hi]`` with ``lo_open``); the error says
    the valid range."""
    import math
    import numbers
    # integers: Python's and NumPy's (numbers.Integral), never a float that happens to be whole
    ok_type = isinstance(value, numbers.Integral) and not isinstance(value, bool) if integer else \
        isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok_type or (not integer and not math.isfinite(value)) or \
            (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_s = "" if hi is None else f"<= {hi}"
        rng = " and ".join(x for x in (lo_s, hi_s) if x)
        kind = "an integer" if integer else "a finite number"
        raise InputError(f"{what} must be {kind}{' ' + rng if rng else ''}, got {value!r}")


# What generate / inpaint use of a MAGE model; a module without them is not one.
MAGE_ATTRIBUTES = ("seq_len", "mask_token_label", "codebook_size", "tokenize", "img_size", "token_grid")


def check_model(model, what: str = "model") -> None:
    """``model`` must be a :class:`mage_fast.MAGE` (or a module with its interface): a checkpoint
    path, a state dict, the tokenizer or another object each get one line naming ``what``."""
    import os
    load = "load one with mage_fast.MAGE.from_pretrained(path)"
    if isinstance(model, (str, bytes, os.PathLike)):
        raise InputTypeError(f"{what} must be a mage_fast.MAGE model, got the path {os.fsdecode(model)!r}; {load}")
    if isinstance(model, torch.nn.Module) and all(hasattr(model, a) for a in MAGE_ATTRIBUTES):
        return
    name = type(model).__name__
    if isinstance(model, dict):
        hint = f"a dict (a checkpoint or state dict?); {load}"
    elif hasattr(model, "quantize") and hasattr(model, "decode"):
        hint = f"{name}, a tokenizer (a MAGE model holds its tokenizer as model.vqgan); {load}"
    else:
        hint = f"{name}; {load}"
    raise InputTypeError(f"{what} must be a mage_fast.MAGE model, got {hint}")


def check_file(path, what: str, error=InputError) -> None:
    """``path`` must be a non-empty file: a directory, a missing path or an empty file each get one
    line naming ``what`` was expected (``FileNotFoundError`` for a missing one)."""
    import os
    if os.path.isdir(path):
        raise error(f"{path} is a directory; expected {what} file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what.split(' ', 1)[-1]} not found: {path}")
    if os.path.getsize(path) == 0:
        raise error(f"{path} is empty (0 bytes); expected {what} file")


def read_json_object(path, what: str, error=InputError) -> dict:
    """The JSON object in ``path``; an unreadable file, bad JSON or another JSON value each get one
    line naming ``what`` it should be (raised as ``error``)."""
    import json
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{what} {path} is not readable JSON ({e})") from e
    if not isinstance(obj, dict):
        raise error(f"{what} {path} must hold a JSON object, got {type(obj).__name__}")
    return obj



def check_model_card(card: dict, path, error=InputError) -> dict:
    """The fields of a model card (the JSON beside a checkpoint) that the readers use, checked:
    ``classes`` a list of distinct names, ``class_conditional`` true or false, ``sampling`` an object
    whose ``num_iter`` is an integer 1..10000, whose ``temperature`` / ``guidance`` are finite
    numbers >= 0, whose ``top_k`` (if any) is an integer >= 0 (0: no filter) and whose ``top_p``
    (if any) is a number in (0, 1] (1: no filter). Other keys (description, measurements) are free. Returns ``card``; raises
    ``error`` naming the file and the field otherwise."""
    import math

    def bad(field, want, got):
        return error(f"the model card {path}: {field} must be {want}, got {got!r:.80}")

    names = card.get("classes")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) and n for n in names)
                              or len(set(names)) != len(names)):
        raise bad("'classes'", "a list of distinct class names", names)
    if "class_conditional" in card and not isinstance(card["class_conditional"], bool):
        raise bad("'class_conditional'", "true or false", card["class_conditional"])
    rec = card.get("sampling", {})
    if not isinstance(rec, dict):
        raise bad("'sampling'", "an object", rec)
    n = rec.get("num_iter", 1)
    if type(n) is not int or not 1 <= n <= 10_000:
        raise bad("'sampling.num_iter'", "an integer from 1 to 10000", n)
    for key in ("temperature", "guidance"):
        v = rec.get(key, 0.0)
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise bad(f"'sampling.{key}'", "a finite number >= 0", v)
    k = rec.get("top_k", 0)
    if type(k) is not int or k < 0:
        raise bad("'sampling.top_k'", "an integer >= 0 (0: every code)", k)
    p = rec.get("top_p", 1.0)
    if type(p) not in (int, float) or not 0 < p <= 1:
        raise bad("'sampling.top_p'", "a number in (0, 1] (1: every code)", p)
    return card
