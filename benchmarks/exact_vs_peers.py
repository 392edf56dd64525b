"""The exact network pass and the exact pixel decode against the fp32 peer runtimes, in process CPU time.

    PYTHONPATH=. python benchmarks/exact_vs_peers.py [--model base] [--batch 4] [--rounds 5]

Two parts of a generation, each on the same inputs in every path:

- the network pass: ``model.code_logits`` on a half-masked (B, L) state -> (B, L, codebook) logits;
- the pixel decode: (B, L) code ids -> (B, 3, S, S) images, the call the ``exact`` mode's sampler makes
  (``MAGE.decode_tokens``).

Paths: ``mage_fast`` (the exact mode, its ops on their default backends), ``torch_reference`` (every op
forced to its plain-torch reference, ``force_backend("torch")``: the pass as it was before the exact
path's backends) and each peer of ``--peers`` (``benchmarks/peers.py``: the exported pass and decode
in ONNX Runtime or OpenVINO, fp32). Random weights; the tokenizer is built without a checkpoint.

Timing: process CPU time (``time.process_time``) at ``--threads`` threads (default 1), so that other
jobs on the machine's cores do not count; the paths alternate inside each round, ``--warmup`` untimed
rounds first, then ``--rounds`` timed ones; per path and part the median, min, max and IQR, and the
ratio of medians of each peer over ``mage_fast`` (above 1: mage_fast is faster). With more than one
thread, CPU time sums over threads and is no longer the time a user waits.

Each path's output is compared with ``torch_reference`` (max abs difference over max abs value).
JSON to benchmarks/results/exact_vs_peers_<model>_b<batch>.json (or ``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODELS = ("tiny", "base", "large")
DEFAULT_PEERS = "onnxruntime_fp32,openvino_fp32"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="base", choices=MODELS, help="MAGE size (random weights)")
    p.add_argument("--batch", type=int, default=4, help="images per pass")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (paths alternate in each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch and peer threads")
    p.add_argument("--parts", default="net,pix", help="comma-separated: net (network pass), pix (pixel decode)")
    p.add_argument("--peers", default=DEFAULT_PEERS, help="comma-separated peers of benchmarks/peers.py, or none")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs")
    p.add_argument("--out", default=None, help="JSON path")
    a = p.parse_args(argv)
    for name in ("batch", "rounds", "threads"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {getattr(a, name)}")
    if a.warmup < 0:
        raise SystemExit(f"error: --warmup must be 0 or more, got {a.warmup}")
    a.parts = [s for s in a.parts.split(",") if s]
    bad = [s for s in a.parts if s not in ("net", "pix")]
    if bad or not a.parts:
        raise SystemExit(f"error: --parts takes net and/or pix, got {','.join(bad) or 'nothing'}")
    a.peers = [] if a.peers == "none" else [s for s in a.peers.split(",") if s]
    from peers import PEERS
    bad = [s for s in a.peers if s not in PEERS]
    if bad:
        raise SystemExit(f"error: unknown peer {bad[0]!r}; choose from {', '.join(sorted(PEERS))} or none")
    return a


def build_model(name: str, seed: int):
    import mage_fast
    torch.manual_seed(seed)
    make = {"tiny": mage_fast.mage_vit_tiny, "base": mage_fast.mage_vit_base_patch16,
            "large": mage_fast.mage_vit_large_patch16}[name]
    return make(vqgan_ckpt_path=None).eval()


def inputs(model, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    codes = torch.randint(0, model.codebook_size, (batch, model.seq_len), generator=g)
    state = torch.where(torch.rand(batch, model.seq_len, generator=g) < 0.5, model.mask_token_label, codes)
    return state, codes


def paths(model, runtimes, peer_names):
    """name -> {part: fn(ids) -> tensor}."""
    from mage_fast.ops import force_backend

    def reference(fn):
        def run(ids):
            with force_backend("torch"):
                return fn(ids)
        return run

    def net(ids):
        return model.code_logits(ids, None, check=False)

    def pix(ids):
        return model.decode_tokens(ids)

    out = {"mage_fast": {"net": net, "pix": pix},
           "torch_reference": {"net": reference(net), "pix": reference(pix)}}
    for name in peer_names:
        out[name] = {"net": (lambda ids, n=name: runtimes.network_pass(n, ids, None)),
                     "pix": (lambda ids, n=name: runtimes.pixel_decode(n, ids))}
    return out


def main(argv=None) -> int:
    from common import environment, print_header, summarize, write_json
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    print_header(f"exact pass and pixel decode vs fp32 peers: ViT-{args.model}, batch {args.batch}, "
                 f"{args.threads} thread(s), process CPU time", env)
    model = build_model(args.model, args.seed)
    state, codes = inputs(model, args.batch, args.seed)
    feeds = {"net": state, "pix": codes}
    runtimes = None
    if args.peers:
        import peers
        missing = peers.unavailable(args.peers)
        if missing:
            name, why = next(iter(missing.items()))
            raise SystemExit(f"error: peer {name} cannot run here: {why}")
        runtimes = peers.PeerRuntimes(model, args.peers, threads=args.threads)
        runtimes.prepare(args.batch)
    table = paths(model, runtimes, args.peers)
    times = {name: {part: [] for part in args.parts} for name in table}
    errors = {}
    with torch.inference_mode():
        refs = {part: table["torch_reference"][part](feeds[part]) for part in args.parts}
        for name, fns in table.items():
            for part in args.parts:
                got = fns[part](feeds[part]).float()
                errors.setdefault(name, {})[part] = (got - refs[part]).abs().max().item() / refs[part].abs().max().item()
        for r in range(args.warmup + args.rounds):
            for name, fns in table.items():
                for part in args.parts:
                    t0 = time.process_time()
                    fns[part](feeds[part])
                    if r >= args.warmup:
                        times[name][part].append(time.process_time() - t0)
            if r >= args.warmup:
                print(f"  round {r - args.warmup + 1}/{args.rounds}: " + "  ".join(
                    f"{n}/{p} {times[n][p][-1]:.3f}s" for n in table for p in args.parts), flush=True)
    stats = {n: {p: summarize(times[n][p], args.rounds, args.warmup) for p in args.parts} for n in table}
    ratios = {p: {n: stats[n][p]["median_s"] / stats["mage_fast"][p]["median_s"] for n in table if n != "mage_fast"}
              for p in args.parts}
    print("\npart  path                 median CPU s   IQR s     rel. error   median / mage_fast's")
    for p in args.parts:
        for n in table:
            s = stats[n][p]
            ratio = "" if n == "mage_fast" else f"{ratios[p][n]:.3f}"
            print(f"{p:<5} {n:<20} {s['median_s']:>10.3f}   {s['iqr_s']:>8.3f}   {errors[n][p]:>9.1e}   {ratio}")
    result = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "out"},
              "timing": "process CPU time per call, paths alternating in each round",
              "peers": runtimes.describe() if runtimes else {}, "stats": stats,
              "ratio_of_medians_over_mage_fast": ratios, "relative_error_vs_torch_reference": errors}
    if runtimes:
        runtimes.close()
    path = write_json(result, args.out, f"exact_vs_peers_{args.model}_b{args.batch}.json")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
