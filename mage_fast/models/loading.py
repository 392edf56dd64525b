"""The loading layer, above the models: build the model a checkpoint holds (MAGE, either tokenizer,
VIM) and load it strictly, and re-export the model card reader. Reading, verifying and
describing state dicts is :mod:`mage_fast.models.state_dict`, below the models."""
from __future__ import annotations

import os
from typing import Mapping

import torch.nn as nn

from .mage import MAGE
from .state_dict import (CheckpointError, describe_state_dict, load_state_dict_strict, read_checkpoint,
                         read_model_card, read_state_dict)
from .state_dict import tokenizer_export as read_tokenizer_export
from .tokenizer_fit import check_tokenizer_fits
from .vim import VIM
from .vit_vqgan import ViTVQGAN
from .vqgan import VQModel


def build_from_checkpoint(path, map_location="cpu", **overrides) -> nn.Module:
    """Build and strictly load the MAGE a checkpoint holds (:meth:`MAGE.from_pretrained`: the model
    builds itself from the state-dict layer, without drawing initial weights)."""
    return MAGE.from_pretrained(path, map_location=map_location, **overrides)


def tokenizer_export(src, img_size=None, map_location="cpu") -> dict:
    """:func:`mage_fast.models.state_dict.tokenizer_export` (``{'state_dict', 'config', 'arch'}`` from
    any tokenizer file), with its config checked against its weights on the meta device before
    anything is built: a config of sizes the weights do not have is a :class:`CheckpointError`
    naming the file, not a model of any size."""
    exp = read_tokenizer_export(src, img_size, map_location)
    check_tokenizer_fits(exp, src if isinstance(src, (str, os.PathLike)) else "the tokenizer")
    return exp


def build_tokenizer(src, img_size=None, map_location="cpu") -> nn.Module:
    """Rebuild and strictly load either tokenizer (VQGAN or ViT-VQGAN) from any file
    :func:`tokenizer_export` accepts; returned in eval mode with frozen parameters.

    Example:
        >>> vq = build_tokenizer("out/vit_tok/tokenizer.pt")  # doctest: +SKIP
    """
    exp = tokenizer_export(src, img_size, map_location)
    cfg = dict(exp["config"])
    if exp["arch"] == "vit_vqgan":
        model = ViTVQGAN(**cfg)
    else:
        res = cfg.pop("resolution", None)
        try:
            model = VQModel(**cfg, **({} if res is None else {"resolution": res}))
        except TypeError as e:
            raise CheckpointError(f"the VQGAN config {cfg} does not fit VQModel: {e}") from e
    load_state_dict_strict(model, exp["state_dict"])
    for p in model.parameters():
        p.requires_grad = False
    return model.eval()


# ---------------------------------------------------------------------------------------- VIM
def load_vim(src, map_location="cpu") -> nn.Module:
    """Rebuild a :class:`mage_fast.models.vim.VIM` with its tokenizer from a ``train/train_vim.py``
    export ``{'model': sd (no tokenizer keys), 'config': VIM kwargs, 'tokenizer': tokenizer export}``;
    strict load; eval mode.

    Example:
        >>> vim = load_vim("out/vim/vim.pt")  # doctest: +SKIP
    """
    name = src if isinstance(src, (str, os.PathLike)) else "the checkpoint"
    raw = read_checkpoint(src, map_location)
    if not isinstance(raw, Mapping) or not {"model", "config", "tokenizer"} <= set(raw):
        what = describe_state_dict(read_state_dict(raw)) if isinstance(raw, Mapping) else type(raw).__name__
        raise CheckpointError(f"{name} is not a train/train_vim.py export ({{'model', 'config', 'tokenizer'}}); it "
                              f"holds {what}")
    tok_exp = raw["tokenizer"]
    tok_cfg = tok_exp.get("config", {}) if isinstance(tok_exp, Mapping) else {}
    img_size = tok_cfg.get("img_size", tok_cfg.get("resolution"))
    tokenizer = build_tokenizer(tok_exp, map_location=map_location)
    try:
        model = VIM(**raw["config"], tokenizer=tokenizer, img_size=img_size)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: the VIM config does not fit its tokenizer or VIM: {e}") from e
    sd = read_state_dict({"model": raw["model"]})
    sd.update({f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()})
    load_state_dict_strict(model, sd)
    return model.eval()

__all__ = ["build_from_checkpoint", "build_tokenizer", "load_vim", "read_model_card", "tokenizer_export"]
