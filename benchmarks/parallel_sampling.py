"""Whole-run sampling throughput: one process against N torchrun ranks on the same machine.

Each repeat runs ``python -m mage_fast generate`` once per layout, alternating the layouts (this
machine's speed drifts), into a fresh folder, and reads the images/s the run reports (generation
and PNG writing; process start-up and model loading excluded). The threads per process are set so
that every layout uses the same cores: 1 process x T threads against N processes x T/N threads.
Also checks that every layout wrote byte-identical files.

    PYTHONPATH=. python benchmarks/parallel_sampling.py --num-images 400 --nproc 2 --threads 2 --repeats 3
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def run_layout(nproc: int, threads: int, out: str, gen_args: list[str], port: int) -> float:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(threads))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "mage_fast", "generate", *gen_args, "--out", out]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
        cmd = [sys.executable, torchrun, "--nproc_per_node", str(nproc), "--master_port", str(port),
               "-m", "mage_fast", "generate", *gen_args, "--out", out]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    m = re.search(r"\(([\d.]+) images/s\)", r.stdout)
    if not m:
        raise SystemExit(f"no images/s in the output of {' '.join(cmd)}:\n{r.stdout}")
    return float(m.group(1))


def main(argv=None) -> int:
    from mage_fast.script_exit import ArgumentParser  # one-line usage errors, defaults in --help
    p = ArgumentParser(description=__doc__)
    p.add_argument("--num-images", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="cores in use for every layout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ckpt", default=None, help="default: the shipped model")
    p.add_argument("--json", default=None,
                   help="JSON path (default: benchmarks/results/parallel_sampling_cpu_<kind>.json, <kind> the machine "
                        "kind: benchmarks/results/README.md)")
    args = p.parse_args(argv)
    if args.json is None:
        sys.path.insert(0, HERE)
        import torch
        from common import result_name
        args.json = os.path.join(HERE, "results", result_name("parallel_sampling", torch.device("cpu")))
    if args.threads % args.nproc:
        raise SystemExit("--threads must be a multiple of --nproc (the same cores for every layout)")
    import torch

    from benchmarks.common import environment, print_header
    gen = ["--num-images", str(args.num_images), "--batch-size", str(args.batch_size), "--grid", "0",
           "--class-id", "all"] + (["--ckpt", args.ckpt] if args.ckpt else [])
    # 1 x T (the same cores as N ranks), 1 x T/N (one rank's share: parallel efficiency), N x T/N
    layouts = list(dict.fromkeys([(1, args.threads), (1, args.threads // args.nproc),
                                  (args.nproc, args.threads // args.nproc)]))
    env = environment(torch.device("cpu"))
    print_header(f"sampling throughput: {args.nproc} torchrun ranks x {args.threads // args.nproc} threads against "
                 f"1 process ({args.num_images} images, layouts alternating)", env)
    rates = {f"{n}x{t}": [] for n, t in layouts}
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="mage_fast_parallel_")
    try:
        for r in range(args.repeats + 1):  # repeat 0 warms the page cache and compiled code paths
            for n, t in (layouts if r % 2 == 0 else layouts[::-1]):
                out = os.path.join(tmp, f"r{r}_{n}x{t}")
                rate = run_layout(n, t, out, gen, port=29800 + r)
                if r:
                    rates[f"{n}x{t}"].append(rate)
                print(f"  repeat {r}{' (warm-up)' if not r else ''}: {n} process(es) x {t} threads: {rate:.2f} images/s")
        dirs = [os.path.join(tmp, f"r0_{n}x{t}") for n, t in layouts]
        pngs = [f for f in sorted(os.listdir(dirs[0])) if f.endswith(".png")]
        identical = len(pngs) == args.num_images and all(
            len({open(os.path.join(d, f), "rb").read() for d in dirs}) == 1 for f in pngs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {k: {"median_images_per_s": statistics.median(v), "min": min(v), "max": max(v), "all": v}
               for k, v in rates.items()}
    med = {k: v["median_images_per_s"] for k, v in summary.items()}
    ranks = f"{args.nproc}x{args.threads // args.nproc}"
    ratios = {f"{ranks} / {k}": med[ranks] / med[k] for k in med if k != ranks}
    print("  median images/s: " + ", ".join(f"{k}: {v:.2f}" for k, v in med.items()) + "; "
          + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()) + f"; files identical: {identical}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"environment": env, "load_average_at_start": load0, "args": vars(args), "layouts": summary, "ratios": ratios,
                   "files_identical": identical, "load_average_at_end": os.getloadavg()}, f, indent=2)
    print(f"  JSON: {args.json}")
    return 0


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
