"""MAGE (Masked Generative Encoder): a drop-in for the official ``models_mage``.

Same constructor, parameter names, state-dict keys and numbers as the official
``MaskedGenerativeEncoderViT``; the reference arithmetic is plain PyTorch, and the hot spots
(attention, token drop/restore, codebook lookup, loss) go through :mod:`mage_fast.ops` so faster
backends plug in behind the same module.
"""
from __future__ import annotations

import contextlib
import math
import os
from functools import partial
from typing import Mapping, Optional

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ..modules.embeddings import BertEmbeddings, MlmLayer, fast_norm_layer
from ..modules.transformer import Block, init_linear_and_layernorm
from ..ops.mlm_loss import masked_ce
from ..ops.token_drop import keep_index, scatter_tokens
from .checks import InputError, check_images, check_token_ids
from .state_dict import (CheckpointError, check_saved_config, describe_state_dict, infer_config, load_state_dict_strict,
                         read_checkpoint, read_model_card, read_state_dict)
from .vqgan import OFFICIAL_VQGAN_CONFIG, VQModel

NUM_LEGACY_CLASSES = 1000
DROPOUT = 0.1


class _PatchEmbed(nn.Module):
    """Kept for checkpoint compatibility: the official model has it, forward never uses it."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """(1 + grid*grid, dim) fixed 2-D sin-cos embedding with a zero row for the class slot."""
    gh, gw = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="xy")
    emb = torch.cat([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], 0).float()


def encode_kept(net, full: torch.Tensor, drop: torch.Tensor, num_keep: int, run_blocks=None):
    """The token-dropping encoder, for training and for the decoding modes alike.

    full: (B, L+1) ids (class slot at 0, masked = mask id); drop: (B, L+1) bool, True = dropped
    (never the class slot); num_keep = L+1 - dropped per row. Dropped tokens are removed before the
    embedding (the rows the official code keeps after embedding everything), so the result is the
    official ``forward_encoder`` latent for the same ``token_drop_mask``. ``net``: a MAGE, or any
    module with its ``token_emb``, ``blocks`` and ``norm`` (a decoding mode's weight copy);
    ``run_blocks(blocks, x) -> x`` runs the blocks (default: one after another).
    Returns (latent (B, num_keep, D) after the final norm, keep (B, num_keep) positions)."""
    keep = keep_index(drop, num_keep)  # (B, K)
    x = net.token_emb(torch.gather(full, 1, keep), positions=keep)
    if run_blocks is None:
        for blk in net.blocks:
            x = blk(x)
    else:
        x = run_blocks(net.blocks, x)
    return net.norm(x), keep


class NoRandomInit(TorchFunctionMode):
    """Modules built inside skip the random fills of their weights' initialisation (``nn.init``'s
    uniform, normal and Kaiming/Xavier draws): the weights keep the memory they were allocated with
    and the global RNG is not advanced. Only for a model a strict checkpoint load fills next."""

    SKIP = frozenset({torch.Tensor.uniform_, torch.Tensor.normal_, nn.init.uniform_, nn.init.normal_,
                      nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
                      nn.init.xavier_uniform_, nn.init.xavier_normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIP:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


class MAGE(nn.Module):
    """Masked Generative Encoder with its VQGAN tokenizer.

    Args (the official constructor's, same defaults):
        img_size, patch_size, in_chans: image geometry (``patch_embed`` is kept only for keys).
        embed_dim, depth, num_heads: encoder width, depth, heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder.
        mlp_ratio, norm_layer: block MLP ratio and norm (the factories use LayerNorm eps 1e-6).
        norm_pix_loss: accepted for compatibility; MAGE's loss is over tokens.
        mask_ratio_min, mask_ratio_max, mask_ratio_mu, mask_ratio_std: the truncated normal the
            training mask ratio is drawn from; ``ceil(L * mask_ratio_min)`` tokens are dropped.
        vqgan_ckpt_path: tokenizer checkpoint loaded at construction; ``None`` builds without.
        vqgan_config: tokenizer sizes with the official names (``ch``, ``ch_mult``,
            ``num_res_blocks``, ``z_channels``, ``embed_dim``, ``n_embed``); default the official.
        tokenizer: a ready tokenizer module with the ``VQModel`` interface (e.g. a ViT-VQGAN) used
            instead of building the MaskGIT VQGAN; it is stored as ``vqgan`` and frozen.
        dropout: residual, attention and embedding dropout in training (the official fixes 0.1;
            not part of the official constructor, no effect in eval mode or on the weights' keys).
        init_weights: ``False`` leaves the weights as allocated (whatever the memory held) instead
            of drawing their initial values: only for a model whose every weight a strict
            checkpoint load replaces next, as :meth:`from_pretrained` does. It skips the random
            initialisation, most of the time it takes to build a ViT-B, and leaves the global RNG
            untouched. A tokenizer loaded from ``vqgan_ckpt_path`` or given as ``tokenizer`` keeps
            its weights.

    Example:
        >>> m = MAGE(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
        ...          decoder_num_heads=2, vqgan_ckpt_path=None,
        ...          vqgan_config=dict(ch=32, num_res_blocks=1, z_channels=32, embed_dim=32))
        >>> loss, imgs, mask = m(torch.rand(2, 3, 256, 256))
    """

    def __init__(self, img_size: int = 256, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_layer=nn.LayerNorm,
                 norm_pix_loss: bool = False, mask_ratio_min: float = 0.5, mask_ratio_max: float = 1.0,
                 mask_ratio_mu: float = 0.55, mask_ratio_std: float = 0.25,
                 vqgan_ckpt_path: Optional[str] = "vqgan_jax_strongaug.ckpt", vqgan_config: Optional[dict] = None,
                 tokenizer: Optional[nn.Module] = None, dropout: float = DROPOUT, init_weights: bool = True):
        super().__init__()
        with contextlib.nullcontext() if init_weights else NoRandomInit():
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"dropout must be in [0, 1), got {dropout}")
            norm_layer = fast_norm_layer(norm_layer)  # same parameters and keys, dispatched computation
            if tokenizer is not None:
                for attr in ("encode", "decode", "quantize", "n_embed", "downsample"):
                    if not hasattr(tokenizer, attr):
                        raise TypeError(f"tokenizer lacks {attr!r}: it must offer the VQModel interface (encode, "
                                        f"decode, quantize.get_codebook_entry, n_embed, downsample)")
                self.vqgan = tokenizer
            else:
                vq_cfg = dict(OFFICIAL_VQGAN_CONFIG)
                vq_cfg.update(vqgan_config or {})
                vq_cfg["resolution"] = img_size
                self.vqgan = VQModel(**vq_cfg, ckpt_path=vqgan_ckpt_path)
            for p in self.vqgan.parameters():
                p.requires_grad = False

            self.img_size = img_size
            self.token_grid = img_size // self.vqgan.downsample
            self.seq_len = self.token_grid ** 2  # image tokens; the sequence has one more (class slot)
            self.codebook_size = self.vqgan.n_embed
            vocab_size = self.codebook_size + NUM_LEGACY_CLASSES + 1
            self.fake_class_label = self.codebook_size + 1100 - 1024
            self.mask_token_label = vocab_size - 1
            self.token_emb = BertEmbeddings(vocab_size, embed_dim, self.seq_len + 1, dropout=dropout)

            if not 0.0 <= mask_ratio_min <= mask_ratio_max <= 1.0:
                raise ValueError(f"need 0 <= mask_ratio_min <= mask_ratio_max <= 1, got {mask_ratio_min}, "
                                 f"{mask_ratio_max}")
            self.mask_ratio_min, self.mask_ratio_max = mask_ratio_min, mask_ratio_max
            self.mask_ratio_mu, self.mask_ratio_std = mask_ratio_mu, mask_ratio_std

            self.patch_embed = _PatchEmbed(img_size, patch_size, in_chans, embed_dim)
            n_pos = self.patch_embed.num_patches + 1
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim), requires_grad=False)
            self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                                               drop=dropout, attn_drop=dropout) for _ in range(depth)])
            self.norm = norm_layer(embed_dim)

            self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
            self.pad_with_cls_token = True
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_pos, decoder_embed_dim), requires_grad=False)
            self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + 1, decoder_embed_dim))
            self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                       norm_layer=norm_layer, drop=dropout, attn_drop=dropout)
                                                 for _ in range(decoder_depth)])
            self.decoder_norm = norm_layer(decoder_embed_dim)
            self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
            self.mlm_layer = MlmLayer(decoder_embed_dim, embed_dim, vocab_size)
            self.norm_pix_loss = norm_pix_loss
            self.label_smoothing = 0.1
            # Class-conditional training (MaskGIT style): with labels, the class token replaces the fake
            # class token, and is dropped back to it with this probability so one model does both.
            self.class_dropout_prob = 0.1
            # Recompute transformer blocks in the backward pass (training memory for compute).
            self.activation_checkpointing = False
        if init_weights:
            self.initialize_weights()

    @property
    def check_input_range(self) -> bool:
        """Whether images are checked to lie in [0, 1]. The check costs a host sync; a trainer may
        turn it off after the first batch."""
        return self.vqgan.check_input_range

    @check_input_range.setter
    def check_input_range(self, value: bool) -> None:
        self.vqgan.check_input_range = bool(value)

    # ------------------------------------------------------------------ init
    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches ** 0.5)
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], grid).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.decoder_pos_embed_learned, std=0.02)
        init_linear_and_layernorm(self, skip_prefix="vqgan")

    # ------------------------------------------------------------------ tokens
    @torch.no_grad()
    def tokenize(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> code ids (B, L) int64, row-major."""
        check_images(imgs, self.img_size, check_range=False)  # vqgan.encode checks the range
        w = next(self.vqgan.parameters())
        if imgs.dtype != w.dtype:  # float64 / float16 inputs: the tokenizer computes in its own dtype
            imgs = imgs.to(w.dtype)
        _, _, (_, _, idx) = self.vqgan.encode(imgs)
        return idx.view(imgs.shape[0], -1).long()

    def decode_tokens(self, ids: torch.Tensor, chunk: Optional[int] = None, tokenizer=None) -> torch.Tensor:
        """Code ids (B, L) -> images (B, 3, S, S): the tokenizer's decode (not clamped, as the
        official sampler), ``chunk`` images per call (None: all at once). ``chunk=1`` makes each
        image's pixels independent of the batch it was drawn in (convolutions round differently at
        other batch sizes). ``tokenizer``: another copy of :attr:`vqgan` (e.g. a decoding mode's
        channels-last or bf16 one); its input follows its dtype and layout, the images come back
        fp32."""
        if chunk is not None and chunk < ids.shape[0]:
            return torch.cat([self.decode_tokens(part, tokenizer=tokenizer) for part in ids.split(chunk)])
        g = self.token_grid
        vq = self.vqgan if tokenizer is None else tokenizer
        z_q = vq.quantize.get_codebook_entry(ids, shape=(ids.shape[0], g, g, vq.quantize.e_dim))
        if tokenizer is None:
            return self.vqgan.decode(z_q)
        w = next(tokenizer.parameters())
        return tokenizer.decode(z_q.to(w.dtype).contiguous(memory_format=torch.channels_last)).float().contiguous()

    def sample_masks(self, bsz: int, device, generator: Optional[torch.Generator] = None):
        """Training masks without host syncs: one ratio per batch from the truncated normal, then
        per-sample uniform noise; the ``ceil(L * mask_ratio_min)`` smallest are dropped and the
        ``ceil(L * ratio)`` smallest masked. Returns (drop, all) as (B, L) bool."""
        L = self.seq_len
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
        a = normal.cdf(torch.tensor((self.mask_ratio_min - self.mask_ratio_mu) / self.mask_ratio_std))
        b = normal.cdf(torch.tensor((self.mask_ratio_max - self.mask_ratio_mu) / self.mask_ratio_std))
        u = torch.rand((), dtype=torch.float64, device=device, generator=generator)
        ratio = self.mask_ratio_mu + self.mask_ratio_std * torch.special.ndtri(a.to(device) + u * (b - a).to(device))
        num_masked = torch.ceil(L * ratio.clamp(self.mask_ratio_min, self.mask_ratio_max))
        num_dropped = math.ceil(L * self.mask_ratio_min)
        noise = torch.rand(bsz, L, device=device, generator=generator)
        rank = noise.argsort(dim=1).argsort(dim=1)
        return rank < num_dropped, rank < num_masked

    def _with_class_slot(self, t: torch.Tensor, value) -> torch.Tensor:
        """Prepend the class slot: ``value`` is an id or a (B,) tensor of ids."""
        if isinstance(value, torch.Tensor):
            return torch.cat([value.to(t.dtype).view(-1, 1), t], dim=1)
        return torch.cat([torch.full_like(t[:, :1], value), t], dim=1)

    @property
    def num_classes_max(self) -> int:
        """Class labels that fit the vocabulary's legacy class range beside the fake class id."""
        return NUM_LEGACY_CLASSES - 1

    @property
    def num_classes(self) -> Optional[int]:
        """How many classes the model was trained with, when known (``from_pretrained`` reads it
        from the model card or the checkpoint's config); ``None``: any label below
        :attr:`num_classes_max` is accepted."""
        return getattr(self, "_num_classes", None)

    @num_classes.setter
    def num_classes(self, value: Optional[int]) -> None:
        if value is not None and not 1 <= int(value) <= self.num_classes_max:
            raise InputError(f"num_classes must be in [1, {self.num_classes_max}], got {value}")
        self._num_classes = None if value is None else int(value)

    def class_token_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels (B,) in [0, num_classes) -> vocabulary ids in the legacy class range,
        skipping the fake class id (1100) that unconditional MAGE uses."""
        n = self.num_classes
        what = f"class labels of this {n}-class model" if n else "class labels"
        check_token_ids(labels, n or self.num_classes_max, what)
        ids = self.codebook_size + labels.long()
        return ids + (ids >= self.fake_class_label).long()

    def _class_slot(self, labels: Optional[torch.Tensor], bsz: int, device) -> torch.Tensor | int:
        if labels is None:
            return self.fake_class_label
        ids = self.class_token_ids(labels.to(device))
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(bsz, device=device) < self.class_dropout_prob
            ids = torch.where(drop, self.fake_class_label, ids)
        return ids

    # ------------------------------------------------------------------ official API
    def forward_encoder(self, x: torch.Tensor, token_drop_mask: Optional[torch.Tensor] = None,
                        token_all_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        """Images -> (latent (B, K, D), gt_indices (B, L), token_drop_mask, token_all_mask).

        Masks are (B, L+1) float with the class slot at 0, as the official ones. Pass both masks
        (either (B, L) or (B, L+1)) to use given masks instead of drawing them. ``labels`` (B,)
        makes the step class-conditional (see ``class_dropout_prob``).
        """
        gt_indices = self.tokenize(x)
        h, drop, allm = self.encode_masked(gt_indices, token_drop_mask, token_all_mask, labels)
        return h, gt_indices, drop.float(), allm.float()

    def _run_blocks(self, blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h)
        return h

    def encode_masked(self, gt_indices: torch.Tensor, token_drop_mask: Optional[torch.Tensor] = None,
                      token_all_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        """Code ids (B, L) -> (latent (B, K, D), drop (B, L+1) bool, all (B, L+1) bool): the masked
        encoder pass, drawing masks unless both are given. Dropped tokens are removed before the
        embedding (the same rows the official code keeps after embedding everything)."""
        B, L = gt_indices.shape
        if token_drop_mask is None or token_all_mask is None:
            drop, allm = self.sample_masks(B, gt_indices.device)
        else:
            drop, allm = (m[:, -L:].bool() for m in (token_drop_mask, token_all_mask))
            if not bool((drop <= allm).all()):
                raise ValueError("every dropped token must also be masked (token_drop_mask <= token_all_mask)")
        ids = torch.where(allm, self.mask_token_label, gt_indices)
        ids = self._with_class_slot(ids, self._class_slot(labels, B, gt_indices.device))
        drop = self._with_class_slot(drop, False)
        allm = self._with_class_slot(allm, False)
        num_keep = ids.shape[1] - (math.ceil(L * self.mask_ratio_min) if token_drop_mask is None
                                   else int(drop[0].sum()))
        return encode_kept(self, ids, drop, num_keep, self._run_blocks)[0], drop, allm

    def training_loss(self, gt_indices: torch.Tensor, token_drop_mask: Optional[torch.Tensor] = None,
                      token_all_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        """The official training loss from code ids (B, L) (e.g. a token cache): returns
        (loss, latent (B, K, D), token_all_mask (B, L+1) float). The MLM head and the loss are fused
        (:func:`mage_fast.ops.mlm_head_loss`): only the code logits at image positions exist."""
        h, drop, allm = self.encode_masked(gt_indices, token_drop_mask, token_all_mask, labels)
        x = self.decoder_hidden(h, drop, allm)[:, 1:]
        loss = self.mlm_layer.loss(x, self.token_emb.word_embeddings.weight.detach(), gt_indices, allm[:, 1:],
                                   self.codebook_size, self.label_smoothing)
        return loss, h, allm.float()

    def forward_decoder(self, x: torch.Tensor, token_drop_mask: torch.Tensor, token_all_mask: torch.Tensor,
                        codes_only: bool = False) -> torch.Tensor:
        """Encoder output (B, K, D) -> logits (B, L+1, vocab), or (B, L, codebook) with ``codes_only``."""
        x = self.decoder_hidden(x, token_drop_mask, token_all_mask)
        word_embeddings = self.token_emb.word_embeddings.weight.detach()
        if codes_only:
            return self.mlm_layer(x[:, 1:], word_embeddings, num_outputs=self.codebook_size)
        return self.mlm_layer(x, word_embeddings)

    def decoder_hidden(self, x: torch.Tensor, token_drop_mask: Optional[torch.Tensor],
                       token_all_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, K, D) -> normalised decoder features (B, L+1, Dd), before the MLM head."""
        x = self.decoder_embed(x)  # (B, K, Dd)
        allm = token_all_mask.bool()
        if x.shape[1] == allm.shape[1]:  # nothing dropped (generation)
            x = torch.where(allm.unsqueeze(-1), x[:, :1], x) + self.decoder_pos_embed_learned
        else:
            keep = keep_index(token_drop_mask, x.shape[1])
            x = scatter_tokens(x, keep, allm, self.decoder_pos_embed_learned)
        return self.decoder_norm(self._run_blocks(self.decoder_blocks, x))

    def forward_loss(self, gt_indices: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Label-smoothed (0.1) cross entropy over the code logits, averaged over masked positions."""
        return masked_ce(logits[:, 1:, : self.codebook_size], gt_indices, mask[:, 1:], self.label_smoothing)

    def forward(self, imgs: torch.Tensor, token_drop_mask: Optional[torch.Tensor] = None,
                token_all_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        """Training forward: returns ``(loss, imgs, token_all_mask)`` as the official model.

        The loss is the official ``forward_loss(gt, forward_decoder(...), mask)``, computed by the
        fused head + loss op: only the code logits at image positions, never full-size logits."""
        loss, _, allm = self.training_loss(self.tokenize(imgs), token_drop_mask, token_all_mask, labels)
        return loss, imgs, allm

    # ------------------------------------------------------------------ inference helpers
    def encode_ids(self, ids: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Full sequences (B, L+1) of token ids, no dropping -> encoder output (B, L+1, D)."""
        h = self.token_emb(ids)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h) if final_norm else h

    def check_decoding_ids(self, ids: torch.Tensor) -> None:
        """(B, L) ids of a decoding state: integer, L = :attr:`seq_len`, each a code id in
        [0, codebook_size) or the mask id. One host sync."""
        if not isinstance(ids, torch.Tensor) or ids.dtype in (torch.bool,) or ids.is_floating_point() \
                or ids.is_complex():
            raise InputError(f"ids must be an integer tensor (B, {self.seq_len}), got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 2 or ids.shape[1] != self.seq_len:
            raise InputError(f"ids must have shape (B, {self.seq_len}), got {tuple(ids.shape)}")
        bad = (ids < 0) | ((ids >= self.codebook_size) & (ids != self.mask_token_label))
        if ids.numel() and bool(bad.any()):
            v = int(ids[bad].flatten()[0])
            raise InputError(f"ids must be code ids in [0, {self.codebook_size}) or the mask id "
                             f"{self.mask_token_label}; got {v}")

    def code_logits(self, ids: torch.Tensor, class_tokens: Optional[torch.Tensor] = None, *,
                    check: bool = True) -> torch.Tensor:
        """One decoding step's network pass. ids: (B, L) image ids with ``mask_token_label`` where
        unknown -> (B, L, codebook_size) logits (only the columns and rows sampling reads).
        ``class_tokens`` (B,) vocabulary ids for the class slot (default: the fake class).
        ``check=False`` skips the id check (one host sync): the sampler's own states need none."""
        if check:
            self.check_decoding_ids(ids)
        full = self._with_class_slot(ids, self.fake_class_label if class_tokens is None else class_tokens)
        return self.forward_decoder(self.encode_ids(full), None, full == self.mask_token_label, codes_only=True)

    def forward_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full sequences (B, L+1) -> (encoder output, logits (B, L+1, vocab)), no dropping."""
        check_token_ids(ids, self.mask_token_label + 1)
        enc = self.encode_ids(ids)
        allm = ids == self.mask_token_label
        return enc, self.forward_decoder(enc, torch.zeros_like(allm), allm)

    @torch.no_grad()
    def probe_features(self, imgs: torch.Tensor, fc_norm: Optional[nn.Module] = None) -> torch.Tensor:
        """Official linear-probe features: all tokens, no mask, no final norm, mean over the image
        tokens, then ``fc_norm`` (default: a fresh LayerNorm, eps 1e-6, i.e. identity affine)."""
        ids = self._with_class_slot(self.tokenize(imgs), self.fake_class_label)
        h = self.encode_ids(ids, final_norm=False)[:, 1:].mean(dim=1)
        if fc_norm is None:
            return nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)
        return fc_norm(h)

    @classmethod
    def from_pretrained(cls, path: str, map_location="cpu", **overrides) -> "MAGE":
        """Build the model a checkpoint holds (ViT-B, ViT-L or a custom size), load it strictly, and
        return it in eval mode (call ``.train()`` to fine-tune). A model card ``<path>.json`` beside
        the file, when present, gives :attr:`num_classes` and ``class_names``. The model is built
        without drawing initial weights (``init_weights=False``): the strict load replaces them all.
        A ``config`` dict saved beside the weights (mage_fast's own checkpoints) gives the
        constructor arguments; otherwise they are inferred from the tensor shapes (official ViT-B /
        ViT-L)."""
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
        cfg.setdefault("init_weights", False)
        try:
            model = cls(**cfg)
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


def mage_vit_base_patch16(**kwargs) -> MAGE:
    return MAGE(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                decoder_num_heads=16, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def mage_vit_large_patch16(**kwargs) -> MAGE:
    return MAGE(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
                decoder_num_heads=16, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


TINY_VQGAN = dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=1024)


def mage_vit_tiny(**kwargs) -> MAGE:
    """The size of the official-parity fixture (encoder 64/2/4, decoder 32/2/2, VQGAN ch 32)."""
    kwargs.setdefault("vqgan_config", TINY_VQGAN)
    kwargs.setdefault("vqgan_ckpt_path", None)
    return MAGE(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


MODEL_FACTORIES = {"vit_base": mage_vit_base_patch16, "vit_large": mage_vit_large_patch16, "tiny": mage_vit_tiny}
