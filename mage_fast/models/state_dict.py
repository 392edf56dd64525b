"""The state-dict layer, below the models: read a checkpoint file (verified: a whole zip archive
whose entries pass their CRC-32, tensors only), find its state dict, say what it holds, load it
strictly into a model that is already built, and infer the constructor arguments of the model it
came from. Nothing here builds a model: :mod:`mage_fast.models.loading` does, above the models."""
from __future__ import annotations

import os
import re
import zipfile
from typing import Mapping, Union

import torch
import torch.nn as nn

from .checks import check_file, check_model_card, read_json_object

StateDict = Mapping[str, torch.Tensor]

# (embed_dim, depth) -> encoder heads; decoder width -> decoder heads, for the known sizes.
_ENCODER_HEADS = {(768, 12): 12, (1024, 24): 16, (64, 2): 4}
_DECODER_HEADS = {768: 16, 1024: 16, 32: 2}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit: the message says what the file holds."""


def load_torch_file(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one-line errors: not found, a directory, empty,
    or not a readable torch checkpoint (truncated, corrupt, text, pickled code)."""
    check_file(path, "a checkpoint", CheckpointError)
    _check_zip_crc(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt zip archive: no "
                              f"central directory; an incomplete copy?)")
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":  # neither torch's zip nor a legacy pickle
        raise CheckpointError(f"{path} is not a readable torch checkpoint (not a torch file: neither a zip archive "
                              f"nor a pickle; it starts with {head!r})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, text, objects beyond tensors
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({_why_unreadable(e)})") from e


def _check_zip_crc(path) -> None:
    """torch.load does not verify the archive's checksums: a checkpoint with damaged bytes inside a
    tensor loads as silently wrong weights. Check every member's CRC-32 first (about 1 GB/s)."""
    if not zipfile.is_zipfile(path):
        return  # legacy pickle files, text, random bytes: torch.load says what they are
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint (corrupt zip archive: {e})") from e
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: its entry {bad} fails its CRC-32 check (damaged or incomplete "
                              f"copy)")


def _why_unreadable(e: Exception) -> str:
    """torch.load's error, first sentence only: truncated / corrupt archive, not a torch file."""
    text = " ".join(str(e).split())
    if "central directory" in text or "zip archive" in text:
        return "truncated or corrupt zip archive"
    if isinstance(e, (KeyError, EOFError)) or "invalid load key" in text or "could not find MARK" in text:
        return f"not a torch file ({type(e).__name__}: {text[:80]})"
    if "Weights only load failed" in text:
        return "not a tensor-only torch file (it holds pickled objects, or random bytes); it is never unpickled"
    return f"{type(e).__name__}: {text.split('. ')[0][:160]}"


def read_checkpoint(src, map_location="cpu"):
    """What a checkpoint path holds (a dict, else CheckpointError: a file holding a bare string must
    not be taken for a path), or ``src`` itself when it is already loaded."""
    if isinstance(src, (str, os.PathLike)):
        obj = load_torch_file(src, map_location)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{src}: expected a dict checkpoint (a state dict or {{'model': ...}}), "
                                  f"got {type(obj).__name__}")
        return obj
    return src


def read_state_dict(src: Union[str, os.PathLike, Mapping], map_location="cpu") -> dict:
    """A state dict from ``{'model': sd}``, ``{'state_dict': sd}``, a bare state dict, or a path to one."""
    if isinstance(src, (str, os.PathLike)):
        obj = load_torch_file(src, map_location)
    else:
        obj = src
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict checkpoint, got {type(obj).__name__}")
    for wrapper in ("model", "state_dict", "module"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"no tensors found in the checkpoint (top-level keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def describe_state_dict(sd: StateDict) -> str:
    """A human description of what a state dict holds (MAGE size, classifier, tokenizer, ...)."""
    if "tok_emb.weight" in sd and "pos_emb" in sd:
        dim = sd["tok_emb.weight"].shape[1]
        depth = len({k.split(".")[1] for k in sd if re.match(r"blocks\.\d+\.", k)})
        return f"a VIM stage-2 model (width {dim}, depth {depth})"
    if "token_emb.word_embeddings.weight" in sd:
        dim = sd["token_emb.word_embeddings.weight"].shape[1]
        depth = len({k.split(".")[1] for k in sd if re.match(r"blocks\.\d+\.", k)})
        name = {(768, 12): "ViT-B", (1024, 24): "ViT-L"}.get((dim, depth), f"width {dim}, depth {depth}")
        has_vq = any(k.startswith("vqgan.") for k in sd)
        if "head.weight" in sd or "fc_norm.weight" in sd:
            return f"a fine-tuned / linear-probe MAGE classifier ({name}), not a generative MAGE"
        return f"a pre-trained MAGE {name}" + ("" if has_vq else " without tokenizer weights")
    if "head.weight" in sd or "fc_norm.weight" in sd:
        pos = sd.get("pos_embed")
        npos = pos.shape[1] if pos is not None and pos.dim() == 3 else "?"
        return f"an image classifier (ViT with head/fc_norm, {npos}-position pos_embed), not a generative MAGE"
    if "quantize.embedding.weight" in sd or "vqgan.quantize.embedding.weight" in sd:
        key = "quantize.embedding.weight" if "quantize.embedding.weight" in sd else "vqgan.quantize.embedding.weight"
        n, d = sd[key].shape
        if "quant_proj.weight" in sd:
            return f"a ViT-VQGAN tokenizer ({n} codes of dim {d})"
        return f"a VQGAN tokenizer ({n} codes of dim {d})"
    return f"an unrecognised state dict ({len(sd)} tensors, e.g. {list(sd)[:3]})"


def _describe_model(model: nn.Module) -> str:
    return describe_state_dict(model.state_dict()).replace("a pre-trained", "a")


def _compare(model: nn.Module, sd: StateDict) -> tuple[list, list, list]:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    misshaped = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    return missing, unexpected, misshaped


def _mismatch_message(model: nn.Module, sd: StateDict, missing, unexpected, misshaped) -> str:
    def few(xs):
        return ", ".join(map(str, xs[:5])) + (f", ... ({len(xs)} in all)" if len(xs) > 5 else "")
    lines = [f"checkpoint does not fit the model: the file holds {describe_state_dict(sd)}; the model is "
             f"{_describe_model(model)}."]
    if missing:
        lines.append(f"  missing keys: {few(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {few(unexpected)}")
    if misshaped:
        lines.append("  mis-shaped keys (file vs model): " + few([f"{k} {a} vs {b}" for k, a, b in misshaped]))
    return "\n".join(lines)


def load_state_dict_strict(model: nn.Module, sd: StateDict) -> None:
    missing, unexpected, misshaped = _compare(model, sd)
    if missing or unexpected or misshaped:
        raise CheckpointError(_mismatch_message(model, sd, missing, unexpected, misshaped))
    model.load_state_dict(sd, strict=True)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike, Mapping], map_location="cpu") -> nn.Module:
    """Load a checkpoint into ``model`` strictly and return the model.

    Accepts ``{'model': sd}`` (official MAGE), ``{'state_dict': sd}`` or a bare state dict. A
    tokenizer-only checkpoint (``encoder.*``, ``decoder.*``, ``quantize.*``) loaded into a MAGE
    fills ``model.vqgan``. A file that does not fit raises :class:`CheckpointError` naming the
    missing, unexpected and mis-shaped keys and what the file looks like.

    Example:
        >>> load_checkpoint(model, "mage-vitb-1600.pth")  # doctest: +SKIP
    """
    sd = read_state_dict(path, map_location)
    is_tokenizer = "quantize.embedding.weight" in sd and not any(k.startswith("token_emb.") for k in sd)
    if is_tokenizer and hasattr(model, "vqgan"):
        load_state_dict_strict(model.vqgan, sd)
    else:
        load_state_dict_strict(model, sd)
    return model


def load_tokenizer(vqgan: nn.Module, path) -> None:
    sd = read_state_dict(path)
    if any(k.startswith("vqgan.") for k in sd):  # a full MAGE checkpoint: take its tokenizer
        sd = {k[len("vqgan."):]: v for k, v in sd.items() if k.startswith("vqgan.")}
    load_state_dict_strict(vqgan, sd)


def infer_config(sd: StateDict) -> dict:
    """MAGE constructor arguments that rebuild the model a MAGE state dict came from;
    :class:`CheckpointError` when the tensors it reads them from are missing or mis-shaped."""
    if "token_emb.word_embeddings.weight" not in sd:
        raise CheckpointError(f"cannot build a MAGE from {describe_state_dict(sd)}; expected a generative MAGE "
                              f"checkpoint (official or mage_fast)")
    try:
        return _infer_config(sd)
    except (KeyError, IndexError, ZeroDivisionError, ValueError) as e:
        what = f"tensor {e.args[0]!r} is missing" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"the checkpoint's MAGE tensors are incomplete or mis-shaped ({what}); a damaged or "
                              f"edited checkpoint?") from None


# Sizes a checkpoint's saved config must agree on with its tensors (they size the model built before
# the strict load: a wrong one would build a model of any size first).
_SIZE_KEYS = ("embed_dim", "depth", "decoder_embed_dim", "decoder_depth", "mlp_ratio")
_VQ_SIZE_KEYS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "n_embed")


def check_saved_config(saved: Mapping, inferred: dict) -> None:
    """A saved ``config`` must agree with the config inferred from the tensors on every size it
    shares with it (:data:`_SIZE_KEYS`, the VQGAN's, the token grid); :class:`CheckpointError` naming
    the first that differs."""
    def same(a, b):
        if isinstance(b, tuple):
            return isinstance(a, (list, tuple)) and list(a) == list(b)
        if isinstance(b, float):
            return isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a - b) <= 1e-6 * max(1.0, abs(b))
        return type(a) is type(b) and a == b
    pairs = [(k, saved[k], inferred[k]) for k in _SIZE_KEYS if k in saved and k in inferred]
    vq_saved, vq_inf = saved.get("vqgan_config"), inferred.get("vqgan_config")
    if vq_inf is not None and "vqgan_config" in saved:
        if not isinstance(vq_saved, Mapping):
            raise CheckpointError(f"the checkpoint's config has vqgan_config {vq_saved!r:.40}; expected a dict")
        pairs += [(f"vqgan_config.{k}", vq_saved[k], vq_inf[k]) for k in _VQ_SIZE_KEYS if k in vq_saved]
    if "img_size" in saved and "img_size" in inferred:  # the token grid: the position embeddings' size
        down = 2 ** (len(vq_inf["ch_mult"]) - 1)
        a = saved["img_size"]
        grid = a // down if type(a) is int else None
        pairs.append(("img_size // downsampling", grid, inferred["img_size"] // down))
    for k, a, b in pairs:
        if not same(a, b):
            raise CheckpointError(f"the checkpoint's config says {k}={a!r:.40}, its tensors {k}={b!r}; a damaged or "
                                  f"edited checkpoint?")


def _infer_config(sd: StateDict) -> dict:
    dim = sd["token_emb.word_embeddings.weight"].shape[1]
    depth = len({k.split(".")[1] for k in sd if re.match(r"blocks\.\d+\.", k)})
    ddim = sd["decoder_embed.weight"].shape[0]
    ddepth = len({k.split(".")[1] for k in sd if re.match(r"decoder_blocks\.\d+\.", k)})
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    cfg = dict(embed_dim=dim, depth=depth, decoder_embed_dim=ddim, decoder_depth=ddepth, mlp_ratio=mlp_ratio)
    if (dim, depth) in _ENCODER_HEADS:
        cfg["num_heads"] = _ENCODER_HEADS[(dim, depth)]
    if ddim in _DECODER_HEADS:
        cfg["decoder_num_heads"] = _DECODER_HEADS[ddim]
    if "vqgan.quantize.embedding.weight" in sd:
        n_embed, e_dim = sd["vqgan.quantize.embedding.weight"].shape
        ch = sd["vqgan.encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[3]) for k in sd if k.startswith("vqgan.encoder.down.")})
        ch_mult = tuple(sd[f"vqgan.encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        nrb = len({k.split(".")[5] for k in sd if k.startswith("vqgan.encoder.down.0.block.")})
        z = sd["vqgan.encoder.conv_out.weight"].shape[0]
        cfg["vqgan_config"] = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=nrb, z_channels=z, embed_dim=e_dim,
                                   n_embed=int(n_embed))
        if sd["vqgan.encoder.conv_in.weight"].shape[1] == 1:  # a grayscale VQGAN (one channel inside)
            cfg["vqgan_config"]["grayscale"] = True
        grid = int(round((sd["token_emb.position_embeddings.weight"].shape[0] - 1) ** 0.5))
        cfg["img_size"] = grid * 2 ** (len(ch_mult) - 1)
    patch = sd.get("patch_embed.proj.weight")
    if patch is not None:
        cfg["patch_size"] = patch.shape[-1]
    return cfg


# Tokenizer architectures a tokenizer export names in 'arch'.
# ---------------------------------------------------------------------------------------- tokenizers
TOKENIZER_ARCHS = ("vqgan", "vit_vqgan")


def tokenizer_export(src, img_size=None, map_location="cpu") -> dict:
    """Normalise any file that holds a tokenizer to the export layout
    ``{'state_dict': sd, 'config': constructor kwargs, 'arch': 'vqgan' | 'vit_vqgan'}``.

    Accepts a ``train/train_tokenizer.py`` export of either architecture (VQGAN exports written
    before ``arch`` existed have none and mean ``'vqgan'``), the official VQGAN checkpoint (a bare
    or wrapped state dict), a MAGE checkpoint (its ``vqgan.*`` weights and ``config['vqgan_config']``)
    or a ``train/train_vim.py`` export (its ``tokenizer``), as a path or an already loaded dict.
    For a VQGAN the image size (``img_size``, else a saved ``resolution``) is kept in the config as
    ``resolution``. Raises :class:`CheckpointError` naming what the file holds otherwise.
    """
    name = src if isinstance(src, (str, os.PathLike)) else "the checkpoint"
    raw = read_checkpoint(src, map_location)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{name}: expected a dict checkpoint, got {type(raw).__name__}")
    if isinstance(raw.get("tokenizer"), Mapping) and "model" in raw:  # a VIM export
        raw = raw["tokenizer"]
    cfg = dict(raw["config"]) if isinstance(raw.get("config"), Mapping) else {}
    arch = raw.get("arch", "vqgan")
    if arch not in TOKENIZER_ARCHS:
        raise CheckpointError(f"{name}: unknown tokenizer arch {arch!r} (known: {', '.join(TOKENIZER_ARCHS)})")
    try:
        sd = read_state_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{name} is not a tokenizer checkpoint: {e}") from e
    if any(k.startswith("vqgan.") for k in sd):  # a full MAGE checkpoint: take its tokenizer
        sd = {k[len("vqgan."):]: v for k, v in sd.items() if k.startswith("vqgan.")}
        cfg = dict(cfg.get("vqgan_config", {}))
        arch = "vqgan"
    elif "quant_proj.weight" in sd and arch != "vit_vqgan":
        raise CheckpointError(f"{name} holds {describe_state_dict(sd)} without its 'arch'/'config'; it cannot be "
                              f"rebuilt (export it with train/train_tokenizer.py --arch vit)")
    if "quantize.embedding.weight" not in sd or any(k.startswith(("tok_emb.", "token_emb.")) for k in sd):
        raise CheckpointError(f"{name} is not a tokenizer checkpoint: it holds {describe_state_dict(sd)}")
    if arch == "vit_vqgan":
        if not cfg:
            raise CheckpointError(f"{name}: a ViT-VQGAN export needs its 'config'")
        if img_size is not None and img_size != cfg.get("img_size"):
            raise CheckpointError(f"{name}: the ViT-VQGAN was built for {cfg.get('img_size')}px images, "
                                  f"{img_size} asked for")
    else:
        for k in ("in_channels", "out_ch"):
            cfg.pop(k, None)
        if img_size is not None:
            cfg["resolution"] = img_size
    return {"state_dict": dict(sd), "config": cfg, "arch": arch}


def tokenizer_checksum(vq: nn.Module) -> float:
    """The codebook fingerprint token caches record (sum of the raw codebook in float64)."""
    return float(vq.quantize.embedding.weight.double().sum())


def read_model_card(ckpt) -> dict:
    """The model card ``<ckpt without extension>.json`` beside a checkpoint ({} when there is none):
    ``classes`` (names, label order), ``class_conditional``, ``sampling`` defaults."""
    card = os.path.splitext(os.fspath(ckpt))[0] + ".json"
    if not os.path.isfile(card):
        return {}
    return check_model_card(read_json_object(card, "the model card", CheckpointError), card, CheckpointError)
