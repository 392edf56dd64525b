"""Command-line pieces shared by the trainers."""
from __future__ import annotations

import argparse
import json
import os
import sys


def add_model_args(ap: argparse.ArgumentParser, presets: dict, default: str):
    """The "model" group: ``--model`` (a preset name), an override flag per preset size key (the
    keys of ``presets[default]``) and ``--mlp_ratio``; returns the group for script-specific flags."""
    g = ap.add_argument_group("model")
    g.add_argument("--model", default=default, choices=sorted(presets))
    for k in presets[default]:
        g.add_argument(f"--{k}", type=int, default=None, help="override the preset")
    g.add_argument("--mlp_ratio", type=float, default=4.0)
    return g


def add_common_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="ImageFolder root (root/<class>/<img>)")
    g.add_argument("--synthetic", action="store_true", help="random smooth images instead of a folder (smoke runs)")
    g.add_argument("--synthetic_length", type=int, default=1024)
    g.add_argument("--img_size", type=int, default=256)
    g.add_argument("--crop_scale_min", type=float, default=0.2, help="RandomResizedCrop area lower bound")
    g.add_argument("--data_backend", default="auto", choices=["auto", "torch", "dali"])
    g.add_argument("--num_workers", type=int, default=2)
    g = ap.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=32, help="micro-batch per rank")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--epochs", type=float, default=0, help="length in epochs (or --max_steps)")
    g.add_argument("--max_steps", type=int, default=0, help="length in optimizer steps (overrides --epochs)")
    g.add_argument("--warmup_epochs", type=float, default=0)
    g.add_argument("--warmup_steps", type=int, default=-1, help="overrides --warmup_epochs when >= 0")
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--clip_grad", type=float, default=3.0)
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "bf16-autocast", "fp16"],
                   help="fp32; bf16 / fp16: DeepSpeed's (weights and activations in 16 bits, fp32 master weights); "
                        "bf16-autocast: fp32 weights and optimizer, the forward under torch.autocast(bf16) "
                        "(default: %(default)s)")
    g.add_argument("--deepspeed_config", default="zero1", help="a file, or zero0/zero1/zero2/zero3 in train/configs")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="checkpoints, metrics.csv, tb/")
    g.add_argument("--save_every", type=int, default=0, help="save every N optimizer steps (0: at the end)")
    g.add_argument("--keep_last", type=int, default=2, help="checkpoints kept (0: all)")
    g.add_argument("--resume", default=None, help="'auto' (latest in --output_dir) or a checkpoint directory")
    g.add_argument("--log_every", type=int, default=20)
    g.add_argument("--export", default=None, help="write the trained weights here at the end")
    g.add_argument("--no_progress", action="store_true")
    g.add_argument("--threads", type=int, default=0, help="torch intra-op threads per rank (0: torch's default)")
    g.add_argument("--simulate_crash_at_step", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def check_common_args(ap: argparse.ArgumentParser, args) -> None:
    if not args.synthetic and not args.data_path and not getattr(args, "token_cache", None):
        ap.error("give --data_path (an ImageFolder), --token_cache, or --synthetic")
    if args.data_path and not os.path.isdir(args.data_path):
        ap.error(f"--data_path {args.data_path} is not a directory")
    if args.epochs <= 0 and args.max_steps <= 0:
        ap.error("give --epochs or --max_steps")
    if not 0 < args.crop_scale_min <= 1:
        ap.error("--crop_scale_min must be in (0, 1]")
    if args.resume and args.resume != "auto" and not os.path.isdir(args.resume):
        ap.error(f"--resume {args.resume}: not 'auto' and not a directory")
    if args.resume == "auto" and not args.output_dir:
        ap.error("--resume auto needs --output_dir")
    if args.batch_size <= 0 or args.accum_iter <= 0:
        ap.error("--batch_size and --accum_iter must be positive")
    for flag, lo in (("img_size", 1), ("num_workers", 0), ("synthetic_length", 1), ("save_every", 0),
                     ("keep_last", 0), ("log_every", 1), ("threads", 0), ("max_steps", 0)):
        if getattr(args, flag) < lo:
            ap.error(f"--{flag} must be >= {lo}, got {getattr(args, flag)}")
    if not args.epochs >= 0 or not args.warmup_epochs >= 0 or not args.min_lr >= 0 or not args.weight_decay >= 0:
        ap.error("--epochs, --warmup_epochs, --min_lr and --weight_decay must be numbers >= 0")


def schedule_lengths(args, batches_per_epoch: int) -> tuple:
    """-> (total optimizer steps, warm-up steps, steps per epoch)."""
    steps_per_epoch = max(1, batches_per_epoch // args.accum_iter)
    total = args.max_steps if args.max_steps > 0 else max(1, round(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps >= 0 else round(args.warmup_epochs * steps_per_epoch)
    return total, min(warmup, total), steps_per_epoch


def check_token_cache(path: str, seq_len=None, n_embed=None, checksum=None, flag: str = "--token_cache") -> dict:
    """A ``train/cache_tokens.py`` cache that fits the model: readable and whole, its ids within the
    codebook (``n_embed``), ``seq_len`` tokens per image, made by this tokenizer (the codebook
    checksum it recorded, when ``checksum`` is given). What is not known yet may be None (a trainer
    checks the sizes before it builds the model, the checksum after). An :class:`InputError` naming
    ``flag`` and the file otherwise (one line). Returns the cache's ``meta``."""
    from ..data.datasets import read_token_cache
    from ..models.checks import InputError
    meta = read_token_cache(path, flag, n_embed=n_embed, seq_len=seq_len)["meta"]
    want = meta.get("codebook_checksum")
    if checksum is not None and isinstance(want, (int, float)) and \
            not abs(want - checksum) <= 1e-6 * max(1.0, abs(want)):
        raise InputError(f"{flag} {path} was made with a different tokenizer than --tokenizer/--init_from "
                         f"(its codebook checksum differs)")
    return meta


def check_image_folder(root: str, flag: str = "--data_path") -> None:
    """An ImageFolder root with at least one image by the rules of :mod:`mage_fast.image_folder`,
    found without listing the whole tree (the loader lists it later); one line naming ``flag``
    otherwise."""
    from ..image_folder import IMAGE_EXTENSIONS, class_folders, has_images
    from ..models.checks import InputError
    if not os.path.isdir(root):
        raise InputError(f"{flag} {root} is not a directory; expected an ImageFolder root (root/<class>/<img>)")
    classes = class_folders(root)
    if not classes:
        raise InputError(f"{flag} {root} has no class sub-folders; expected the ImageFolder layout root/<class>/<img>")
    for c in classes:
        if has_images(os.path.join(root, c)):
            return
    raise InputError(f"{flag} {root} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}) in its class "
                     f"sub-folders")


def check_resume(args) -> None:
    """The checkpoint ``--resume`` would load: ``latest`` names a step folder that is there, which
    holds this rank's files (its random state, its ZeRO shard), and whose files are whole torch
    archives (a copy or save cut short has no zip central directory; a flipped byte fails its
    member's CRC)."""
    import zipfile

    from ..models.checks import InputError
    from .engine import latest_tag
    ckpt_dir = os.path.join(args.output_dir, "checkpoints") if args.resume == "auto" else args.resume
    if not os.path.isdir(ckpt_dir):
        return  # auto, and no run there yet: a fresh start
    try:
        tag = latest_tag(ckpt_dir)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--resume: {os.path.join(ckpt_dir, 'latest')} is unreadable ({e})") from e
    if tag is None:
        if args.resume != "auto":
            raise InputError(f"--resume {ckpt_dir}: no checkpoint there (no 'latest' file naming one)")
        return
    tag_dir = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(tag_dir):
        raise InputError(f"--resume: {os.path.join(ckpt_dir, 'latest')} names checkpoint {tag!r}, but {tag_dir} "
                         f"is missing")
    files = sorted(f for f in os.listdir(tag_dir) if f.endswith(".pt"))
    if not files:
        raise InputError(f"--resume: checkpoint {tag_dir} holds no .pt files")
    from ..parallel import dist_info
    rank = dist_info()[0]  # under a launcher each rank checks the files it will load itself
    for prefix, mine in (("rng_state_rank", f"rng_state_rank{rank}.pt"), ("zero_pp_rank_", f"zero_pp_rank_{rank}_")):
        if any(f.startswith(prefix) for f in files) and not any(f.startswith(mine) for f in files):
            raise InputError(f"--resume: checkpoint {tag_dir} has no {mine}{'*' if mine.endswith('_') else ''} for "
                             f"rank {rank}: it was written by a run with fewer ranks, or this machine sees only part "
                             f"of it; an exact resume needs the same number of ranks")
    for f in files:
        path = os.path.join(tag_dir, f)
        try:
            with zipfile.ZipFile(path) as z:  # every member read back against its CRC: flipped bytes too
                broken = z.testzip()
            if broken is not None:
                raise zipfile.BadZipFile(f"member {broken} fails its CRC check")
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError, NotImplementedError) as e:
            raise InputError(f"--resume: {path} is not a readable checkpoint file (cut short or corrupt: {e}); "
                             f"remove {tag_dir} and write the previous step's name into "
                             f"{os.path.join(ckpt_dir, 'latest')}, or start afresh") from e


def parallel_world() -> int:
    from ..parallel import dist_info
    return dist_info()[1]


def check_run_inputs(args) -> None:
    """What a trainer reads and where it writes, checked before anything is written (args.json,
    checkpoints): ``--output_dir`` a folder that can be written, ``--data_path`` an ImageFolder
    with images, ``--deepspeed_config`` a readable JSON object, ``--resume`` a whole checkpoint.
    Each refusal is an :class:`InputError` naming the flag (one ``error:`` line under ``run_script``)."""
    from ..models.checks import InputError
    from ..runs import check_output_dir
    from . import engine as eng
    if args.output_dir:
        check_output_dir(args.output_dir, "--output_dir")
    if args.data_path and not args.synthetic and not getattr(args, "token_cache", None):
        check_image_folder(args.data_path)
    if args.synthetic and args.synthetic_length // max(1, parallel_world()) < args.batch_size:
        raise InputError(f"--synthetic_length {args.synthetic_length} over {parallel_world()} rank(s) gives no "
                         f"full batch of --batch_size {args.batch_size}")
    try:
        eng.ds_config(args.deepspeed_config, args.batch_size, args.accum_iter, 1, args.clip_grad, args.precision)
    except FileNotFoundError as e:
        raise InputError(f"--deepspeed_config: {e}") from None
    if args.resume:
        check_resume(args)
    check_data_backend(args)


def check_data_backend(args) -> None:
    """``--data_backend dali`` asked for explicitly: nvidia-dali installed, and a source it reads
    (an image folder; MAGE-C's two views take the PyTorch loader), else one line naming the flag."""
    from ..data.loader import choose_backend
    from ..models.checks import InputError
    if getattr(args, "data_backend", "auto") != "dali":
        return
    source = "tokens" if getattr(args, "token_cache", None) else "synthetic" if args.synthetic else "folder"
    try:
        choose_backend("dali", source)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"--data_backend dali: {e}; --data_backend torch (or auto) takes the PyTorch loader") from None
    if getattr(args, "contrastive_weight", 0) > 0:
        raise InputError("--data_backend dali: MAGE-C's two views (--contrastive_weight > 0) use the PyTorch loader; "
                         "pass --data_backend torch or auto")


def start_run(args, check=None):
    """The common start of a training script: torch threads, the inputs checked
    (:func:`check_run_inputs`, then ``check()`` when given), distributed setup, seed, args.json.
    Returns (deepspeed module, rank, world size, device).

    Under a launcher the process group comes first and every rank checks its own view of the inputs
    (files a rank reads alone, such as its share of a checkpoint, differ by rank); when any rank's
    checks fail, every rank exits with status 2 before anything is written, and only the first
    failing rank says why (:func:`mage_fast.parallel.checks_together`)."""
    import torch
    import torch.distributed as dist

    from .. import parallel
    from . import engine as eng
    several = parallel.dist_info()[1] > 1
    deepspeed = eng.setup_distributed() if several else None
    with parallel.checks_together():
        check_run_inputs(args)
        if check is not None:
            check()
    if args.threads:
        torch.set_num_threads(args.threads)
    if deepspeed is None:
        deepspeed = eng.setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    write_run_args(args, rank)
    return deepspeed, rank, world, eng.device()


def write_run_args(args, rank: int) -> None:
    """``args.json`` (what export_checkpoint.py and resumed runs read), written atomically."""
    if rank == 0 and args.output_dir:
        from ..runs import atomic_path
        os.makedirs(args.output_dir, exist_ok=True)
        with atomic_path(os.path.join(args.output_dir, "args.json")) as tmp, open(tmp, "w") as f:
            json.dump({"argv": sys.argv, **vars(args)}, f, indent=1, default=str)


def build_engine(deepspeed, module, args, world: int, lr: float, betas=(0.9, 0.95)):
    """AdamW (no weight decay on 1-D tensors and biases) over ``module`` inside a DeepSpeed engine
    whose config comes from ``--deepspeed_config`` with the command line's batch sizes, clipping
    and precision. Returns (engine, optimizer, DeepSpeed config)."""
    from . import engine as eng
    from .optim import adamw, param_groups
    ds_cfg = eng.ds_config(args.deepspeed_config, args.batch_size, args.accum_iter, world, args.clip_grad,
                           args.precision)
    opt = adamw(param_groups(module, args.weight_decay), lr, betas)
    eng.keep_frozen_fp32(module)  # bf16/fp16 engines cast frozen weights too; exports take these
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds_cfg)
    return engine, opt, ds_cfg


def run_lr(args, world: int) -> tuple:
    """-> (lr, total batch): ``--lr`` when given, else ``--blr`` x total batch / 256, with total batch
    = micro-batch x accumulation x ranks."""
    from .schedule import scaled_lr
    total_batch = args.batch_size * args.accum_iter * world
    return (args.lr if args.lr is not None else scaled_lr(args.blr, total_batch)), total_batch
