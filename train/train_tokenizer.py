"""Train a tokenizer with DeepSpeed (CPU/gloo or GPU/nccl): the MaskGIT-architecture VQGAN
(``--arch vqgan``, the default) or the ViT-VQGAN of VIM (``--arch vit``).

    deepspeed train/train_tokenizer.py --data_path data/fmnist/train --img_size 32 \
        --ch 32 --ch_mult 1,2,2 --num_res_blocks 1 --z_channels 32 --n_embed 512 \
        --batch_size 64 --epochs 3 --lr 2e-4 --output_dir out/tok --export out/tok/tokenizer.pt

    deepspeed train/train_tokenizer.py --arch vit --data_path data/fmnist/train --img_size 28 \
        --patch_size 4 --embed_dim 96 --depth 2 --num_heads 4 --decoder_depth 2 --code_dim 8 \
        --n_embed 256 --batch_size 64 --epochs 3 --lr 2e-4 --output_dir out/vit_tok --export out/vit_tok/tokenizer.pt

Losses: L2 (+ optional L1) reconstruction, the quantizer's codebook and commitment terms
(``vit_vqgan_loss``), an optional patch-GAN hinge loss (``--disc_weight``, from ``--disc_start``).
Codebook usage and perplexity are logged; codes unused for ``--restart_every`` steps are
restarted on encoder outputs (for the ViT-VQGAN's cosine quantizer: on the l2-normalised projected
encoder outputs). The VQGAN export ``{'state_dict': sd, 'config': vqgan_config, 'arch': 'vqgan'}``
loads with ``MAGE(vqgan_ckpt_path=...)`` / ``train/pretrain.py --tokenizer``; the ViT-VQGAN export
``{'state_dict': sd, 'config': ViTVQGAN kwargs, 'arch': 'vit_vqgan'}`` with
``mage_fast.models.checkpoint.build_tokenizer`` (which rebuilds either) and ``train/train_vim.py``.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mage_fast.data import EpochLoader, LoaderSpec  # noqa: E402
from mage_fast.models.checkpoint import load_state_dict_strict, tokenizer_export  # noqa: E402
from mage_fast.models.vit_vqgan import ViTVQGAN  # noqa: E402
from mage_fast.models.vqgan import VQModel  # noqa: E402
from mage_fast.training import engine as eng  # noqa: E402
from mage_fast.training.common import (add_common_args, build_engine, check_common_args,  # noqa: E402
                                       schedule_lengths, start_run)
from mage_fast.training.loop import LoopConfig, TrainLoop  # noqa: E402
from mage_fast.training.tokenizer import PatchDiscriminator, VQGANObjective  # noqa: E402


def parse_args(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    add_common_args(ap)
    g = ap.add_argument_group("tokenizer")
    g.add_argument("--arch", default="vqgan", choices=["vqgan", "vit"], help="MaskGIT VQGAN or ViT-VQGAN")
    g.add_argument("--ch", type=int, default=128, help="base width (a multiple of 32: GroupNorm(32))")
    g.add_argument("--ch_mult", default="1,1,2,2,4", help="width multipliers; downsampling 2**(len-1)")
    g.add_argument("--num_res_blocks", type=int, default=2)
    g.add_argument("--z_channels", type=int, default=256, help="latent and code dim")
    g.add_argument("--n_embed", type=int, default=1024, help="codebook size")
    g.add_argument("--grayscale", action="store_true",
                   help="VQGAN only: one channel inside (encoder reads the channel mean, decoder paints one "
                        "channel repeated to 3), so outputs cannot drift in colour")
    g = ap.add_argument_group("ViT-VQGAN (--arch vit)")
    g.add_argument("--patch_size", type=int, default=8, help="patch side = downsampling factor")
    g.add_argument("--embed_dim", type=int, default=256, help="encoder width")
    g.add_argument("--depth", type=int, default=4, help="encoder blocks")
    g.add_argument("--num_heads", type=int, default=4, help="encoder heads")
    g.add_argument("--decoder_embed_dim", type=int, default=None, help="decoder width (default: --embed_dim)")
    g.add_argument("--decoder_depth", type=int, default=None, help="decoder blocks (default: --depth)")
    g.add_argument("--decoder_num_heads", type=int, default=None, help="decoder heads (default: --num_heads)")
    g.add_argument("--mlp_ratio", type=float, default=4.0)
    g.add_argument("--code_dim", type=int, default=32, help="factorised code dimension (paper: 8 or 32)")
    g = ap.add_argument_group("training")
    g.add_argument("--lr", type=float, default=1e-4, help="absolute learning rate")
    g.add_argument("--betas", default="0.5,0.9")
    g.add_argument("--l1_weight", type=float, default=0.0)
    g.add_argument("--codebook_weight", type=float, default=1.0)
    g.add_argument("--disc_weight", type=float, default=0.0, help="patch-GAN weight (0: no discriminator)")
    g.add_argument("--disc_start", type=int, default=0, help="step the adversarial loss starts")
    g.add_argument("--disc_lr", type=float, default=1e-4)
    g.add_argument("--restart_every", type=int, default=200, help="dead-code restart interval in steps (0: off)")
    g.add_argument("--init_from", default=None, help="start from a tokenizer checkpoint")
    args = ap.parse_args(argv)
    check_common_args(ap, args)
    try:
        args.ch_mult = tuple(int(c) for c in args.ch_mult.split(","))
        args.betas = tuple(float(b) for b in args.betas.split(","))
    except ValueError:
        ap.error("--ch_mult and --betas are comma-separated numbers")
    if args.arch == "vqgan":
        if args.ch % 32:
            ap.error(f"--ch must be a multiple of 32 (GroupNorm with 32 groups), got {args.ch}")
        if args.img_size % 2 ** (len(args.ch_mult) - 1):
            ap.error(f"--img_size {args.img_size} is not a multiple of the downsampling "
                     f"{2 ** (len(args.ch_mult) - 1)}")
    else:
        if args.grayscale:
            ap.error("--grayscale is a VQGAN option (--arch vqgan)")
        if args.patch_size < 1 or args.img_size % args.patch_size:
            ap.error(f"--img_size {args.img_size} is not a multiple of --patch_size {args.patch_size}")
        for w, h in ((args.embed_dim, args.num_heads), (args.decoder_embed_dim or args.embed_dim,
                                                         args.decoder_num_heads or args.num_heads)):
            if w % h:
                ap.error(f"a width of {w} does not split into {h} heads")
    return args


def build_tokenizer_model(args):
    """-> (model, JSON-able config, arch name for the export)."""
    if args.arch == "vit":
        cfg = dict(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                   num_heads=args.num_heads, mlp_ratio=args.mlp_ratio, decoder_embed_dim=args.decoder_embed_dim,
                   decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
                   n_embed=args.n_embed, code_dim=args.code_dim)
        vq = ViTVQGAN(**cfg)
        cfg = dict(vq.config)  # the defaults filled in
        if args.init_from:
            load_state_dict_strict(vq, tokenizer_export(args.init_from, args.img_size)["state_dict"])
        return vq, cfg, "vit_vqgan"
    cfg = dict(ch=args.ch, ch_mult=list(args.ch_mult), num_res_blocks=args.num_res_blocks, z_channels=args.z_channels,
               embed_dim=args.z_channels, n_embed=args.n_embed)
    if args.grayscale:
        cfg["grayscale"] = True
    return VQModel(**cfg, resolution=args.img_size, ckpt_path=args.init_from), cfg, "vqgan"


def fresh_tokenizer(cfg: dict, arch: str, img_size: int):
    return ViTVQGAN(**cfg) if arch == "vit_vqgan" else VQModel(**cfg, resolution=img_size)


def main(argv=None):
    args = parse_args(argv)
    deepspeed, rank, world, dev = start_run(args)

    vq, vq_cfg, arch = build_tokenizer_model(args)
    vq.check_input_range = False  # the loaders produce [0, 1]; the check would sync every step
    objective = VQGANObjective(vq, l1_weight=args.l1_weight, codebook_weight=args.codebook_weight)

    spec = LoaderSpec(source="synthetic" if args.synthetic else "folder", path=args.data_path,
                      img_size=args.img_size, batch_size=args.batch_size, crop_scale=(args.crop_scale_min, 1.0),
                      num_workers=args.num_workers, seed=args.seed, synthetic_length=args.synthetic_length,
                      backend=args.data_backend)
    loader = EpochLoader(spec, rank, world)
    total, warmup, per_epoch = schedule_lengths(args, loader.batches_per_epoch)
    engine, opt, cfg = build_engine(deepspeed, objective, args, world, args.lr, args.betas)
    if rank == 0:
        n = sum(p.numel() for p in vq.parameters())
        print(f"tokenizer {arch} {vq_cfg} ({n / 1e6:.2f} M params), {args.img_size}px -> "
              f"{args.img_size // vq.downsample}^2 tokens; data: {loader.description}; "
              f"{total} steps ({per_epoch}/epoch), world {world}, ZeRO {eng.zero_stage(cfg)}, {args.precision}",
              flush=True)

    disc = disc_opt = None
    if args.disc_weight > 0:
        disc = PatchDiscriminator().to(dev)
        for p in disc.parameters():  # identical start on every rank
            if world > 1:
                dist.broadcast(p.data, src=0)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)

    pending = {}

    def step_fn(batch, step):
        imgs = batch[0].to(dev, non_blocking=True)
        use_adv = disc is not None and step >= args.disc_start
        if use_adv:
            disc.requires_grad_(False)
        loss, stats, rec = engine(imgs, adversary=disc if use_adv else None, adv_weight=args.disc_weight)
        if use_adv:
            pending.update(real=imgs, fake=rec)
        return loss, stats

    def disc_step(step):
        """After the generator's backward: one hinge-loss step of the discriminator, gradients
        averaged over ranks by hand (it is a plain module beside the DeepSpeed engine)."""
        if not pending:
            return None
        real, fake = pending.pop("real"), pending.pop("fake")
        disc.requires_grad_(True)
        d_loss = F.relu(1 - disc(real.float())).mean() + F.relu(1 + disc(fake.float())).mean()
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        if world > 1:
            for p in disc.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        disc_opt.step()
        return {"d_loss": d_loss.detach()}

    def on_boundary(step):
        if args.restart_every and step % args.restart_every == 0:
            rep = objective.codebook_report()
            restarted = objective.restart_dead_codes(rep.pop("_usage"))
            return {"codes_used": rep["codes_used"], "perplexity": rep["perplexity"], "codes_restarted": restarted}
        return None

    def get_extra():
        return {} if disc is None else {"disc": disc.state_dict(), "disc_opt": disc_opt.state_dict()}

    def set_extra(extra):
        if disc is not None and "disc" in extra:
            disc.load_state_dict(extra["disc"])
            disc_opt.load_state_dict(extra["disc_opt"])

    loop = TrainLoop(LoopConfig(total_steps=total, base_lr=args.lr, warmup_steps=warmup, min_lr=args.min_lr,
                                grad_accum=args.accum_iter, log_every=args.log_every, save_every=args.save_every,
                                keep_last=args.keep_last, output_dir=args.output_dir, resume=args.resume,
                                simulate_crash_at_step=args.simulate_crash_at_step,
                                progress=not args.no_progress, desc="tokenizer",
                                autocast_bf16=args.precision == "bf16-autocast"),
                     engine, opt, loader, step_fn, on_boundary=on_boundary, get_extra=get_extra, set_extra=set_extra,
                     after_micro_step=disc_step)
    loop.maybe_resume()
    tag = loop.run()
    if args.export:
        sd = eng.full_state_dict(engine, loop.ckpt_dir, tag)
        if rank == 0:
            sd = {k[len("vq."):]: v for k, v in sd.items() if k.startswith("vq.")}
            load_state_dict_strict(fresh_tokenizer(vq_cfg, arch, args.img_size), sd)
            from mage_fast.runs import atomic_path
            with atomic_path(args.export) as tmp:  # never half an export (a kill, a full disk)
                torch.save({"state_dict": sd, "config": vq_cfg, "arch": arch}, tmp)
            print(f"exported tokenizer to {args.export}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
