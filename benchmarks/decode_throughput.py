"""Iterative-decoding throughput: every decoding mode against the official-equivalent path, one run.

All paths run the same model and weights (random unless --ckpt) at the same batch size:

- official: the official ``gen_image`` loop (``mage_fast.official_gen_image``) with every op on its
  plain-torch reference (``force_backend("torch")``): fp32 q.k attention with autocast off, all
  2025 logits, ``Categorical`` sampling, NumPy Gumbel noise, a full sort and host syncs per step.
- one path per decoding mode (``--mode``; default exact, cached, cached_focus, fast_close, fast, plus
  cached_bf16 and fast_bf16 where bf16 is native; ``all`` for every mode in
  ``mage_fast.decoding.MODES``):
  ``mage_fast.generate(rng="torch", mode=...)``; ``exact`` is today's bit-exact path. bf16 autocast
  on CUDA.
- vqgan_decode: the tokenizer decode alone (part of every generation above).

Whole generations (T steps plus the VQGAN decode) are timed; the repeats cycle through the paths
(official, mode 1, mode 2, ..., official, ...), so load from other processes falls on all of them.
Speed-ups are medians of per-round ratios against the official path of the same round.
``--only PATH`` runs one path alone (for whole-process timing, e.g. under ``/usr/bin/time``).

    python benchmarks/decode_throughput.py --threads 1 --batch-sizes 1 4      # offline (ViT-B, random weights)
    python benchmarks/decode_throughput.py --mode exact fast --batch-sizes 4 --gen-repeats 3
    python benchmarks/decode_throughput.py --only fast --batch-sizes 4 --gen-repeats 1
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mage_fast  # noqa: E402
from common import device_tag, environment, print_header, summarize, time_fn, write_json  # noqa: E402
from mage_fast.models import MODEL_FACTORIES  # noqa: E402
from mage_fast.decoding import MODES, quantized_weights, resolve_mode  # noqa: E402
from mage_fast.ops import force_backend  # noqa: E402
from mage_fast.sampling import _decode_images  # noqa: E402

# The default run (README quickstart, `make bench`): today's exact path, the mode inside the quality
# noise floor and the two presets (docs/DECODING.md). `--mode all` times every named mode.
DEFAULT_MODES = ("exact", "cached", "cached_focus", "fast_close", "fast")
BF16_DEFAULT_MODES = ("cached_bf16", "fast_bf16")  # added by default where bf16 is native (GPU; CPU with AMX or AVX512-BF16)


def default_modes(device: torch.device) -> list:
    """The modes timed without --mode: the bf16 ones only where the hardware multiplies bf16 (on
    other CPUs they are many times slower than fp32 and would make the default run long)."""
    from mage_fast.decoding import bf16_native
    return list(DEFAULT_MODES) + (list(BF16_DEFAULT_MODES) if bf16_native(device) else [])


def all_modes(device: torch.device, exclude=()) -> list:
    """``--mode all``: every named mode that is not slower than fp32 on ``device`` (bf16 or int8 without
    the hardware for it runs many times slower and would take the run hours); the skipped ones are
    named, and run when named explicitly."""
    from mage_fast.decoding import quant_slow_reason
    keep, skip = [], []
    for m in MODES:
        if m not in exclude:
            (skip if quant_slow_reason(MODES[m].quant, device) else keep).append(m)
    if skip:
        print(f"note: --mode all leaves out {', '.join(skip)}: slower than fp32 on this device "
              f"(python -m mage_fast info says why); name them to time them anyway")
    return keep


def build(args, device):
    torch.manual_seed(0)
    if args.ckpt:
        model = MODEL_FACTORIES[args.model](vqgan_ckpt_path=None)
        mage_fast.load_checkpoint(model, args.ckpt)
    else:
        model = MODEL_FACTORIES[args.model](vqgan_ckpt_path=None)  # random weights: same FLOPs
    return model.to(device).eval()


def _generation(model, name, B, T, temp, ac):
    if name == "official":
        def run():
            with force_backend("torch"):
                return mage_fast.official_gen_image(model, B, seed=0, num_iter=T, choice_temperature=temp)
    elif name == "vqgan_decode":
        ids = torch.randint(0, model.codebook_size, (B, model.seq_len), generator=torch.Generator().manual_seed(0))
        ids = ids.to(next(model.parameters()).device)

        def run():
            with ac:
                return _decode_images(model, ids)
    else:
        def run():
            with ac:
                return mage_fast.generate(model, B, num_iter=T, temperature=temp, seed=0, rng="torch", mode=name)
    return run


def _ratios(runs: dict, reps: int) -> dict:
    """Per-round speed-ups against the official path of the same round: median, min, max."""
    out = {}
    for name, ts in runs.items():
        if name in ("official", "vqgan_decode") or "official" not in runs:
            continue
        r = sorted(runs["official"][i] / ts[i] for i in range(reps))
        out[name] = {"median": statistics.median(r), "min": r[0], "max": r[-1], "per_round": r}
    return out


def check_args(args) -> torch.device:
    """Every setting checked before any work, each refused with one line naming its flag
    (:class:`InputError`, which ``run_script`` prints as ``error: ...`` with exit status 2)."""
    from mage_fast.models.checks import InputError, check_number
    for value, flag in ((args.num_iter, "--num-iter"), (args.gen_repeats, "--gen-repeats"),
                        (args.threads, "--threads")):
        if value is not None:
            check_number(value, flag, lo=1, integer=True)
    for b in args.batch_sizes or ():
        check_number(b, "--batch-sizes", lo=1, integer=True)
    check_number(args.temperature, "--temperature", lo=0)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {args.device} was asked for, but torch sees no CUDA device")
        if device.type not in ("cpu", "cuda"):
            raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    for flag, names in (("--mode", args.mode or ()), ("--only", [args.only] if args.only else ())):
        for n in names:
            if n == "all" and flag == "--mode" or n in ("official", "vqgan_decode") and flag == "--only":
                continue
            try:
                resolve_mode(n)
            except ValueError as e:
                also = " (or official, vqgan_decode)" if flag == "--only" else ""
                raise InputError(f"{flag} {n}: {e}{also}") from None
    if args.ckpt is not None and not os.path.isfile(args.ckpt):
        raise InputError(f"--ckpt {args.ckpt} is not a file; expected a checkpoint")
    if args.from_log is not None and not os.path.isfile(args.from_log):
        raise InputError(f"--from-log {args.from_log} is not a file; expected a run's log")
    if args.out is not None:
        from mage_fast.runs import check_output_dir
        if os.path.isdir(args.out):
            raise InputError(f"--out {args.out} is a directory; expected a JSON file name")
        check_output_dir(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out}: its folder")
    return device


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser
    p = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    p.add_argument("--model", default="vit_base", choices=sorted(MODEL_FACTORIES), help="(default: vit_base)")
    p.add_argument("--ckpt", default=None, help="checkpoint for the weights (default: random weights)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 4 on CPU, 64 on CUDA")
    p.add_argument("--num-iter", type=int, default=20, help="decoding steps (default: 20)")
    p.add_argument("--temperature", type=float, default=6.0, help="(default: 6.0)")
    p.add_argument("--mode", nargs="+", default=None,
                   help="decoding modes to time beside the official path: names in mage_fast.decoding.MODES, specs "
                        "such as drop=all,refresh=2,quant=int8, or 'all' (every named mode; about 3 min per mode "
                        f"on 2 CPU cores) (default: {' '.join(DEFAULT_MODES)}, and {' '.join(BF16_DEFAULT_MODES)} "
                        f"where bf16 is native: a GPU or a CPU with AMX or AVX512-BF16)")
    p.add_argument("--only", default=None, help="run one path alone: official, vqgan_decode or a mode name")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed rounds (default 2 CPU / 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the 2-step warm-up runs (the int8 copies are still made before timing); default: "
                        "warm up")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_throughput_<device>.json)")
    p.add_argument("--from-log", default=None, help="write the JSON from the per-run lines of a run's log instead")
    args = p.parse_args(argv)
    device = check_args(args)
    if args.mode is None:
        args.mode = default_modes(device)
    if "all" in args.mode:
        args.mode = [m for m in args.mode if m != "all"] + all_modes(device, exclude=args.mode)
    if args.from_log:
        return from_log(args, args.from_log)
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = device.type == "cuda"
    sizes = args.batch_sizes or ([64] if cuda else [1, 4])
    reps = args.gen_repeats or (5 if cuda else 2)
    T, temp = args.num_iter, args.temperature
    names = [args.only] if args.only else ["official"] + list(args.mode) + ["vqgan_decode"]
    modes = {n: resolve_mode(n) for n in names if n not in ("official", "vqgan_decode")}
    env = environment(device)
    env["load_average_at_start"] = os.getloadavg()
    print_header(f"decode throughput: {args.model}, batch sizes {sizes}, T={T}, temperature {temp}, "
                 f"threads {torch.get_num_threads()}, load average {env['load_average_at_start'][0]:.2f}", env)
    model = build(args, device)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    results = {}
    with torch.inference_mode():
        for B in sizes:
            fns = {n: _generation(model, n, B, T, temp, ac) for n in names}
            for n in names:  # warm-up on 2-step runs (and the int8 copy, made once per model)
                if args.warmup:
                    time_fn(_generation(model, n, B, min(T, 2), temp, ac), device, 0, warmup=1)
                elif n in modes and modes[n].quant != "none":
                    quantized_weights(model, modes[n].quant)
            runs, cpu = {n: [] for n in names}, {n: [] for n in names}
            for r in range(reps):
                for n, fn in fns.items():
                    c0 = time.process_time()
                    runs[n].append(time_fn(fn, device, 1, warmup=0)["median_s"])
                    cpu[n].append(time.process_time() - c0)
                    print(f"    round {r + 1}/{reps} B={B} {n}: {runs[n][-1]:.2f} s (process CPU {cpu[n][-1]:.2f} s)",
                          flush=True)
            results[str(B)] = _report(runs, B, names, modes)
            results[str(B)]["process_cpu_s"] = cpu  # less sensitive to other jobs than wall time
    _write(args, env, sizes, T, temp, reps, modes, results, device)


def _report(runs: dict, B: int, names, modes) -> dict:
    """Summaries and per-round ratios of complete rounds; prints one line per path."""
    reps = min(len(v) for v in runs.values())
    runs = {n: v[:reps] for n, v in runs.items()}
    res = {}
    for n in names:
        st = summarize(runs[n], reps, 0)
        st["images_per_s"] = B / st["median_s"]
        res[n] = st
    ratios = _ratios(runs, reps)
    for n in names:
        st = res[n]
        extra = f" | {ratios[n]['median']:.2f}x official [{ratios[n]['min']:.2f}, {ratios[n]['max']:.2f}]" \
            if n in ratios else ""
        desc = f"  ({modes[n].describe()})" if n in modes else ""
        print(f"  B={B} {n:<13} {st['median_s']:8.2f} s [{st['min_s']:.2f}, {st['max_s']:.2f}] "
              f"{st['images_per_s']:7.3f} images/s{extra}{desc}")
    return {"paths": res, "speedup_images_per_s_vs_official": ratios, "rounds": reps}


def _write(args, env, sizes, T, temp, reps, modes, results, device, source=None):
    env["load_average_at_end"] = os.getloadavg() if source is None else None
    out = {"benchmark": "decode_throughput", "model": args.model, "checkpoint": args.ckpt or "random weights",
           "batch_sizes": sizes, "num_iter": T, "temperature": temp, "environment": env, "repeats": reps,
           "warmup": args.warmup, "modes": {n: m.describe() for n, m in modes.items()}, "results": results,
           "autocast": "bf16" if device.type == "cuda" else "none (fp32)"}
    if source:
        out["source"] = source
    default = f"decode_throughput_{device_tag(device)}" + (f"_{args.only}" if args.only else "_modes") + ".json"
    path = write_json(out, args.out, default)
    print(f"  wrote {path}")


def from_log(args, log_path: str) -> None:
    """JSON from the per-run lines of a run's log (e.g. one stopped before its last round): the
    header gives device, threads, load and commit; only complete rounds are summarised."""
    import re
    text = open(log_path).read()
    env = {"device": re.search(r"device : (.*)", text).group(1).strip(),
           "commit": re.search(r"commit (\w+)", text).group(1),
           "torch_threads": int(re.search(r"threads (\d+)", text).group(1)),
           "load_average_at_start": float(re.search(r"load average ([\d.]+)", text).group(1)),
           "versions_line": re.search(r"(torch \S+ \| python.*)", text).group(1).strip()}
    hdr = re.search(r"batch sizes \[([\d, ]+)\], T=(\d+), temperature ([\d.]+)", text)
    sizes, T, temp = [int(x) for x in hdr.group(1).split(",")], int(hdr.group(2)), float(hdr.group(3))
    runs_by_b: dict = {}
    for r, B, n, t in re.findall(r"round (\d+)/\d+ B=(\d+) (\S+): ([\d.]+) s", text):
        runs_by_b.setdefault(int(B), {}).setdefault(n, []).append(float(t))
    results, modes = {}, {}
    for B, runs in runs_by_b.items():
        names = list(runs)
        modes.update({n: resolve_mode(n) for n in names if n not in ("official", "vqgan_decode")})
        results[str(B)] = _report(runs, B, names, modes)
    reps = min(r["rounds"] for r in results.values())
    _write(args, env, sizes, T, temp, reps, modes, results, torch.device("cpu"),
           source=f"per-run lines of {os.path.basename(log_path)} (complete rounds only)")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
