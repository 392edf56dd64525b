"""Pre-train MAGE (or MAGE-C) with DeepSpeed: ZeRO 1/2/3, fp32 or bf16, CPU (gloo) or GPUs (nccl).

    deepspeed train/pretrain.py --model vit_base --data_path /data/imagenet/train \
        --tokenizer vqgan_jax_strongaug.ckpt --batch_size 64 --epochs 1600 --warmup_epochs 40 \
        --blr 1.5e-4 --deepspeed_config zero2 --precision bf16 --output_dir out/vitb --resume auto

    # a CPU smoke run, no data needed
    deepspeed --num_gpus 2 train/pretrain.py --model tiny --img_size 32 \
        --vqgan_config '{"ch_mult": [1, 2, 2]}' --synthetic --batch_size 4 --max_steps 10 --output_dir /tmp/run

The official recipe is the default: AdamW (0.9, 0.95), weight decay 0.05 off for 1-D tensors and
biases, lr = blr x total batch / 256, per-iteration warm-up then half-cycle cosine, gradient clip
3.0, the truncated-normal mask ratio and label smoothing 0.1 of ``mage_fast.MAGE``. ``--export``
writes ``{'model': state_dict, 'config': MAGE kwargs}``, which ``mage_fast.MAGE`` and the official
code load strictly (the official code ignores ``config``).
"""
import json
import os
import sys
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mage_fast.data import EpochLoader, LoaderSpec  # noqa: E402
from mage_fast.models.checkpoint import load_checkpoint, load_state_dict_strict, read_state_dict  # noqa: E402
from mage_fast.models.mage import DROPOUT, MAGE  # noqa: E402
from mage_fast.training import engine as eng  # noqa: E402
from mage_fast.models.checkpoint import (CheckpointError, load_torch_file, tokenizer_checksum,  # noqa: E402
                                         tokenizer_export)
from mage_fast.script_exit import ArgumentParser  # noqa: E402
from mage_fast.training.common import (add_common_args, add_model_args, build_engine,  # noqa: E402
                                       check_common_args, run_lr, schedule_lengths, start_run)
from mage_fast.training.common import check_token_cache as check_cache  # noqa: E402
from mage_fast.training.loop import LoopConfig, TrainLoop  # noqa: E402
from mage_fast.training.objective import MAGEObjective  # noqa: E402

TINY_VQGAN = dict(ch=32, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=1024)
OFFICIAL_VQGAN = dict(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256, embed_dim=256, n_embed=1024)
PRESETS = {  # the sizes of mage_fast.models.MODEL_FACTORIES, as constructor arguments
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                     decoder_num_heads=16),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
                      decoder_num_heads=16),
}
SIZE_KEYS = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    add_common_args(ap)
    g = add_model_args(ap, PRESETS, "vit_base")
    g.add_argument("--tokenizer", default=None, help="VQGAN checkpoint (train_tokenizer.py export or the official "
                                                     "vqgan_jax_strongaug.ckpt); its saved config sets the sizes")
    g.add_argument("--vqgan_config", default=None, help="JSON tokenizer sizes merged over the preset's")
    g.add_argument("--init_from", default=None, help="continue from a MAGE checkpoint (official {'model': sd})")
    g.add_argument("--token_cache", default=None, help="train on ids from train/cache_tokens.py")
    g.add_argument("--mask_ratio_min", type=float, default=0.5)
    g.add_argument("--mask_ratio_max", type=float, default=1.0)
    g.add_argument("--mask_ratio_mu", type=float, default=0.55)
    g.add_argument("--mask_ratio_std", type=float, default=0.25)
    g.add_argument("--dropout", type=float, default=DROPOUT,
                   help=f"residual/attention/embedding dropout (default: the official {DROPOUT}; 0 trains a small, under-fit model "
                        "faster: no random masks, which are a quarter of a CPU step)")
    g.add_argument("--activation_checkpointing", action="store_true")
    g.add_argument("--contrastive_weight", type=float, default=0.0, help="> 0: MAGE-C with this loss weight")
    g.add_argument("--temperature", type=float, default=0.2, help="MAGE-C InfoNCE temperature")
    g.add_argument("--class_cond", action="store_true",
                   help="class-conditional training (MaskGIT style): the label's token replaces the fake class "
                        "token, dropped back to it with --class_dropout_prob so one model does both")
    g.add_argument("--class_dropout_prob", type=float, default=0.1)
    g = ap.add_argument_group("learning rate")
    g.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr x total batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    args = ap.parse_args(argv)
    check_common_args(ap, args)
    if not 0.0 <= args.mask_ratio_min <= args.mask_ratio_max <= 1.0:
        ap.error(f"--mask_ratio_min / --mask_ratio_max must satisfy 0 <= min <= max <= 1, got "
                 f"{args.mask_ratio_min} and {args.mask_ratio_max}")
    if not args.mask_ratio_std > 0:
        ap.error(f"--mask_ratio_std must be > 0, got {args.mask_ratio_std}")
    if not 0.0 <= args.dropout < 1.0:
        ap.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.token_cache and (args.data_path or args.synthetic):
        ap.error("--token_cache replaces --data_path / --synthetic")
    if args.token_cache and not args.tokenizer and not args.init_from:
        ap.error("--token_cache needs --tokenizer (or --init_from): the exported model carries the tokenizer")
    return args


def model_config(args) -> dict:
    """JSON-able MAGE constructor arguments (what the export stores as 'config')."""
    cfg = dict(PRESETS[args.model])
    for k in SIZE_KEYS:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    vq = dict(TINY_VQGAN if args.model == "tiny" else OFFICIAL_VQGAN)
    if args.tokenizer:
        # any file that holds a tokenizer (an export, the official VQGAN, a MAGE checkpoint's own);
        # CheckpointError, one line naming the file, for one that is unreadable or holds none
        try:
            raw = load_torch_file(args.tokenizer)
            exp = tokenizer_export(raw)
        except CheckpointError as e:
            msg = str(e)  # a loaded dict is "the checkpoint" to tokenizer_export: name the file instead
            msg = args.tokenizer + msg[len("the checkpoint"):] if msg.startswith("the checkpoint") else msg
            raise CheckpointError(f"--tokenizer {msg}") from None
        if any(k.startswith("vqgan.") for k in read_state_dict(raw)) and os.environ.get("RANK", "0") == "0":
            print(f"note: --tokenizer {args.tokenizer} is a MAGE checkpoint; training with its tokenizer (to continue "
                  f"training the model itself, pass it as --init_from)", file=sys.stderr)
        if exp["arch"] != "vqgan":
            raise SystemExit(f"error: --tokenizer {args.tokenizer} is a {exp['arch']} tokenizer; MAGE pre-training "
                             f"here takes a VQGAN (train_tokenizer.py --arch vqgan); train_vim.py takes either")
        vq.update(exp["config"])
    if args.vqgan_config:
        try:
            given = json.loads(args.vqgan_config)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: --vqgan_config is not valid JSON: {e}")
        if not isinstance(given, dict):
            raise SystemExit(f"error: --vqgan_config must be a JSON object, got {args.vqgan_config!r}")
        vq.update(given)
    try:
        vq["ch_mult"] = [int(c) for c in vq["ch_mult"]]
    except (TypeError, ValueError):
        raise SystemExit(f"error: the tokenizer's ch_mult must be a list of integers, got {vq['ch_mult']!r}") from None
    down = 2 ** (len(vq["ch_mult"]) - 1)
    if args.img_size % down:
        raise SystemExit(f"error: --img_size {args.img_size} is not a multiple of the tokenizer's downsampling {down}")
    cfg.update(img_size=args.img_size, mlp_ratio=args.mlp_ratio, vqgan_config=vq,
               mask_ratio_min=args.mask_ratio_min, mask_ratio_max=args.mask_ratio_max,
               mask_ratio_mu=args.mask_ratio_mu, mask_ratio_std=args.mask_ratio_std)
    if args.dropout != DROPOUT:  # the official value stays implicit: exports keep the official config keys
        cfg["dropout"] = args.dropout
    return cfg


def build_model(cfg: dict, args) -> MAGE:
    model = MAGE(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), vqgan_ckpt_path=args.tokenizer)
    if args.init_from:
        load_checkpoint(model, args.init_from)
    return model


def check_token_cache(path: str, model: MAGE) -> None:
    check_cache(path, model.seq_len, model.codebook_size, tokenizer_checksum(model.vqgan))


def check_inputs(args, cfg: dict) -> None:
    """Before args.json: the model's config (reads --tokenizer) into ``cfg``, and --token_cache against
    the token grid and codebook size that config gives (the tokenizer's checksum is compared once
    the model is built)."""
    cfg.update(model_config(args))
    if args.token_cache:
        vq = cfg["vqgan_config"]
        grid = args.img_size // 2 ** (len(vq["ch_mult"]) - 1)
        check_cache(args.token_cache, seq_len=grid * grid, n_embed=vq.get("n_embed"))


def main(argv=None):
    args = parse_args(argv)
    cfg = {}
    # checks the data, config, output and resume inputs and reads --tokenizer (model_config) on every
    # rank before anything is written; a failure on any rank ends them all with one line
    deepspeed, rank, world, dev = start_run(args, check=lambda: check_inputs(args, cfg))

    model = build_model(cfg, args)
    if args.token_cache:
        check_token_cache(args.token_cache, model)
    model.class_dropout_prob = args.class_dropout_prob
    objective = MAGEObjective(model, activation_checkpointing=args.activation_checkpointing,
                              contrastive_weight=args.contrastive_weight, temperature=args.temperature)

    if args.token_cache:
        spec = LoaderSpec(source="tokens", path=args.token_cache, batch_size=args.batch_size, num_workers=0,
                          seed=args.seed, two_views=args.contrastive_weight > 0)
    else:
        spec = LoaderSpec(source="synthetic" if args.synthetic else "folder", path=args.data_path,
                          img_size=args.img_size, batch_size=args.batch_size, crop_scale=(args.crop_scale_min, 1.0),
                          num_workers=args.num_workers, seed=args.seed, synthetic_length=args.synthetic_length,
                          backend=args.data_backend, two_views=args.contrastive_weight > 0)
    loader = EpochLoader(spec, rank, world)
    total, warmup, per_epoch = schedule_lengths(args, loader.batches_per_epoch)
    lr, total_batch = run_lr(args, world)
    engine, opt, ds_cfg = build_engine(deepspeed, objective, args, world, lr)
    if rank == 0:
        n = sum(p.numel() for p in objective.parameters() if p.requires_grad)
        print(f"MAGE {args.model} {json.dumps({k: cfg[k] for k in SIZE_KEYS})} ({n / 1e6:.2f} M trainable), "
              f"{args.img_size}px -> {model.token_grid}^2 tokens; data: {loader.description}; total batch "
              f"{total_batch}, lr {lr:.3g}; {total} steps ({per_epoch}/epoch, warm-up {warmup}); world {world}, "
              f"ZeRO {eng.zero_stage(ds_cfg)}, {args.precision}" + (", MAGE-C" if args.contrastive_weight else "")
              + (f", class-conditional (dropout {args.class_dropout_prob})" if args.class_cond else ""),
              flush=True)

    model.check_input_range = False
    checked = [bool(args.token_cache)]

    def step_fn(batch, step):
        x = batch[0].to(dev, non_blocking=True)
        if not checked[0]:  # one range check on the first batch instead of a host sync every step
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ValueError(f"images must be in [0, 1], the loader gave [{lo:.3g}, {hi:.3g}]")
            checked[0] = True
        if args.class_cond:  # labels past the vocabulary's class range fail in class_token_ids
            return engine(x, batch[1].to(dev, non_blocking=True))
        return engine(x)

    loop = TrainLoop(LoopConfig(total_steps=total, base_lr=lr, warmup_steps=warmup, min_lr=args.min_lr,
                                grad_accum=args.accum_iter, log_every=args.log_every, save_every=args.save_every,
                                keep_last=args.keep_last, output_dir=args.output_dir, resume=args.resume,
                                simulate_crash_at_step=args.simulate_crash_at_step,
                                tokens_per_sample=model.seq_len, progress=not args.no_progress, desc="mage",
                                autocast_bf16=args.precision == "bf16-autocast"),
                     engine, opt, loader, step_fn)
    loop.maybe_resume()
    tag = loop.run()
    if args.export:
        export(engine, loop, tag, cfg, args.export, rank)
    dist.barrier()


def export(engine, loop, tag, cfg, path, rank) -> None:
    """Rank 0 writes ``{'model': sd, 'config': cfg}`` with the MAGE keys only (no MAGE-C head),
    after checking that it loads strictly into a fresh ``MAGE``."""
    sd = eng.full_state_dict(engine, loop.ckpt_dir, tag)
    if rank != 0:
        return
    sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    fresh = MAGE(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), vqgan_ckpt_path=None)
    load_state_dict_strict(fresh, read_state_dict({"model": sd}))
    from mage_fast.runs import atomic_path
    with atomic_path(path) as tmp:  # never half an export
        torch.save({"model": sd, "config": cfg}, tmp)
    print(f"exported {len(sd)} tensors to {path}", flush=True)


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
