"""Iterative-decoding throughput: mage_fast against the official-equivalent eager path, one run.

Both paths run the same model and weights (random unless --ckpt) at the same batch size:

- official: the official ``gen_image`` loop (``mage_fast.official_gen_image``) with every op on its
  plain-torch reference (``force_backend("torch")``): fp32 q.k attention with autocast off, all
  2025 logits, ``Categorical`` sampling, NumPy Gumbel noise, a full sort and host syncs per step.
- mage_fast: ``mage_fast.generate(rng="torch")``: dispatched ops (SDPA/flash attention, fused
  kernels where built), only the 1024 code logits of the 256 image rows, counter-based random
  numbers, exact-k re-masking, no host sync in the loop; bf16 autocast on CUDA.

Reported per path: ms per decoding step (median and spread over repeated single steps) and
images/s for whole generations (T steps plus the VQGAN decode). JSON goes to benchmarks/results/.

    python benchmarks/decode_throughput.py                     # offline default (ViT-B, random weights)
    python benchmarks/decode_throughput.py --ckpt mage-vitb-1600.pth --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mage_fast  # noqa: E402
from common import device_tag, environment, print_header, summarize, time_fn, write_json  # noqa: E402
from mage_fast.models import MODEL_FACTORIES  # noqa: E402
from mage_fast.ops import decode_step, force_backend, image_keys  # noqa: E402
from mage_fast.sampling import _official_remask, mask_schedule  # noqa: E402


def build(args, device):
    torch.manual_seed(0)
    if args.ckpt:
        model = MODEL_FACTORIES[args.model](vqgan_ckpt_path=None)
        mage_fast.load_checkpoint(model, args.ckpt)
    else:
        model = MODEL_FACTORIES[args.model](vqgan_ckpt_path=None)  # random weights: same FLOPs
    return model.to(device).eval()


def official_step(model, ids, step, T, temperature):
    """One step of the official loop (network pass + official re-masking)."""
    B = ids.shape[0]
    full = torch.cat([torch.full((B, 1), model.fake_class_label, device=ids.device, dtype=torch.long), ids], 1)
    x = model.token_emb(full)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)
    logits = model.forward_decoder(x, torch.zeros_like(full), full == model.mask_token_label)[:, 1:, :model.codebook_size]
    return _official_remask(ids, logits, step, T, temperature, model.mask_token_label, model.seq_len)[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base", choices=sorted(MODEL_FACTORIES))
    p.add_argument("--ckpt", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="default: 1 on CPU, 64 on CUDA")
    p.add_argument("--num-iter", type=int, default=20)
    p.add_argument("--temperature", type=float, default=6.0)
    p.add_argument("--step-repeats", type=int, default=None, help="timed single steps (default 5 CPU / 50 CUDA)")
    p.add_argument("--gen-repeats", type=int, default=None, help="timed whole generations (default 2 CPU / 5 CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_throughput_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    B = args.batch_size or (64 if cuda else 1)
    step_reps = args.step_repeats or (50 if cuda else 5)
    gen_reps = args.gen_repeats or (5 if cuda else 2)
    T, temp = args.num_iter, args.temperature
    env = environment(device)
    print_header(f"decode throughput: {args.model}, batch {B}, T={T}, temperature {temp}", env)
    model = build(args, device)
    L, mask_id = model.seq_len, model.mask_token_label
    ids0 = torch.full((B, L), mask_id, dtype=torch.long, device=device)
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    keys = image_keys(0, torch.arange(B, device=device))
    sched = mask_schedule(T, L)

    def fast_step():
        with ac:
            logits = model.code_logits(ids0)
        return decode_step(logits, ids0, keys, 0, sched[0], temp * (1 - 1 / T), mask_id)

    def official_step_ref():
        with force_backend("torch"):
            return official_step(model, ids0, 0, T, temp)

    def fast_gen():
        with ac:
            return mage_fast.generate(model, B, num_iter=T, temperature=temp, seed=0, rng="torch")

    def official_gen():
        with force_backend("torch"):
            return mage_fast.official_gen_image(model, B, seed=0, num_iter=T, choice_temperature=temp)

    paths = {"official": (official_step_ref, official_gen), "mage_fast": (fast_step, fast_gen)}
    results = {}
    with torch.inference_mode():
        # Repeats alternate between the paths (ABAB...), so load from other processes falls on both.
        for kind, reps, warm in (("step", step_reps, 1), ("generate", gen_reps, 1 if cuda else 0)):
            for name, fns in paths.items():
                time_fn(fns[0 if kind == "step" else 1], device, 0, warmup=warm)
            runs = {name: [] for name in paths}
            for _ in range(reps):
                for name, fns in paths.items():
                    runs[name].append(time_fn(fns[0 if kind == "step" else 1], device, 1, warmup=0)["median_s"])
            for name in paths:
                results.setdefault(name, {})[kind] = summarize(runs[name], reps, warm)
        for name in paths:
            st, gt = results[name]["step"], results[name]["generate"]
            results[name].update(ms_per_step=1e3 * st["median_s"], images_per_s=B / gt["median_s"])
            print(f"  {name:<10} {1e3 * st['median_s']:9.1f} ms/step (min {1e3 * st['min_s']:.1f}, max "
                  f"{1e3 * st['max_s']:.1f}, n={step_reps}) | {B / gt['median_s']:8.3f} images/s "
                  f"(generation median {gt['median_s']:.2f} s, IQR {gt['iqr_s']:.2f} s, n={gen_reps})")
    speed_step = results["official"]["ms_per_step"] / results["mage_fast"]["ms_per_step"]
    speed_img = results["mage_fast"]["images_per_s"] / results["official"]["images_per_s"]
    print(f"  speed-up: {speed_step:.2f}x per step, {speed_img:.2f}x images/s")
    out = {"benchmark": "decode_throughput", "model": args.model, "checkpoint": args.ckpt or "random weights",
           "batch_size": B, "num_iter": T, "temperature": temp, "environment": env, "paths": results,
           "speedup_step": speed_step, "speedup_images_per_s": speed_img,
           "autocast": "bf16" if cuda else "none (fp32)"}
    path = write_json(out, args.out, f"decode_throughput_{device_tag(device)}.json")
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
