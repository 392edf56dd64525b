"""The loading layer, above the models: build the model a checkpoint holds (MAGE, either tokenizer,
VIM) and load it strictly, and read the model card beside a checkpoint. Reading, verifying and
describing state dicts is :mod:`mage_fast.models.state_dict`, below the models."""
from __future__ import annotations

import os
from functools import partial
from typing import Mapping

import torch.nn as nn

from .checks import read_json_object
from .mage import MAGE
from .state_dict import (CheckpointError, check_saved_config, describe_state_dict, infer_config, load_state_dict_strict,
                         read_checkpoint, read_state_dict, tokenizer_export)
from .vim import VIM
from .vit_vqgan import ViTVQGAN
from .vqgan import VQModel


def build_from_checkpoint(path, map_location="cpu", **overrides) -> nn.Module:
    """Build and strictly load the MAGE a checkpoint holds. A ``config`` dict saved beside the
    weights (mage_fast's own checkpoints) gives the constructor arguments; otherwise they are
    inferred from the tensor shapes (official ViT-B / ViT-L)."""
    raw = read_checkpoint(path, map_location)
    sd = read_state_dict(raw)
    cfg = infer_config(sd)
    if isinstance(raw, Mapping) and isinstance(raw.get("config"), Mapping):
        check_saved_config(raw["config"], cfg)
        cfg.update(raw["config"])
    cfg.update(overrides)
    for k in ("num_heads", "decoder_num_heads"):
        if k not in cfg:
            raise CheckpointError(f"cannot infer {k} for {describe_state_dict(sd)}; pass {k}=...")
    cfg.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
    cfg.setdefault("vqgan_ckpt_path", None)
    try:
        model = MAGE(**cfg)
    except Exception as e:  # TypeError, ValueError, ZeroDivisionError (num_heads 0), ...: a config of wrong values
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"the checkpoint's config does not build a MAGE ({type(e).__name__}: {first})") from e
    load_state_dict_strict(model, sd)
    if isinstance(path, (str, os.PathLike)):
        card = read_model_card(path)
        names = card.get("classes")
        if names and card.get("class_conditional", True):
            model.num_classes = len(names)
            model.class_names = list(names)
    return model.eval()


def read_model_card(ckpt) -> dict:
    """The model card ``<ckpt without extension>.json`` beside a checkpoint ({} when there is none):
    ``classes`` (names, label order), ``class_conditional``, ``sampling`` defaults."""
    card = os.path.splitext(os.fspath(ckpt))[0] + ".json"
    if not os.path.isfile(card):
        return {}
    return read_json_object(card, "the model card", CheckpointError)


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
