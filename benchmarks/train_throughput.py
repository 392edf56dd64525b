"""Training throughput: the official-equivalent step against mage_fast's, alternating in one run.

    python benchmarks/train_throughput.py                                   # ViT-B, 256 px, batch 4 (CPU)
    python benchmarks/train_throughput.py --model shipped --batch_size 32   # the shipped model's size
    python benchmarks/train_throughput.py --model vit_base --batch_size 64  # a GPU

Paths (each with its own copy of the same initial weights and its own AdamW):
  reference      the official forward: tokenizer, masked encoder, decoder with the full MLM head
                 (logits for every position and vocabulary column), forward_loss; every op on its
                 plain-torch reference; torch's default AdamW. fp32.
  fast           mage_fast's step from images: the tokenizer's channels-last fp32 copy (Winograd
                 convolutions, fused GroupNorm + SiLU on the CPU), the default op dispatch (the CPU
                 training attention, the hashed dropout), the fused MLM head + loss (code logits at
                 masked rows only),
                 torch's fused AdamW. fp32.
  fast-ids       the same from token ids (a token cache: no tokenizer in the step).
  fast-bf16      fast under bf16 autocast (the tokenizer stays fp32, so the ids are the same);
  fast-bf16-ids  by default only where the device multiplies bf16 in hardware (AMX,
                 AVX512-BF16, a GPU).
Each round runs one step of every path in turn (the machine's speed drifts: only same-run ratios
count). A step is split into tokenizer, encoder, decoder, head + loss (forward and backward each;
the backward split by gradient hooks at the section boundaries) and optimizer. Before timing, the
fp32 paths are run once on the same images and masks with dropout off: their losses and gradients
are compared and the largest differences reported. (With dropout on, the reference draws torch's
dropout numbers and the fast paths the hashed ones of mage_fast.ops.dropout.) Peak memory: the peak resident set (CPU) or CUDA max allocated
of a fresh subprocess running warm-up + one step of that path alone (VmHWM on Linux). The output names each path's
speed against the reference as ``<path> <ratio>x``; JSON to benchmarks/results/.

Products floor (``--no_floor`` skips it): every matrix product, convolution and fused attention of one
step from token ids is recorded with every op on its plain-torch reference (the products the step's
mathematics needs, without a fast backend's recomputation), then each distinct one is replayed alone
on fresh tensors of the same shapes, strides and dtype (best of 3) and the times are summed. The
step's time above the floor is everything else (norms, GELU, softmax, dropout, casts, copies, the
optimizer); the reference's median over the floor (plus the measured tokenizer time of a path from
images) bounds the speed-up that any step running the same products in the same precision can reach
with this machine's matrix libraries.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

PATHS = ("reference", "fast", "fast-ids", "fast-bf16", "fast-bf16-ids")
SECTIONS = ("tokenizer", "encoder", "decoder", "head_loss", "encoder_bwd", "decoder_bwd", "head_loss_bwd",
            "optimizer")
SHIPPED = os.path.join(REPO, "mage_fast", "assets", "mage_fmnist256.pt")


def build(args):
    """(model, device): the benchmark's MAGE with random weights (ViT presets, the official
    tokenizer's sizes) or the shipped model (its own weights)."""
    import torch
    import mage_fast
    from functools import partial
    sys.path.insert(0, os.path.join(REPO, "train"))
    from pretrain import OFFICIAL_VQGAN, PRESETS, TINY_VQGAN

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.model == "shipped":
        model = mage_fast.MAGE.from_pretrained(SHIPPED)
    else:
        vq = dict(TINY_VQGAN if args.model == "tiny" else OFFICIAL_VQGAN)
        if args.ch_mult:
            vq["ch_mult"] = [int(c) for c in args.ch_mult.split(",")]
        model = mage_fast.MAGE(**PRESETS[args.model], img_size=args.img_size, vqgan_config=vq, vqgan_ckpt_path=None,
                               norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    model = model.to(dev).train()
    model.check_input_range = False
    for p in model.vqgan.parameters():
        p.requires_grad_(False)
    return model, dev


class Path:
    """One path's model copy, optimizer and step, with per-section timings."""

    def __init__(self, name: str, model, dev):
        import torch
        from mage_fast.training import adamw, param_groups
        from mage_fast.training.objective import MAGEObjective
        self.name, self.dev = name, dev
        self.model = copy.deepcopy(model)
        self.obj = MAGEObjective(self.model)
        groups = param_groups(self.model, 0.05)
        self.opt = (torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4, betas=(0.9, 0.95))
                    if name == "reference" else adamw(groups, 1e-4))
        self.bf16 = "bf16" in name
        self.from_ids = name.endswith("-ids")

    def _ctx(self):
        import torch
        from mage_fast.ops.dispatch import force_backend
        stack = contextlib.ExitStack()
        if self.name == "reference":
            stack.enter_context(force_backend("torch"))
        stack.enter_context(torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.bf16))
        return stack

    def loss(self, imgs, ids, marks=None):
        """Forward to the loss; ``marks`` (a list) gets (section, time) at each boundary and the
        backward hooks' times."""
        import torch
        m = self.model
        mark = (lambda s: marks.append((s, _now(self.dev)))) if marks is not None else (lambda s: None)
        mark("start")
        with self._ctx():
            if self.from_ids:
                gt = ids
            elif self.name == "reference":
                with torch.no_grad(), torch.autocast(self.dev.type, enabled=False):
                    gt = m.tokenize(imgs)
            else:
                gt = self.obj.tokens(imgs)
            mark("tokenizer")
            h, drop, allm = m.encode_masked(gt)
            mark("encoder")
            x = m.decoder_hidden(h, drop, allm)
            mark("decoder")
            if self.name == "reference":  # the official MlmLayer over every position and column, then the loss
                logits = m.mlm_layer(x, m.token_emb.word_embeddings.weight.detach())
                loss = m.forward_loss(gt, logits, allm.float())
            else:
                loss = m.mlm_layer.loss(x[:, 1:], m.token_emb.word_embeddings.weight.detach(), gt, allm[:, 1:],
                                        m.codebook_size, m.label_smoothing)
            mark("head_loss")
        if marks is not None and torch.is_grad_enabled():
            x.register_hook(lambda g: mark("head_loss_bwd"))
            h.register_hook(lambda g: mark("decoder_bwd"))
        return loss

    def step(self, imgs, ids) -> dict:
        marks = []
        loss = self.loss(imgs, ids, marks)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(("encoder_bwd", _now(self.dev)))
        self.opt.step()
        marks.append(("optimizer", _now(self.dev)))
        t = dict(marks)
        order = ["start", "tokenizer", "encoder", "decoder", "head_loss", "head_loss_bwd", "decoder_bwd",
                 "encoder_bwd", "optimizer"]
        out = {s: t[s] - t[p] for p, s in zip(order, order[1:])}
        out["total"] = t["optimizer"] - t["start"]
        return out


def _now(dev) -> float:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def check_same(model, dev, imgs, ids) -> dict:
    """Loss and gradients of the fp32 paths against the reference, same images and masks, dropout
    off (the reference draws torch's dropout numbers, the fast paths hashed ones)."""
    import torch
    paths = [Path(n, model, dev) for n in ("reference", "fast", "fast-ids")]
    for p in paths:
        for m in p.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    out, ref_grads, ref_loss = {}, None, None
    for p in paths:
        torch.manual_seed(1234)  # the same masks on every path
        loss = p.loss(imgs, ids)
        p.model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: q.grad.double() for n, q in p.model.named_parameters() if q.grad is not None}
        if ref_grads is None:
            ref_grads, ref_loss = grads, float(loss.detach())
            continue
        rel = max(float((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in ref_grads.items())
        out[p.name] = {"loss": float(loss.detach()), "reference_loss": ref_loss,
                       "loss_rel_diff": abs(float(loss.detach()) - ref_loss) / abs(ref_loss),
                       "grad_max_rel_diff": rel, "same_params_with_grad": sorted(grads) == sorted(ref_grads)}
    return out


def peak_memory(args, name: str) -> float | None:
    """MB: the peak of a fresh process running warm-up + one step of ``name`` alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--img_size", str(args.img_size),
           "--ch_mult", args.ch_mult, "--batch_size", str(args.batch_size), "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--memory_of", name]
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if p.returncode:
        print(f"  peak memory of {name}: failed ({p.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])["peak_mb"]


def inputs(model, dev, batch_size: int):
    import torch
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(batch_size, 3, model.img_size, model.img_size, generator=g).to(dev)
    with torch.no_grad():
        ids = model.tokenize(imgs)
    return imgs, ids


def memory_only(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    model, dev = build(args)
    imgs, ids = inputs(model, dev, args.batch_size)
    p = Path(args.memory_of, model, dev)
    del model
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup + 1):
        p.step(imgs, ids)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_rss()
    print(json.dumps({"peak_mb": peak / 2 ** 20}))


PRODUCT_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
               "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def _record_products(path, imgs, ids) -> list:
    """Every matrix product (and convolution, fused attention) that one forward + backward of
    ``path`` runs from token ids, as (op, argument specs), with every op on its plain-torch
    reference: the products the step's mathematics needs, without any recomputation a fast
    backend adds."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from mage_fast.ops.dispatch import force_backend

    calls = []

    def spec(a):
        return (("T", tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor)
                else [spec(x) for x in a] if isinstance(a, (list, tuple)) else a)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in PRODUCT_OPS:
                calls.append((func, spec(args), spec(kwargs or {})))
            return func(*args, **(kwargs or {}))

    from_ids = path.from_ids
    path.from_ids = True
    try:
        with force_backend("torch"), Record():
            loss = path.loss(imgs, ids)
            loss.backward()
    finally:
        path.from_ids = from_ids
        path.model.zero_grad(set_to_none=True)
    return calls


def _sdpa_flops(func, args) -> int:
    """The CPU flash attention's products (torch's FLOP counter has no entry for the CPU op):
    forward Q K^T and P V, backward dV, dP, dQ, dK; 2 FLOPs a multiply-add."""
    (_, (b, h, n, d), _, _), (_, (_, _, s, _), _, _) = (args[1], args[2]) if func.__name__.endswith("backward") \
        else (args[0], args[1])
    return (8 if func.__name__.endswith("backward") else 4) * b * h * n * s * d


def products_floor(path, imgs, ids, reps: int = 3) -> dict:
    """The time the products of one step of ``path`` (tokenizer and optimizer excluded) take on
    their own: each distinct product is replayed on fresh tensors of the same shapes, strides and
    dtype, back to back (best of ``reps``), times how often the step runs it. No implementation of
    the same mathematics in the same precision runs its products faster with this CPU's libraries:
    the step's time above this floor is the part that other work (norms, GELU, softmax, dropout,
    adds, copies, the optimizer) costs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    calls = _record_products(path, imgs, ids)
    distinct: dict = {}  # (op, argument specs) -> [the specs, how often the step runs it]
    for f, a, k in calls:
        distinct.setdefault((f, repr(a), repr(k)), [a, k, 0])[2] += 1

    def make(a):
        if isinstance(a, tuple) and len(a) == 4 and a[0] == "T":
            _, shape, stride, dtype = a
            t = torch.empty_strided(shape, stride, dtype=dtype, device=imgs.device)
            return t.normal_() if dtype.is_floating_point else t.zero_()
        return [make(x) for x in a] if isinstance(a, list) else a

    by_op: dict = {}
    for (func, _, _), (a, k, n) in distinct.items():
        args, kwargs = make(a), {name: make(v) for name, v in k.items()}
        if func.overloadpacket.__name__.startswith("_scaled_dot_product"):
            f = _sdpa_flops(func, a)
        else:
            with FlopCounterMode(display=False) as fc:
                func(*args, **kwargs)
            f = fc.get_total_flops()
        func(*args, **kwargs)  # warm
        best = float("inf")
        for _ in range(reps):
            t0 = _now(imgs.device)
            func(*args, **kwargs)
            best = min(best, _now(imgs.device) - t0)
        op = by_op.setdefault(func.overloadpacket.__name__, {"calls": 0, "gflop": 0.0, "seconds": 0.0})
        op["calls"] += n
        op["gflop"] += n * f / 1e9
        op["seconds"] += n * best
    gflop, seconds = (sum(op[q] for op in by_op.values()) for q in ("gflop", "seconds"))
    return {"products": len(calls), "distinct": len(distinct), "gflop": gflop, "seconds": seconds,
            "gflop_per_s": gflop / seconds if seconds else None, "by_op": by_op}


def _peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM (Linux; ru_maxrss would also count the
    parent's peak, which a forked child inherits), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_args(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_base", choices=["tiny", "vit_base", "vit_large", "shipped"],
                    help="sizes (default: %(default)s); 'shipped' is mage_fmnist256 with its own weights")
    ap.add_argument("--img_size", type=int, default=256, help="image size of the ViT presets (default: %(default)s)")
    ap.add_argument("--ch_mult", default="", help="tokenizer multipliers, e.g. 1,2,2 (default: the official's)")
    ap.add_argument("--batch_size", type=int, default=4, help="images per step (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds, one step of every path each "
                                                          "(default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of every path first (default: %(default)s)")
    ap.add_argument("--paths", nargs="+", default=None, choices=PATHS,
                    help="paths to time (default: the fp32 ones, and the bf16 ones where bf16 is native)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no_floor", action="store_true",
                    help="skip the products floor (each path's matrix products replayed alone)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: benchmarks/results/train_throughput_<tag>_<device>_<kind>.json, "
                         "<kind> the machine kind: benchmarks/results/README.md)")
    ap.add_argument("--memory_of", default=None, choices=PATHS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag in ("batch_size", "rounds", "img_size"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.warmup < 0 or args.threads < 0:
        ap.error("--warmup and --threads must be >= 0")
    if args.model != "shipped" and args.img_size % 16:
        ap.error(f"--img_size must be a multiple of 16, got {args.img_size}")
    if args.model == "shipped" and not os.path.isfile(SHIPPED):
        ap.error(f"--model shipped needs {SHIPPED}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_of:
        return memory_only(args)
    import numpy as np
    import torch
    from common import environment, print_header, result_name, write_json
    from mage_fast.decoding.quant import bf16_native
    if args.threads:
        torch.set_num_threads(args.threads)
    model, dev = build(args)
    paths = args.paths or [p for p in PATHS if "bf16" not in p or bf16_native(dev)]
    env = environment(dev)
    print_header(f"training step: {args.model}, {model.img_size} px, {model.seq_len} tokens, batch {args.batch_size}, "
                 f"{args.rounds} alternating rounds after {args.warmup} warm-up steps", env)
    imgs, ids = inputs(model, dev, args.batch_size)

    check = check_same(model, dev, imgs, ids)
    for n, c in check.items():
        print(f"  {n} vs reference (fp32, same masks): loss {c['loss_rel_diff']:.1e} relative, gradients "
              f"{c['grad_max_rel_diff']:.1e} (largest relative difference of any tensor)")

    runners = [Path(n, model, dev) for n in paths]
    del model
    for _ in range(args.warmup):
        for r in runners:
            r.step(imgs, ids)
    times = {r.name: [] for r in runners}
    for i in range(args.rounds):
        for r in runners:
            times[r.name].append(r.step(imgs, ids))
        print(f"  round {i + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]['total']:.2f} s" for n, t in times.items()),
              flush=True)

    floors, measured = {}, {}  # path -> floor; the reference's, fp32's and bf16's, each measured once
    if not args.no_floor:  # from token ids: a path from images shares its -ids sibling's products
        for r in runners:
            kind = r.name if r.name == "reference" else ("bf16" if r.bf16 else "fp32")
            if kind not in measured:
                measured[kind] = products_floor(r, imgs, ids)
            floors[r.name] = measured[kind]
    results = []
    ref = None
    for name, ts in times.items():
        tot = np.array([t["total"] for t in ts])
        row = {"path": name, "median_s": float(np.median(tot)), "min_s": float(tot.min()), "max_s": float(tot.max()),
               "iqr_s": float(np.percentile(tot, 75) - np.percentile(tot, 25)), "all_s": tot.tolist(),
               "images_per_s": args.batch_size / float(np.median(tot)),
               "sections_median_s": {s: float(np.median([t[s] for t in ts])) for s in SECTIONS}}
        if name in floors:
            row["products_floor"] = floors[name]
        if name == "reference":
            ref = row
        results.append(row)
    del runners, r  # the paths' models and optimizer states (tens of GB at ViT-L), before the memory runs
    import gc
    gc.collect()
    if not args.no_memory:
        for row in results:
            row["peak_mem_mb"] = peak_memory(args, row["path"])
    print(f"\n  {'path':14s} {'img/s':>7s} {'s/step':>7s} [min, max]      " + " ".join(f"{s:>13s}" for s in SECTIONS)
          + "   peak MB")
    for row in results:
        sec = " ".join(f"{row['sections_median_s'][s]:13.3f}" for s in SECTIONS)
        mem = row.get("peak_mem_mb")
        print(f"  {row['path']:14s} {row['images_per_s']:7.2f} {row['median_s']:7.2f} [{row['min_s']:.2f}, "
              f"{row['max_s']:.2f}] {sec}   {mem if mem is None else round(mem)}")
    if ref is not None:
        for row in results:
            row["speedup_vs_reference"] = ref["median_s"] / row["median_s"]
            # the ratio's spread: each path's fastest and slowest step against the reference median
            row["speedup_range"] = [ref["median_s"] / row["max_s"], ref["median_s"] / row["min_s"]]
            if "products_floor" in row:  # the floor, plus the measured tokenizer time of a path from images
                row["speedup_bound"] = ref["median_s"] / (row["products_floor"]["seconds"] + _tokenizer_s(row))
        print("speed-up vs reference: " + ", ".join(f"{r['path']} {r['speedup_vs_reference']:.2f}x"
                                                      for r in results))
        if floors:
            print_floors(results)
    tag = args.model if args.model == "shipped" else f"{args.model}_{model_px(args)}px"
    out = write_json({"env": env, "args": vars(args), "check_fp32_vs_reference": check, "results": results},
                     args.out, result_name("train_throughput", dev, tag))
    print(f"wrote {out}")


def _tokenizer_s(row: dict) -> float:
    """The tokenizer's median seconds in a path's step: none from token ids."""
    return 0.0 if row["path"].endswith("-ids") else row["sections_median_s"]["tokenizer"]


def print_floors(results: list) -> None:
    """Each path's products floor and the speed-up over the reference that it leaves room for
    (``speedup_bound``)."""
    print("\n  products floor (every matrix product of one step from token ids replayed alone, best of 3; "
          "tokenizer and optimizer not included):")
    print(f"  {'path':14s} {'GFLOP':>8s} {'floor s':>8s} {'GFLOP/s':>8s} {'step s':>7s} {'rest s':>7s} "
          f"{'bound':>7s}")
    for row in results:
        fl = row.get("products_floor")
        if fl is None:
            continue
        tok = _tokenizer_s(row)
        print(f"  {row['path']:14s} {fl['gflop']:8.1f} {fl['seconds']:8.2f} {fl['gflop_per_s']:8.1f} "
              f"{row['median_s']:7.2f} {row['median_s'] - fl['seconds'] - tok:7.2f} {row['speedup_bound']:6.2f}x")
    print("  bound: the reference's median over the floor (plus the path's measured tokenizer time when it "
          "starts from images): no step that runs these products at this CPU's library speed gets further")


def model_px(args) -> int:
    return args.img_size


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
