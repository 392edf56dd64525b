"""Train VIM stage 2 (a class-conditional decoder-only transformer over tokenizer codes) with
DeepSpeed: ZeRO 0-3, fp32 or bf16, CPU (gloo) or GPUs (nccl).

    # ids cached once with train/cache_tokens.py (the fast path)
    deepspeed train/train_vim.py --tokenizer out/vit_tok/tokenizer.pt --token_cache out/vit_train_tokens.pt \
        --model tiny --embed_dim 128 --depth 6 --num_heads 4 --batch_size 128 --epochs 40 --warmup_epochs 2 \
        --lr 1e-3 --output_dir out/vim --resume auto --export out/vim/vim.pt

    # or images tokenized on the fly by the frozen tokenizer
    deepspeed train/train_vim.py --tokenizer out/vit_tok/tokenizer.pt --data_path data/fmnist/train --img_size 28 ...

Either tokenizer works (ViT-VQGAN or VQGAN export of train/train_tokenizer.py). Each batch is
(ids, labels) -> ``VIM(tokens, labels)``: next-token cross-entropy after a class prefix token,
labels dropped to "no class" with ``--class_dropout_prob``. AdamW (0.9, 0.95), weight decay
0.05 off for 1-D tensors and biases, per-step linear warm-up then half-cycle cosine, lr
``--lr`` (absolute) or ``--blr`` x total batch / 256. ``--export`` writes
``{'model': VIM state dict (no tokenizer), 'config': VIM kwargs, 'tokenizer': tokenizer export}``,
which ``mage_fast.models.checkpoint.load_vim`` rebuilds (strictly) with its tokenizer.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mage_fast.data import EpochLoader, LoaderSpec  # noqa: E402
from mage_fast.models.checkpoint import (CheckpointError, build_tokenizer, load_state_dict_strict,  # noqa: E402
                                         load_vim, read_state_dict, tokenizer_checksum, tokenizer_export)
from mage_fast.models.vim import VIM  # noqa: E402
from mage_fast.training import engine as eng  # noqa: E402
from mage_fast.training.common import (add_common_args, add_model_args, build_engine,  # noqa: E402
                                       check_common_args, check_token_cache, run_lr, schedule_lengths,
                                       start_run)
from mage_fast.training.loop import LoopConfig, TrainLoop  # noqa: E402

PRESETS = {  # the sizes of mage_fast.models.vim_tiny / vim_base
    "tiny": dict(embed_dim=64, depth=4, num_heads=4),
    "base": dict(embed_dim=768, depth=20, num_heads=12),
}
SIZE_KEYS = ("embed_dim", "depth", "num_heads")


def parse_args(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    add_common_args(ap)
    g = add_model_args(ap, PRESETS, "tiny")
    g.add_argument("--dropout", type=float, default=0.1, help="residual and attention dropout")
    g.add_argument("--num_classes", type=int, default=None,
                   help="class labels [0, N) (default: max label + 1 of the token cache / the folder's classes)")
    g.add_argument("--class_dropout_prob", type=float, default=0.1, help="label -> 'no class' probability")
    g.add_argument("--label_smoothing", type=float, default=0.0)
    g.add_argument("--tokenizer", required=True, help="train_tokenizer.py export (ViT-VQGAN or VQGAN)")
    g.add_argument("--token_cache", default=None, help="train on ids from train/cache_tokens.py")
    g.add_argument("--init_from", default=None, help="continue from a train_vim.py export")
    g = ap.add_argument_group("learning rate")
    g.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr x total batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    args = ap.parse_args(argv)
    check_common_args(ap, args)
    if args.token_cache and (args.data_path or args.synthetic):
        ap.error("--token_cache replaces --data_path / --synthetic")
    if args.token_cache and not os.path.isfile(args.token_cache):
        ap.error(f"--token_cache {args.token_cache} not found (make one with train/cache_tokens.py)")
    if not os.path.isfile(args.tokenizer):
        ap.error(f"--tokenizer {args.tokenizer} not found")
    if not 0 <= args.class_dropout_prob <= 1:
        ap.error("--class_dropout_prob must be in [0, 1]")
    return args


class VIMObjective(nn.Module):
    """``forward(x, labels) -> (loss, stats)``: ``x`` is token ids (B, L), or images (B, C, S, S)
    that the frozen ``tokenizer`` (kept outside the VIM, so its weights stay out of the export)
    turns into ids first."""

    def __init__(self, vim: VIM, tokenizer: nn.Module = None):
        super().__init__()
        self.vim = vim
        self.tokenizer = tokenizer

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        if x.is_floating_point():
            with torch.no_grad():
                _, _, (_, _, idx) = self.tokenizer.encode(x.to(next(self.tokenizer.parameters()).dtype))
            x = idx.view(x.shape[0], -1)
        loss, _ = self.vim(x.long(), labels)
        return loss, {"loss": loss.detach()}


def vim_config(args, seq_len: int, codebook_size: int, num_classes: int) -> dict:
    cfg = dict(PRESETS[args.model])
    for k in SIZE_KEYS:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if min(cfg.values()) <= 0 or cfg["embed_dim"] % cfg["num_heads"]:
        from mage_fast.models.checks import InputError
        raise InputError(f"--embed_dim {cfg['embed_dim']}, --depth {cfg['depth']}, --num_heads {cfg['num_heads']}: "
                         f"each must be positive and the width must split into the heads")
    cfg.update(seq_len=seq_len, codebook_size=codebook_size, num_classes=num_classes, mlp_ratio=args.mlp_ratio,
               dropout=args.dropout, class_dropout_prob=args.class_dropout_prob,
               label_smoothing=args.label_smoothing)
    return cfg


def prepare(args) -> dict:
    """Before args.json, on every rank: the tokenizer (it fixes the image size for a ViT-VQGAN, else
    the cache's / --img_size), the token cache against its token grid, codebook and checksum, the
    VIM's sizes and ``--init_from``. Returns what ``main`` builds from (tokenizer, its export, image
    size, grid, sequence length, codebook size)."""
    from mage_fast.models.checks import InputError
    img_size = args.img_size
    if args.token_cache:  # read whole and checked; its sizes once the tokenizer is known
        img_size = check_token_cache(args.token_cache).get("img_size", img_size)
    try:
        tok_exp = tokenizer_export(args.tokenizer)
        if tok_exp["arch"] == "vit_vqgan":
            img_size = tok_exp["config"]["img_size"]
        tok_exp = tokenizer_export(tok_exp, img_size)
        tokenizer = build_tokenizer(tok_exp)
    except CheckpointError as e:
        raise CheckpointError(f"--tokenizer {args.tokenizer}: {e}") from None
    if not isinstance(img_size, int) or img_size < tokenizer.downsample or img_size % tokenizer.downsample:
        raise InputError(f"--img_size {img_size} is not a positive multiple of the tokenizer's downsampling "
                         f"{tokenizer.downsample}")
    tokenizer.check_input_range = False
    grid = img_size // tokenizer.downsample
    seq_len, codebook_size = grid * grid, tokenizer.n_embed
    if args.token_cache:
        check_token_cache(args.token_cache, seq_len, codebook_size, tokenizer_checksum(tokenizer))
    vim_config(args, seq_len, codebook_size, 1)  # the sizes (heads dividing the width) refused here
    if args.init_from:
        from mage_fast.models.checkpoint import load_torch_file
        try:
            read_state_dict(load_torch_file(args.init_from))
        except CheckpointError as e:
            raise CheckpointError(f"--init_from: {e}") from None
    return dict(tokenizer=tokenizer, tok_exp=tok_exp, img_size=img_size, grid=grid, seq_len=seq_len,
                codebook_size=codebook_size)


def main(argv=None):
    args = parse_args(argv)
    got = {}
    deepspeed, rank, world, dev = start_run(args, check=lambda: got.update(prepare(args)))
    tokenizer, tok_exp, img_size, grid = got["tokenizer"], got["tok_exp"], got["img_size"], got["grid"]
    seq_len, codebook_size = got["seq_len"], got["codebook_size"]
    if args.token_cache:
        spec = LoaderSpec(source="tokens", path=args.token_cache, batch_size=args.batch_size, num_workers=0,
                          seed=args.seed)
    else:
        spec = LoaderSpec(source="synthetic" if args.synthetic else "folder", path=args.data_path,
                          img_size=img_size, batch_size=args.batch_size, crop_scale=(args.crop_scale_min, 1.0),
                          num_workers=args.num_workers, seed=args.seed, synthetic_length=args.synthetic_length,
                          backend="torch")  # labels come with the PyTorch loader
    loader = EpochLoader(spec, rank, world)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = default_num_classes(loader)
    cfg = vim_config(args, seq_len, codebook_size, num_classes)
    vim = VIM(**cfg)
    if args.init_from:
        load_state_dict_strict(vim, read_state_dict(torch.load(args.init_from, map_location="cpu",
                                                               weights_only=True)))
    objective = VIMObjective(vim, None if args.token_cache else tokenizer)

    total, warmup, per_epoch = schedule_lengths(args, loader.batches_per_epoch)
    lr, total_batch = run_lr(args, world)
    engine, opt, ds_cfg = build_engine(deepspeed, objective, args, world, lr)
    if rank == 0:
        print(f"VIM {args.model} {json.dumps({k: cfg[k] for k in SIZE_KEYS})} ({vim.num_parameters() / 1e6:.2f} M "
              f"params), {tok_exp['arch']} tokenizer {img_size}px -> {grid}^2 = {seq_len} tokens of {codebook_size} "
              f"codes, {num_classes} classes; data: {loader.description}; total batch {total_batch}, lr {lr:.3g}; "
              f"{total} steps ({per_epoch}/epoch, warm-up {warmup}); world {world}, ZeRO {eng.zero_stage(ds_cfg)}, "
              f"{args.precision}", flush=True)

    def step_fn(batch, step):
        x, labels = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        return engine(x, labels)

    loop = TrainLoop(LoopConfig(total_steps=total, base_lr=lr, warmup_steps=warmup, min_lr=args.min_lr,
                                grad_accum=args.accum_iter, log_every=args.log_every, save_every=args.save_every,
                                keep_last=args.keep_last, output_dir=args.output_dir, resume=args.resume,
                                simulate_crash_at_step=args.simulate_crash_at_step,
                                tokens_per_sample=seq_len, progress=not args.no_progress, desc="vim",
                                autocast_bf16=args.precision == "bf16-autocast"),
                     engine, opt, loader, step_fn)
    loop.maybe_resume()
    tag = loop.run()
    if args.export:
        export(engine, loop, tag, cfg, tok_exp, args.export, rank)
    dist.barrier()


def default_num_classes(loader) -> int:
    """Max label + 1 of a token cache; the class count of a folder / synthetic source."""
    ds = loader.dataset
    if hasattr(ds, "labels"):  # a token cache
        return int(ds.labels.max()) + 1 if len(ds.labels) else 1
    for attr in ("classes", "num_classes"):
        v = getattr(ds, attr, None)
        if v is not None:
            return len(v) if isinstance(v, (list, tuple)) else int(v)
    raise SystemExit("cannot tell the number of classes of this data source; pass --num_classes")


def export(engine, loop, tag, cfg, tok_exp, path, rank) -> None:
    """Rank 0 writes ``{'model': VIM sd, 'config': cfg, 'tokenizer': tok_exp}`` after checking that
    :func:`load_vim` rebuilds it strictly."""
    sd = eng.full_state_dict(engine, loop.ckpt_dir, tag)
    if rank != 0:
        return
    sd = {k[len("vim."):]: v for k, v in sd.items() if k.startswith("vim.")}
    blob = {"model": sd, "config": cfg, "tokenizer": tok_exp}
    load_vim(blob)
    from mage_fast.runs import atomic_path
    with atomic_path(path) as tmp:  # never half an export (a kill, a full disk)
        torch.save(blob, tmp)
    print(f"exported {len(sd)} tensors to {path}", flush=True)


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
