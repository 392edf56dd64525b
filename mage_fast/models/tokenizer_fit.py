"""A tokenizer export's config checked against its weights before anything of its size is built.

A tokenizer file holds constructor arguments beside the state dict; a wrong or corrupt config
(``embed_dim`` 4194304, ``num_res_blocks`` 2**31) would build a model of any size before the strict
load refuses it (out of memory, or minutes of work). :func:`check_tokenizer_fits` refuses it first:
every tensor a tensor, every size in the config within the largest tensor dimension the file holds,
then the model built on the meta device (no memory) and compared key by key and shape by shape.
"""
from __future__ import annotations

import torch

SIZE_FREE = ("resolution", "img_size")  # image sizes: not a tensor dimension (only bounded)


def _numbers(v):
    if isinstance(v, bool):
        return
    if isinstance(v, (int, float)):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _numbers(x)


def check_tokenizer_fits(exp: dict, name) -> None:
    """``exp`` is :func:`mage_fast.models.state_dict.tokenizer_export`'s layout; raises
    :class:`~mage_fast.models.state_dict.CheckpointError` naming ``name`` when its config does
    not build the model its weights are for."""
    from .state_dict import CheckpointError, _compare, _mismatch_message
    sd, cfg, arch = exp["state_dict"], exp["config"], exp["arch"]
    odd = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{name}: the tokenizer's state dict holds non-tensors (first: {odd[0]!r:.60})")
    limit = max([d for v in sd.values() for d in v.shape] + [1])
    for k, v in cfg.items():
        cap = 1 << 16 if k in SIZE_FREE else limit
        big = [x for x in _numbers(v) if not abs(x) <= cap]  # also NaN
        if big:
            raise CheckpointError(f"{name}: the tokenizer config's {k}={big[0]!r} does not fit its weights (whose "
                                  f"largest dimension is {limit})")
    try:
        with torch.device("meta"):
            if arch == "vit_vqgan":
                from .vit_vqgan import ViTVQGAN
                model = ViTVQGAN(**cfg)
            else:
                from .vqgan import VQModel
                model = VQModel(**cfg)
    except Exception as e:  # TypeError, ValueError, ZeroDivisionError, ...: a config of wrong values
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"{name}: the tokenizer config does not build a {arch} ({type(e).__name__}: "
                              f"{first})") from None
    missing, unexpected, misshaped = _compare(model, sd)
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{name}: the tokenizer config does not fit its weights: "
                              + " ".join(_mismatch_message(model, sd, missing, unexpected, misshaped).split()))
