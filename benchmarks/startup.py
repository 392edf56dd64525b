"""Start-up: what a user waits for before the first network pass, import and model build apart.

- import: ``python -c "import mage_fast"`` in a fresh process (the checkout this script imports),
  beside ``python -c "import torch"``, the floor no torch program goes under. The child's CPU time
  (user + system, from ``getrusage(RUSAGE_CHILDREN)``) and its wall time.
- build, in this process: the shipped model from its checkpoint (``MAGE.from_pretrained``), the
  benchmark's model from a checkpoint (``--ckpt``, else its random weights saved once to a temporary
  file, untimed) and the same model with random initial weights (the factory), which is what the
  throughput benchmark times against. Process CPU time (``time.process_time``) and wall time.

Each measurement runs once untimed (warm-up: file cache, first-call costs), then the rounds cycle
through them (torch, mage_fast, torch, ...; shipped, model from file, model random, ...), so load
from other processes falls on all of them; medians and spread are reported. On a loaded machine
the CPU times are the numbers to read: wall time then also counts the waits for a core.

    python benchmarks/startup.py                        # ViT-B, 3 rounds
    python benchmarks/startup.py --model tiny --repeats 5
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_header, result_name, summarize, write_json  # noqa: E402

IMPORTS = {"torch": "import torch", "mage_fast": "import mage_fast"}


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _import_run(code: str, env: dict) -> tuple[float, float]:
    """(CPU s, wall s) of a fresh ``python -c code``; a failing import raises with its last line."""
    c0, t0 = _child_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"python -c {code!r} failed: {last}")
    return cpu, wall


def import_times(repeats: int, warmup: bool = True) -> dict:
    """``import torch`` and ``import mage_fast`` in fresh processes, alternating: per module
    ``{"cpu": summary, "wall": summary}`` (seconds) and ``mage_fast_over_torch_cpu_s``."""
    import mage_fast
    root = os.path.dirname(os.path.dirname(os.path.abspath(mage_fast.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    if warmup:
        for code in IMPORTS.values():
            _import_run(code, env)
    runs = {name: ([], []) for name in IMPORTS}
    for _ in range(repeats):
        for name, code in IMPORTS.items():
            cpu, wall = _import_run(code, env)
            runs[name][0].append(cpu)
            runs[name][1].append(wall)
    out = {name: {"cpu": summarize(c, repeats, int(warmup)), "wall": summarize(w, repeats, int(warmup))}
           for name, (c, w) in runs.items()}
    out["mage_fast_over_torch_cpu_s"] = out["mage_fast"]["cpu"]["median_s"] - out["torch"]["cpu"]["median_s"]
    out["bytecode_cache_written"] = not os.environ.get("PYTHONDONTWRITEBYTECODE")
    return out


def build_times(builders: dict, repeats: int, warmup: bool = True) -> dict:
    """Each ``builders[name]()`` (returns a model) ``repeats`` times, the rounds cycling through
    them: per name ``{"cpu": summary, "wall": summary}`` (seconds)."""
    if warmup:
        for fn in builders.values():
            fn()
    runs = {name: ([], []) for name in builders}
    for _ in range(repeats):
        for name, fn in builders.items():
            c0, t0 = time.process_time(), time.perf_counter()
            model = fn()
            runs[name][1].append(time.perf_counter() - t0)
            runs[name][0].append(time.process_time() - c0)
            del model
    return {name: {"cpu": summarize(c, repeats, int(warmup)), "wall": summarize(w, repeats, int(warmup))}
            for name, (c, w) in runs.items()}


def shipped_checkpoint() -> str:
    from mage_fast.cli import DEFAULT_CKPT
    return DEFAULT_CKPT


def builders(model_name: str, ckpt: str | None, tmp_dir: str) -> dict:
    """What :func:`build_times` times: the shipped model, ``model_name`` from ``ckpt`` (else from its
    random weights saved to ``tmp_dir``) and ``model_name`` with random initial weights."""
    import mage_fast
    from mage_fast.models import MODEL_FACTORIES
    factory = MODEL_FACTORIES[model_name]
    if ckpt is None:
        ckpt = os.path.join(tmp_dir, f"{model_name}.pth")
        torch.save({"model": factory(vqgan_ckpt_path=None).state_dict()}, ckpt)
    shipped = shipped_checkpoint()
    out = {}
    if os.path.isfile(shipped):
        name = os.path.splitext(os.path.basename(shipped))[0]
        out[f"shipped {name}, from its checkpoint"] = lambda: mage_fast.MAGE.from_pretrained(shipped)
    out[f"{model_name}, from a checkpoint"] = lambda: mage_fast.MAGE.from_pretrained(ckpt)
    out[f"{model_name}, random weights"] = lambda: factory(vqgan_ckpt_path=None)
    return out


def measure(model_name: str = "vit_base", ckpt: str | None = None, repeats: int = 3, warmup: bool = True) -> dict:
    """Import and build times (see the module's docstring), printed one line each; the JSON part."""
    print(f"start-up: {repeats} round{'s' if repeats != 1 else ''}{', after a warm-up' if warmup else ''}; CPU s (the "
          f"numbers to read on a loaded machine) and wall s, median [min, max]", flush=True)
    imports = import_times(repeats, warmup)
    for name in IMPORTS:
        print(_line(f"import {name} (fresh process)", imports[name]), flush=True)
    print(f"    mage_fast over torch: {imports['mage_fast_over_torch_cpu_s']:+.2f} CPU s", flush=True)
    with tempfile.TemporaryDirectory(prefix="mage_fast_startup_") as tmp:
        builds = build_times(builders(model_name, ckpt, tmp), repeats, warmup)
    for name, st in builds.items():
        print(_line(f"build {name}", st), flush=True)
    return {"import": imports, "build": builds, "model": model_name, "checkpoint": ckpt or "random weights, saved",
            "repeats": repeats, "warmup": warmup}


def _line(label: str, st: dict) -> str:
    c, w = st["cpu"], st["wall"]
    return (f"  {label:<50} CPU {c['median_s']:6.2f} s [{c['min_s']:.2f}, {c['max_s']:.2f}]   "
            f"wall {w['median_s']:6.2f} s [{w['min_s']:.2f}, {w['max_s']:.2f}]")


def main(argv=None):
    from mage_fast.models import MODEL_FACTORIES
    from mage_fast.models.checks import InputError, check_number
    from mage_fast.script_exit import ArgumentParser
    p = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    p.add_argument("--model", default="vit_base", choices=sorted(MODEL_FACTORIES), help="(default: vit_base)")
    p.add_argument("--ckpt", default=None, help="checkpoint of --model to build from (default: its random weights, "
                                                "saved to a temporary file)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first round "
                                                                             "(default: warm up)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/startup_cpu_<kind>.json, "
                                               "<kind> the machine kind: benchmarks/results/README.md)")
    args = p.parse_args(argv)
    check_number(args.repeats, "--repeats", lo=1, integer=True)
    if args.ckpt is not None and not os.path.isfile(args.ckpt):
        raise InputError(f"--ckpt {args.ckpt} is not a file; expected a checkpoint")
    if args.out is not None and os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a directory; expected a JSON file name")
    device = torch.device("cpu")
    env = environment(device)
    env["load_average_at_start"] = os.getloadavg()
    print_header(f"start-up: {args.model}, load average {env['load_average_at_start'][0]:.2f}", env)
    res = measure(args.model, args.ckpt, args.repeats, args.warmup)
    env["load_average_at_end"] = os.getloadavg()
    path = write_json({"benchmark": "startup", "environment": env, **res}, args.out,
                      result_name("startup", device, None if args.model == "vit_base" else args.model))
    print(f"  wrote {path}")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
