"""The training loop shared by ``train/pretrain.py`` and ``train/train_tokenizer.py``.

Counts optimizer steps; sets the learning rate from the step (so a resumed run continues the
same curve); saves ``step<N>`` checkpoints that hold the step, the data position (epoch, batch)
and every rank's random state; logs averaged metrics at an interval with one host transfer.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist

from .engine import load_checkpoint, save_checkpoint
from .logger import MetricAccumulator, RunLogger
from .schedule import lr_at


@dataclass
class LoopConfig:
    total_steps: int
    base_lr: float
    warmup_steps: int
    min_lr: float = 0.0
    grad_accum: int = 1
    log_every: int = 20
    save_every: int = 0  # optimizer steps; 0: only at the end
    keep_last: int = 2
    output_dir: Optional[str] = None
    resume: Optional[str] = None  # None, "auto" or a checkpoint directory
    simulate_crash_at_step: int = 0
    tokens_per_sample: int = 0
    progress: bool = True
    desc: str = "train"
    autocast_bf16: bool = False  # the forward under torch.autocast(bf16); weights and optimizer stay fp32


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch already consumed
    extra: Dict = field(default_factory=dict)


class TrainLoop:
    """Run ``step_fn(batch, step) -> (loss, stats)`` under a DeepSpeed ``engine``.

    Hooks: ``after_micro_step(step)`` after each engine step (e.g. a discriminator update; may
    return more stats); ``on_boundary(step)`` after each optimizer step (may return extra metrics to log at
    the logging interval); ``get_extra()`` / ``set_extra(d)`` add state to checkpoints.
    """

    def __init__(self, cfg: LoopConfig, engine, optimizer: torch.optim.Optimizer, loader, step_fn: Callable,
                 on_boundary: Optional[Callable] = None, get_extra: Optional[Callable] = None,
                 set_extra: Optional[Callable] = None, on_log: Optional[Callable] = None,
                 after_micro_step: Optional[Callable] = None):
        self.cfg, self.engine, self.optimizer, self.loader = cfg, engine, optimizer, loader
        self.step_fn, self.on_boundary, self.on_log = step_fn, on_boundary, on_log
        self.get_extra, self.set_extra = get_extra, set_extra
        self.after_micro_step = after_micro_step
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.state = LoopState()
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints") if cfg.output_dir else None

    # ------------------------------------------------------------------ checkpoints
    def maybe_resume(self) -> bool:
        if not self.cfg.resume:
            return False
        ckpt_dir = self.ckpt_dir if self.cfg.resume == "auto" else self.cfg.resume
        if ckpt_dir is None:
            raise ValueError("--resume auto needs --output_dir")
        client = load_checkpoint(self.engine, ckpt_dir)
        if client is None:
            if self.cfg.resume != "auto":
                raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
            return False
        self.state = LoopState(step=client["step"], epoch=client["epoch"], batch=client["batch"],
                               extra=client.get("extra", {}))
        if self.set_extra is not None:
            self.set_extra(self.state.extra)
        if self.rank == 0:
            print(f"resumed from {ckpt_dir}/{client['tag']}: step {self.state.step}, epoch {self.state.epoch}, "
                  f"batch {self.state.batch}", flush=True)
        return True

    def save(self) -> str:
        tag = f"step{self.state.step}"
        extra = self.get_extra() if self.get_extra is not None else {}
        client = {"step": self.state.step, "epoch": self.state.epoch, "batch": self.state.batch, "extra": extra}
        save_checkpoint(self.engine, self.ckpt_dir, tag, client, keep_last=self.cfg.keep_last)
        return tag

    # ------------------------------------------------------------------ loop
    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.cfg.base_lr, self.cfg.warmup_steps, self.cfg.total_steps, self.cfg.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _device_type(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def run(self) -> Optional[str]:
        """Train to ``total_steps``; returns the last checkpoint tag (None without an output dir)."""
        cfg, st = self.cfg, self.state
        logger = RunLogger(cfg.output_dir, self.rank, resume_step=st.step)
        acc = MetricAccumulator()
        bar = None
        if self.rank == 0 and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.total_steps, initial=st.step, desc=cfg.desc, unit="step", dynamic_ncols=True,
                       mininterval=2.0)
        last_tag, saved_at, extra_metrics = None, -1, {}
        t_last, samples_since, micro = time.perf_counter(), 0, 0
        lr = self.set_lr(st.step)
        while st.step < cfg.total_steps:
            for batch in self.loader.batches(st.epoch, st.batch):
                with torch.autocast(self._device_type(), dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                    loss, stats = self.step_fn(batch, st.step)
                self.engine.backward(loss)
                self.engine.step()
                if self.after_micro_step is not None:
                    stats.update(self.after_micro_step(st.step) or {})
                st.batch += 1
                micro += 1
                samples_since += batch[0].shape[0]
                acc.add(**stats)
                if micro % cfg.grad_accum:
                    continue
                st.step += 1
                if self.on_boundary is not None:
                    extra_metrics.update(self.on_boundary(st.step) or {})
                if bar is not None:
                    bar.update(1)
                if st.step % cfg.log_every == 0 or st.step == cfg.total_steps:
                    now = time.perf_counter()
                    metrics = acc.pop_means()
                    gn = self.engine.get_global_grad_norm()
                    if gn is not None:
                        metrics["grad_norm"] = float(gn)
                    metrics["lr"] = lr
                    ips = samples_since * self.world / max(now - t_last, 1e-9)
                    metrics["images_per_s"] = ips
                    if cfg.tokens_per_sample:
                        metrics["tokens_per_s"] = ips * cfg.tokens_per_sample
                    metrics["epoch"] = st.epoch + st.batch / self.loader.batches_per_epoch
                    if extra_metrics:
                        metrics.update(extra_metrics)
                    if self.on_log is not None:
                        metrics.update(self.on_log(st.step) or {})
                    logger.log(st.step, metrics)
                    if bar is not None:
                        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "lr", "images_per_s") if k in metrics})
                    t_last, samples_since = now, 0
                if st.step == cfg.total_steps:
                    break
                lr = self.set_lr(st.step)
                if self.ckpt_dir and cfg.save_every and st.step % cfg.save_every == 0:
                    last_tag, saved_at = self.save(), st.step
                if cfg.simulate_crash_at_step and st.step == cfg.simulate_crash_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)  # a hard kill, for resume tests
            else:
                st.epoch, st.batch = st.epoch + 1, 0
                continue
            break
        if bar is not None:
            bar.close()
        logger.close()
        if self.ckpt_dir and saved_at != st.step:
            last_tag = self.save()
        return last_tag
