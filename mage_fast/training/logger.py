"""Metrics to CSV and TensorBoard (when installed) on rank 0, read from the device only at the
logging interval so the training loop has no per-step host synchronisation."""
from __future__ import annotations

import csv
import os
import time
from typing import Dict, Optional

import torch


class MetricAccumulator:
    """Sums scalar tensors on their device between log points (no ``.item()`` per step)."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def pop_means(self) -> Dict[str, float]:
        """One host transfer for all metrics; resets."""
        if not self.count:
            return {}
        keys = list(self.sums)
        vals = torch.stack([self.sums[k] for k in keys]).cpu().tolist()
        out = {k: v / self.count for k, v in zip(keys, vals)}
        self.sums, self.count = {}, 0
        return out


class RunLogger:
    """CSV (``metrics.csv``) and TensorBoard (``tb/``) writer for rank 0; a no-op elsewhere."""

    def __init__(self, out_dir: Optional[str], rank: int, resume_step: int = 0):
        self.active = rank == 0 and out_dir is not None
        self.tb = None
        self._csv = None
        self._fields = None
        self._t = time.perf_counter()
        if not self.active:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        if resume_step == 0 and os.path.exists(self.csv_path):
            os.remove(self.csv_path)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"), purge_step=resume_step or None)
        except Exception:  # tensorboard not installed: CSV only
            self.tb = None

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.active:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        if self._fields is None:
            self._fields = self._read_header()
        if not self._fields or any(k not in self._fields for k in row):
            self._rewrite([k for k in (self._fields or [])] + [k for k in row if k not in (self._fields or [])])
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def _read_header(self):
        if not os.path.exists(self.csv_path):
            return []
        with open(self.csv_path) as f:
            header = f.readline().strip().split(",")
        return header if header and header[0] == "step" else []

    def _rewrite(self, fields) -> None:
        """A metric appeared that the header lacks: rewrite the file with the wider header."""
        rows = []
        if os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        self._fields = fields

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
