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
- peers (``--peers``; default: every one whose packages import): ``onnxruntime_fp32``,
  ``openvino_fp32`` and, where the CPU has AVX512-BF16 or AMX, ``openvino_bf16``. The exact network
  pass and the pixel decode exported to ONNX and run in that runtime inside the same sampling loop
  (``generate(mode=<peer>)``: everything else is the exact path's), see ``benchmarks/peers.py``. Each
  part is exported once per batch size, before the timed rounds; by default the peers run at the
  largest batch size only (``--peer-batch-sizes``). CPU only; skipped peers are named on one line.
- vqgan_decode: the tokenizer decode alone (part of every generation above).

Start-up is reported apart (``benchmarks/startup.py``, ``--startup-repeats``): ``import mage_fast`` in a
fresh process beside ``import torch``, and the build of the shipped model from its checkpoint and of
``--model`` from a checkpoint and with random weights; CPU and wall time, alternating, after a warm-up.

On the CPU the exact path and the peers also report the time inside the network passes and the pixel
decode of each generation (the rest is the sampler's).

Whole generations (T steps plus the VQGAN decode) are timed; the repeats cycle through the paths
(official, mode 1, mode 2, ..., official, ...), so load from other processes falls on all of them.
Speed-ups are medians of per-round ratios against the official path of the same round (the peers'
also against the exact path's).
``--only PATH`` runs one path alone (for whole-process timing, e.g. under ``/usr/bin/time``).

    python benchmarks/decode_throughput.py --threads 1 --batch-sizes 1 4      # offline (ViT-B, random weights)
    python benchmarks/decode_throughput.py --mode exact fast --batch-sizes 4 --gen-repeats 3
    python benchmarks/decode_throughput.py --only fast --batch-sizes 4 --gen-repeats 1
    python benchmarks/decode_throughput.py --mode exact --peers onnxruntime_fp32 --batch-sizes 4
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mage_fast  # noqa: E402
import peers as peer_runtimes  # noqa: E402  (imports no runtime until a peer is used)
import startup  # noqa: E402
from common import environment, print_header, result_name, summarize, time_fn, write_json  # noqa: E402
from mage_fast.models import MODEL_FACTORIES  # noqa: E402
from mage_fast.decoding import MODES, quantized_weights, resolve_mode  # noqa: E402
from mage_fast.ops import force_backend  # noqa: E402

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


def resolve_peers(args, device: torch.device) -> tuple[list, dict]:
    """The peers to time, and the ones left out with why (``--peers`` default: every available one;
    a peer named explicitly that cannot run here is an input error, raised by :func:`check_args`)."""
    asked = args.peers or ["all"]
    if asked == ["none"]:
        return [], {}
    names = list(peer_runtimes.PEERS) if "all" in asked else asked
    if device.type != "cpu":
        return [], {n: f"the peer runtimes run on the CPU; this run is on {device.type}" for n in names}
    skipped = peer_runtimes.unavailable(names)
    return [n for n in names if n not in skipped], skipped


def build(args, device):
    torch.manual_seed(0)
    if args.ckpt:
        from mage_fast.models.checkpoint import read_state_dict
        sd = read_state_dict(args.ckpt)
        whole = "token_emb.word_embeddings.weight" in sd  # the strict load replaces every weight: none drawn
        model = MODEL_FACTORIES[args.model](vqgan_ckpt_path=None, init_weights=not whole)
        mage_fast.load_checkpoint(model, sd)
    else:
        model = MODEL_FACTORIES[args.model](vqgan_ckpt_path=None)  # random weights: same FLOPs
    return model.to(device).eval()


class _Timed:
    """A decoding mode whose network passes and pixel decode are timed (CPU: each call returns when
    its work is done); the computation is the wrapped mode's."""

    def __init__(self, mode):
        self.mode, self.net_s, self.pix_s = mode, 0.0, 0.0

    def build(self, model, counts, keys=None, choice=None):
        inner, outer = self.mode.build(model, counts, keys, choice=choice), self

        class Pass:
            def __call__(self, ids, class_tokens, i):
                t0 = time.perf_counter()
                out = inner(ids, class_tokens, i)
                outer.net_s += time.perf_counter() - t0
                return out

            def decode_images(self, ids, chunk=None):
                t0 = time.perf_counter()
                out = inner.decode_images(ids, chunk)
                outer.pix_s += time.perf_counter() - t0
                return out
        return Pass()


def _generation(model, name, B, T, temp, ac, mode=None):
    """The run of path ``name``; ``mode`` (a decoding mode object) replaces the named one."""
    if name == "official":
        def run():
            with force_backend("torch"):
                return mage_fast.official_gen_image(model, B, seed=0, num_iter=T, choice_temperature=temp)
    elif name == "vqgan_decode":
        ids = torch.randint(0, model.codebook_size, (B, model.seq_len), generator=torch.Generator().manual_seed(0))
        ids = ids.to(next(model.parameters()).device)

        def run():
            with ac:
                return model.decode_tokens(ids)
    else:
        def run():
            with ac:
                return mage_fast.generate(model, B, num_iter=T, temperature=temp, seed=0, rng="torch",
                                          mode=name if mode is None else mode)
    return run


def _ratios(runs: dict, reps: int, base: str = "official", only=None) -> dict:
    """Per-round speed-ups against the ``base`` path of the same round: median, min, max
    (``only``: of these paths; default every path but the base and vqgan_decode)."""
    out = {}
    for name, ts in runs.items():
        if name in (base, "vqgan_decode") or base not in runs or (only is not None and name not in only):
            continue
        r = sorted(runs[base][i] / ts[i] for i in range(reps))
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
    check_number(args.startup_repeats, "--startup-repeats", lo=0, integer=True)
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
            if n == "all" and flag == "--mode" or n in ("official", "vqgan_decode", *peer_runtimes.PEERS) \
                    and flag == "--only":
                continue
            try:
                resolve_mode(n)
            except ValueError as e:
                also = f" (or official, vqgan_decode, {', '.join(peer_runtimes.PEERS)})" if flag == "--only" else ""
                raise InputError(f"{flag} {n}: {e}{also}") from None
    for n in args.peers or ():
        if n not in (*peer_runtimes.PEERS, "all", "none"):
            raise InputError(f"--peers {n}: unknown peer; choose from {', '.join(peer_runtimes.PEERS)}, all or none")
    if args.peers and len(args.peers) > 1 and ("none" in args.peers or "all" in args.peers):
        raise InputError(f"--peers {' '.join(args.peers)}: 'all' and 'none' stand alone")
    named = [n for n in (args.peers or ()) if n in peer_runtimes.PEERS]
    if args.only in peer_runtimes.PEERS:
        named.append(args.only)
    for n in named:
        if device.type != "cpu":
            raise InputError(f"peer {n} runs on the CPU; this run is on {device.type} (--device cpu)")
        why = peer_runtimes.unavailable([n]).get(n)
        if why:
            raise InputError(f"peer {n} cannot run here: {why}")
    sizes = args.batch_sizes or ([64] if device.type == "cuda" else [1, 4])
    for b in args.peer_batch_sizes or ():
        check_number(b, "--peer-batch-sizes", lo=1, integer=True)
        if b not in sizes:
            raise InputError(f"--peer-batch-sizes {b} is not one of the run's batch sizes "
                             f"({' '.join(map(str, sizes))}; --batch-sizes)")
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
    p.add_argument("--peers", nargs="+", default=None,
                   help=f"peer runtimes to time beside the modes: {', '.join(peer_runtimes.PEERS)}, 'all' or 'none' "
                        f"(default: all: every peer whose packages import ({peer_runtimes.EXTRA_HINT}), "
                        f"openvino_bf16 only where the CPU has AVX512-BF16 or AMX; the others are named on one line)")
    p.add_argument("--peer-batch-sizes", type=int, nargs="+", default=None,
                   help="batch sizes at which the peers run (default: the largest of --batch-sizes, which keeps "
                        "the default run short)")
    p.add_argument("--only", default=None,
                   help="run one path alone: official, vqgan_decode, a mode name or a peer name (default: none)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed rounds (default 2 CPU / 5 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the 2-step warm-up runs (the int8 copies are still made before timing); default: "
                        "warm up")
    p.add_argument("--startup-repeats", type=int, default=3,
                   help="rounds of the start-up measurement (import, model build; benchmarks/startup.py); 0 skips it "
                        "(default: 3)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/decode_throughput[_<model>]_<device>_<kind>[_<only>]"
                        ".json, <model> when not vit_base with random weights, <kind> the machine kind: "
                        "benchmarks/results/README.md)")
    p.add_argument("--from-log", default=None, help="write the JSON from the per-run lines of a run's log instead")
    args = p.parse_args(argv)
    device = check_args(args)
    if args.mode is None:
        args.mode = default_modes(device)
    if "all" in args.mode:
        args.mode = [m for m in args.mode if m != "all"] + all_modes(device, exclude=args.mode)
    if args.from_log:
        return from_log(args, args.from_log)
    peer_names, peers_skipped = resolve_peers(args, device) if not args.only else \
        ([args.only] if args.only in peer_runtimes.PEERS else [], {})
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = device.type == "cuda"
    sizes = args.batch_sizes or ([64] if cuda else [1, 4])
    reps = args.gen_repeats or (5 if cuda else 2)
    T, temp = args.num_iter, args.temperature
    peer_sizes = sizes if args.only else (args.peer_batch_sizes or [max(sizes)])
    names = [args.only] if args.only else ["official"] + list(args.mode) + peer_names + ["vqgan_decode"]
    modes = {n: resolve_mode(n) for n in names if n not in ("official", "vqgan_decode", *peer_names)}
    env = environment(device)
    env["load_average_at_start"] = os.getloadavg()
    print_header(f"decode throughput: {args.model}, batch sizes {sizes}, T={T}, temperature {temp}, "
                 f"threads {torch.get_num_threads()}, load average {env['load_average_at_start'][0]:.2f}", env)
    if peers_skipped:
        print("peers skipped: " + "; ".join(f"{n} ({why})" for n, why in peers_skipped.items()))
    start = startup.measure(args.model, args.ckpt, args.startup_repeats, args.warmup) \
        if args.startup_repeats and not args.only else None
    model = build(args, device)
    peer_set = peer_runtimes.PeerRuntimes(model, peer_names) if peer_names else None
    try:
        results = _run_rounds(model, names, modes, peer_set, peer_sizes, sizes, reps, T, temp, args.warmup, device)
        peer_info = _peer_json(args, peer_names, peers_skipped, peer_sizes, peer_set)
    finally:
        if peer_set is not None:
            peer_set.close()
    _write(args, env, sizes, T, temp, reps, modes, results, device, peers=peer_info, startup=start)


def _peer_json(args, names, skipped, sizes, peer_set) -> dict:
    """What the JSON says about the peers: asked, timed (with runtime and precision), skipped and why."""
    out = {"asked": " ".join(args.peers) if args.peers else "all (default)", "timed": names, "skipped": skipped,
           "batch_sizes": sizes if names else []}
    if peer_set is not None:
        out["details"] = peer_set.describe()
        out["export_s"] = {str(b): s for b, s in peer_set.export_s.items()}
        out["open_sessions_s"] = {f"{n} B={b}": s for (n, b), s in peer_set.open_s.items()}
    return out


def _run_rounds(model, names, modes, peer_set, peer_sizes, sizes, reps, T, temp, warmup, device) -> dict:
    """Every path at every batch size, the rounds cycling through the paths; per batch size the
    summaries and ratios (:func:`_report`), process CPU time, and on the CPU the time inside the
    network passes and the pixel decode of the exact path and the peers."""
    cuda = device.type == "cuda"
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    peer_names = set(peer_set.names) if peer_set is not None else set()
    results = {}
    with torch.inference_mode():
        for B in sizes:
            here = [n for n in names if n not in peer_names or B in peer_sizes]
            if peer_set is not None and B in peer_sizes:
                peer_set.prepare(B)  # export and open the sessions once for this batch size, untimed
                print(f"    peers at B={B}: exported in {peer_set.export_s[B]:.1f} s; sessions opened in "
                      + ", ".join(f"{n} {peer_set.open_s[n, B]:.1f} s" for n in peer_set.names), flush=True)
            # the exact path and the peers, timed inside (CPU: every call has finished when it returns)
            timed = {} if cuda else {n: _Timed(peer_set.mode(n) if n in peer_names else modes[n]) for n in here
                                     if n in peer_names or n == "exact"}
            fns = {n: _generation(model, n, B, T, temp, ac, timed.get(n)) for n in here}
            for n in here:  # warm-up on 2-step runs (and the int8 copy, made once per model)
                if warmup:
                    time_fn(_generation(model, n, B, min(T, 2), temp, ac, timed.get(n)), device, 0, warmup=1)
                elif n in modes and modes[n].quant != "none":
                    quantized_weights(model, modes[n].quant)
            runs, cpu = {n: [] for n in here}, {n: [] for n in here}
            parts = {n: {"network_pass_s": [], "pixel_decode_s": []} for n in timed}
            for r in range(reps):
                for n, fn in fns.items():
                    if n in timed:
                        timed[n].net_s = timed[n].pix_s = 0.0
                    c0 = time.process_time()
                    runs[n].append(time_fn(fn, device, 1, warmup=0)["median_s"])
                    cpu[n].append(time.process_time() - c0)
                    split = ""
                    if n in timed:
                        parts[n]["network_pass_s"].append(timed[n].net_s)
                        parts[n]["pixel_decode_s"].append(timed[n].pix_s)
                        split = f", network passes {timed[n].net_s:.2f} s, pixel decode {timed[n].pix_s:.2f} s"
                    print(f"    round {r + 1}/{reps} B={B} {n}: {runs[n][-1]:.2f} s (process CPU {cpu[n][-1]:.2f} s"
                          f"{split})", flush=True)
            descs = {n: m.describe() for n, m in modes.items()}
            descs.update({n: peer_set.mode(n).describe() for n in here if n in peer_names})
            results[str(B)] = _report(runs, B, here, descs, peer_names)
            results[str(B)]["process_cpu_s"] = cpu  # less sensitive to other jobs than wall time
            if not cuda:
                results[str(B)].update(_cpu_report(cpu, B, peer_names))
            if parts:
                results[str(B)]["parts_s"] = {n: {k: {"median": statistics.median(v), "per_round": v}
                                                  for k, v in p.items()} for n, p in parts.items()}
            if peer_set is not None:
                peer_set.release(B)
    return results


def _report(runs: dict, B: int, names, descs: dict, peer_names=()) -> dict:
    """Summaries and per-round ratios of complete rounds; prints one line per path."""
    reps = min(len(v) for v in runs.values())
    runs = {n: v[:reps] for n, v in runs.items()}
    res = {}
    for n in names:
        st = summarize(runs[n], reps, 0)
        st["images_per_s"] = B / st["median_s"]
        res[n] = st
    ratios = _ratios(runs, reps)
    vs_exact = _ratios(runs, reps, base="exact", only=peer_names)
    for n in names:
        st = res[n]
        extra = f" | {ratios[n]['median']:.2f}x official [{ratios[n]['min']:.2f}, {ratios[n]['max']:.2f}]" \
            if n in ratios else ""
        if n in vs_exact:
            extra += f" | {vs_exact[n]['median']:.2f}x exact"
        desc = f"  ({descs[n]})" if n in descs else ""
        print(f"  B={B} {n:<16} {st['median_s']:8.2f} s [{st['min_s']:.2f}, {st['max_s']:.2f}] "
              f"{st['images_per_s']:7.3f} images/s{extra}{desc}")
    out = {"paths": res, "speedup_images_per_s_vs_official": ratios, "rounds": reps}
    if vs_exact:
        out["peer_speedup_images_per_s_vs_exact"] = vs_exact  # > 1: the peer generates faster than exact
    return out


def _cpu_report(cpu: dict, B: int, peer_names=()) -> dict:
    """The same ratios by process CPU time: the ranking to read where other jobs share the cores
    (wall time then counts their turns too). One thread: CPU time is the time a path computes."""
    reps = min(len(v) for v in cpu.values())
    ratios = _ratios(cpu, reps)
    vs_exact = _ratios(cpu, reps, base="exact", only=peer_names)
    if not ratios:
        return {}
    print(f"  B={B} by process CPU time (median [min, max] of the per-round ratios):")
    for n, r in ratios.items():
        extra = f" | {vs_exact[n]['median']:.2f}x exact" if n in vs_exact else ""
        print(f"  B={B} {n:<16} {statistics.median(cpu[n][:reps]):8.2f} CPU s | {r['median']:.2f}x official "
              f"[{r['min']:.2f}, {r['max']:.2f}]{extra}")
    out = {"speedup_process_cpu_vs_official": ratios}
    if vs_exact:
        out["peer_speedup_process_cpu_vs_exact"] = vs_exact
    return out


def _write(args, env, sizes, T, temp, reps, modes, results, device, source=None, peers=None, startup=None):
    env["load_average_at_end"] = os.getloadavg() if source is None else None
    out = {"benchmark": "decode_throughput", "model": args.model, "checkpoint": args.ckpt or "random weights",
           "batch_sizes": sizes, "num_iter": T, "temperature": temp, "environment": env, "repeats": reps,
           "warmup": args.warmup, "modes": {n: m.describe() for n, m in modes.items()}, "results": results,
           "autocast": "bf16" if device.type == "cuda" else "none (fp32)"}
    if peers is not None:
        out["peers"] = peers
    if startup is not None:
        out["startup"] = startup  # import and model build, apart from the generations
    if source:
        out["source"] = source
    model = os.path.splitext(os.path.basename(args.ckpt))[0] if args.ckpt else \
        (None if args.model == "vit_base" else args.model)
    path = write_json(out, args.out, result_name("decode_throughput", device, model, args.only))
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
        modes.update({n: resolve_mode(n) for n in names if n not in ("official", "vqgan_decode", *peer_runtimes.PEERS)})
        descs = {n: m.describe() for n, m in modes.items()}
        descs.update({n: f"peer {n}" for n in names if n in peer_runtimes.PEERS})
        results[str(B)] = _report(runs, B, names, descs, [n for n in names if n in peer_runtimes.PEERS])
    reps = min(r["rounds"] for r in results.values())
    _write(args, env, sizes, T, temp, reps, modes, results, torch.device("cpu"),
           source=f"per-run lines of {os.path.basename(log_path)} (complete rounds only)")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
