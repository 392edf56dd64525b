"""Shared benchmark plumbing: environment header, robust timing, JSON output."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable

import torch

from mage_fast.info import cpu_instruction_sets, device_description, git_commit, versions

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds: median, min, max, IQR."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return summarize(ts, repeats, warmup) if ts else {}


def summarize(ts: list, repeats: int, warmup: int) -> dict:
    """Median, min, max and inter-quartile range of timings in seconds."""
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "iqr_s": q[2] - q[0],
            "repeats": repeats, "warmup": warmup, "all_s": ts}


def environment(device: torch.device) -> dict:
    """The machine a result came from: the device, the CPU's model and instruction sets (which decide
    fp32/bf16/int8 speed on a CPU, and the host's share on a GPU), versions, commit, threads, time."""
    return {"device": device_description(device), "cpu": cpu_instruction_sets(), "versions": versions(),
            "commit": git_commit(),
            "torch_threads": torch.get_num_threads(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_header(title: str, env: dict) -> None:
    print(title)
    print(f"  device : {env['device']}")
    if "cpu" in env:
        print(f"  cpu    : {env['cpu']['model']} | {env['cpu']['summary']}")
    v = env["versions"]
    print(f"  torch {v['torch']} | python {v['python']} | mage_fast {v['mage_fast']} | commit {env['commit']} | "
          f"triton {v['triton']}")


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    return "cpu"


def write_json(result: dict, path: str | None, default_name: str) -> str:
    path = path or os.path.join(RESULTS_DIR, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path
