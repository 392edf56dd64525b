"""DeepSpeed plumbing shared by the trainers: process-group setup (gloo on the CPU, nccl on GPUs),
config assembly, checkpoints with per-rank random state, and fp32 export."""
from __future__ import annotations

import os
import random
import shutil
import socket
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "train", "configs")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def setup_distributed():
    """Initialise torch.distributed through DeepSpeed; returns the ``deepspeed`` module.

    Under the ``deepspeed`` launcher the rank variables are set; a plain ``python script.py`` gets a
    single-process group. On the CPU the backend is gloo and DeepSpeed's shared-memory op (a
    ~76 s first-use compile) is disabled. Every group, DeepSpeed's too, has :func:`mage_fast.parallel.timeout`.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", _free_port())
    import deepspeed
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl"
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo"
    from .. import parallel
    limit = parallel.groups_inherit_timeout()  # before DeepSpeed makes its data-parallel groups
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=limit)
    if dist.get_world_size() > 1:
        parallel.watch_peers()  # a rank stopped by the launcher because a peer failed exits 2
    return deepspeed


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def ds_config(path: Optional[str], micro_batch: int, grad_accum: int, world_size: int, clip: float,
              precision: str) -> dict:
    """A DeepSpeed config: the ZeRO settings from ``path`` (a name in train/configs or a file),
    batch sizes, clipping and precision from the command line (they override the file)."""
    cfg = {}
    if path:
        if not os.path.isfile(path):
            named = os.path.join(CONFIG_DIR, path if path.endswith(".json") else path + ".json")
            if not os.path.isfile(named):
                raise FileNotFoundError(f"DeepSpeed config {path!r} not found (shipped: "
                                        f"{sorted(os.listdir(CONFIG_DIR))})")
            path = named
        from ..models.checks import InputError, read_json_object
        cfg = read_json_object(path, "--deepspeed_config")  # one line for a file that is not a JSON object
        zero = cfg.get("zero_optimization", {})
        if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
            raise InputError(f"--deepspeed_config {path}: zero_optimization must be an object whose stage is 0, 1, 2 "
                             f"or 3, got {zero!r}")
    if precision not in ("fp32", "bf16", "bf16-autocast", "fp16"):
        raise ValueError(f"precision must be fp32, bf16, bf16-autocast or fp16, got {precision!r}")
    cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
               train_batch_size=micro_batch * grad_accum * world_size, gradient_clipping=clip,
               steps_per_print=10 ** 9, wall_clock_breakdown=False, zero_allow_untested_optimizer=True)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16", "initial_scale_power": 16}
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------- random state
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- checkpoints
def latest_tag(ckpt_dir: str) -> Optional[str]:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save_checkpoint(engine, ckpt_dir: str, tag: str, client_state: dict, keep_last: int = 0) -> None:
    """All ranks: DeepSpeed's checkpoint plus each rank's random state, and only then the
    ``latest`` pointer (written atomically by rank 0), so a kill at any moment leaves the previous
    complete checkpoint as ``latest``."""
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_state_rank{rank}.pt"))
    dist.barrier()
    if rank == 0:
        tmp = os.path.join(ckpt_dir, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(ckpt_dir, "latest"))
        if keep_last > 0:
            _prune(ckpt_dir, keep=keep_last, current=tag)
    dist.barrier()


def _prune(ckpt_dir: str, keep: int, current: str) -> None:
    tags = sorted((d for d in os.listdir(ckpt_dir) if d.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, d))),
                  key=lambda t: int(t[4:]) if t[4:].isdigit() else -1)
    for t in tags[:-keep]:
        if t != current:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str, tag: Optional[str] = None) -> Optional[dict]:
    """Restore engine, optimizer and this rank's random state; returns the client state, or None
    when ``ckpt_dir`` holds no checkpoint. A checkpoint that cannot be loaded (files whole, as
    ``--resume``'s checks found them, but of the wrong contents) is an :class:`InputError` naming it."""
    from ..models.checks import InputError
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        return None
    where = os.path.join(ckpt_dir, tag)
    advice = (f"remove {where} and write the previous step's name into {os.path.join(ckpt_dir, 'latest')}, or "
              f"start afresh")

    def refuse(what, e):
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return InputError(f"--resume: {what} cannot be loaded ({type(e).__name__}: {first}); {advice}")

    try:
        path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    except Exception as e:  # a file of the wrong contents: DeepSpeed's KeyError, size mismatch, unpickling error
        raise refuse(f"checkpoint {where}", e) from e
    if path is None:
        raise InputError(f"--resume: DeepSpeed found no loadable checkpoint in {where}; {advice}")
    rng_file = os.path.join(where, f"rng_state_rank{dist.get_rank()}.pt")
    if not os.path.isfile(rng_file):
        raise InputError(f"--resume: {rng_file} is missing: checkpoint {tag} was written with a different world "
                         f"size or is incomplete; exact resume needs the same number of ranks")
    try:
        set_rng_state(torch.load(rng_file, weights_only=False))
    except Exception as e:  # not the random state this project saves
        raise refuse(rng_file, e) from e
    client = dict(client) if isinstance(client, dict) else {}
    bad = [k for k in ("step", "epoch", "batch") if type(client.get(k)) is not int or client[k] < 0]
    if bad:
        raise InputError(f"--resume: checkpoint {where} does not hold the loop's position ({', '.join(bad)} must be "
                         f"integers >= 0); {advice}")
    client["tag"] = tag
    return client


def keep_frozen_fp32(module) -> None:
    """Remember the frozen parameters (a MAGE's tokenizer) as they are, before a bf16/fp16 engine
    casts them: DeepSpeed's fp32 consolidation holds only what the optimizer updates."""
    module.__dict__["_frozen_fp32"] = {n: p.detach().clone() for n, p in module.named_parameters()
                                       if not p.requires_grad}


def complete_state_dict(sd: dict, own: dict, frozen: dict) -> dict:
    """A zero_to_fp32 state dict (trainable weights) completed with the frozen weights (their fp32
    values from before the cast) and the buffers (``own``, which keep their dtype); all fp32."""
    out = {}
    for k, v in own.items():  # zero_to_fp32's frozen weights are the engine's cast copies: not those
        if k in frozen:
            out[k] = frozen[k]
        elif k in sd and v.is_floating_point():
            out[k] = sd[k]
        else:
            out[k] = v
    return {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in out.items()}


def full_state_dict(engine, ckpt_dir: Optional[str] = None, tag: Optional[str] = None) -> Optional[dict]:
    """The module's full fp32 state dict on rank 0 (None elsewhere).

    ZeRO-3 or low-precision training: consolidated from the saved checkpoint ``tag`` (DeepSpeed's
    zero_to_fp32, the fp32 master weights; frozen weights as they were before the engine cast
    them); otherwise the module's own tensors.
    """
    stage = engine.zero_optimization_stage()
    low_precision = engine.bfloat16_enabled() or engine.fp16_enabled()
    if stage == 3 or (low_precision and stage > 0):
        if ckpt_dir is None or tag is None:
            raise ValueError("exporting a ZeRO-3 / low-precision run needs a saved checkpoint")
        dist.barrier()
        if dist.get_rank() != 0:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
        return complete_state_dict(sd, engine.module.state_dict(), engine.module.__dict__.get("_frozen_fp32", {}))
    if dist.get_rank() != 0:
        return None
    return {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu().clone())
            for k, v in engine.module.state_dict().items()}
