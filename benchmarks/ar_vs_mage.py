"""Autoregressive (VIM) sampling against MAGE iterative decoding: same-size models, one run.

Both stage-2 models have the same width and the same number of transformer blocks (VIM: one
causal stack of depth = MAGE encoder depth + decoder depth) and share one ViT-VQGAN tokenizer,
so the decode to pixels costs the same. Paths, all unconditional, batch B, random weights (the
cost of sampling does not depend on the weights):

- vim_cached: L network passes of one position each against a key/value cache.
- vim_uncached: L full causal passes over the growing prefix (the cache's baseline).
- mage_T{8,12,20}: ``mage_fast.generate(rng="torch")``, T passes over all L+1 positions.

Reported per path: images/s over whole generations (tokens and pixel decode; median, min, max,
IQR), network forward passes per image and token-block evaluations per image (both counted with
forward hooks during one generation), and the ratio of MAGE's images/s to cached VIM's. JSON
to benchmarks/results/ar_vs_mage_<device>.json, and a bar chart next to it (matplotlib if
installed, else drawn with PIL).

    python benchmarks/ar_vs_mage.py                        # tiny models, CPU-sized
    python benchmarks/ar_vs_mage.py --size base            # ViT-B-sized (for a GPU)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mage_fast  # noqa: E402
from common import RESULTS_DIR, environment, print_header, result_name, time_fn, write_json  # noqa: E402
from mage_fast.models import count_parameters  # noqa: E402
from mage_fast.models.mage import mage_vit_base_patch16, mage_vit_tiny  # noqa: E402
from mage_fast.models.vim import vim_base, vim_tiny  # noqa: E402
from mage_fast.models.vit_vqgan import vit_vqgan_base, vit_vqgan_tiny  # noqa: E402
from mage_fast.ops import decode_step, image_keys  # noqa: E402
from mage_fast.ops.decode_step import decode_step_op  # noqa: E402
from mage_fast.sampling import mask_schedule  # noqa: E402
from mage_fast.vim_sampling import generate as vim_generate  # noqa: E402
from mage_fast.vim_sampling import sample_next  # noqa: E402

SIZES = {"tiny": (vit_vqgan_tiny, mage_vit_tiny, vim_tiny), "base": (vit_vqgan_base, mage_vit_base_patch16, vim_base)}


def build(size: str, img_size: int, patch_size: int, codebook: int, device):
    make_vq, make_mage, make_vim = SIZES[size]
    torch.manual_seed(0)
    vq = make_vq(img_size=img_size, patch_size=patch_size, n_embed=codebook)
    mage = make_mage(img_size=img_size, tokenizer=vq)
    vim = make_vim(tokenizer=vq, img_size=img_size)
    return vq.to(device).eval(), mage.to(device).eval(), vim.to(device).eval()


class PassCounter:
    """Counts network passes (calls of ``head``) and token rows through each block (B*N per call)."""

    def __init__(self, head: torch.nn.Module, blocks):
        self.passes = self.block_tokens = 0
        self.handles = [head.register_forward_hook(self._on_head)]
        self.handles += [b.register_forward_hook(self._on_block) for b in blocks]

    def _on_head(self, module, args, out):
        self.passes += 1

    def _on_block(self, module, args, out):
        self.block_tokens += args[0].shape[0] * args[0].shape[1]

    def close(self):
        for h in self.handles:
            h.remove()


def count_passes(fn, head, blocks, batch_size: int) -> dict:
    c = PassCounter(head, blocks)
    try:
        fn()
    finally:
        c.close()
    return {"forward_passes_per_image": c.passes, "block_token_evals_per_image": c.block_tokens / batch_size}


def step_breakdown(vq, mage, vim, B, device, reps, ac_dtype) -> dict:
    """Milliseconds of one network pass and of one sampling step, per model: MAGE's first decoding
    step (all L positions masked) and a VIM cached step at position L/2 (cache half full)."""
    L, mask_id = mage.seq_len, mage.mask_token_label
    ac = torch.autocast(device.type, dtype=ac_dtype, enabled=ac_dtype is not None)
    ids = torch.full((B, L), mask_id, dtype=torch.long, device=device)
    keys = image_keys(0, torch.arange(B, device=device))
    n_masked = mask_schedule(8, L)[0]
    with ac:
        logits = mage.code_logits(ids)
    half = vim.seq_len // 2
    cache = vim.new_cache(B, dtype=ac_dtype)
    prefix = torch.full((B, half), vim.uncond_id, dtype=torch.long, device=device)
    with ac:
        vim.step(prefix, cache)  # prefill to half the length
    tok = prefix[:, :1]

    def vim_pass():
        cache.length = half
        with ac:
            return vim.step(tok, cache)

    def mage_pass():
        with ac:
            return mage.code_logits(ids)

    vim_logits = vim_pass()
    timings = {"mage_network_pass": mage_pass,
               "mage_sampling_step": lambda: decode_step(logits, ids, keys, 0, n_masked, 4.5, mask_id),
               "vim_network_pass": vim_pass,
               "vim_sampling_step": lambda: sample_next(vim_logits, keys, half)}
    ms = {k: 1e3 * time_fn(fn, device, reps, warmup=1)["median_s"] for k, fn in timings.items()}
    return ms, decode_step_op.select(logits, ids, keys, 0, n_masked, 4.5, mask_id).name


def plot(results: dict, title: str, path: str) -> str:
    names = list(results)
    ips = [results[n]["images_per_s"] for n in names]
    passes = [results[n]["forward_passes_per_image"] for n in names]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(names, ips, passes, title, path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, vals, label in ((axes[0], ips, "images / s (higher is better)"),
                            (axes[1], passes, "network passes per image")):
        bars = ax.bar(names, vals, color=["#c0504d" if n.startswith("vim") else "#4f81bd" for n in names])
        ax.bar_label(bars, [f"{v:.3g}" for v in vals])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_pil(names, ips, passes, title, path) -> str:
    from PIL import Image, ImageDraw, ImageFont
    W, H, pad = 1100, 460, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:
        font = ImageFont.load_default()
    d.text((pad, 10), title, fill="black", font=font)
    panel_w = (W - 3 * pad) // 2
    for p, (vals, label) in enumerate(((ips, "images / s (higher is better)"),
                                       (passes, "network passes per image"))):
        x0, y0, y1 = pad + p * (panel_w + pad), 70, H - 70
        d.text((x0, 40), label, fill="black", font=font)
        d.line([(x0, y1), (x0 + panel_w, y1)], fill="black")
        d.line([(x0, y0), (x0, y1)], fill="black")
        top = max(vals) or 1.0
        slot = panel_w / len(vals)
        for i, (n, v) in enumerate(zip(names, vals)):
            bx0, bx1 = x0 + i * slot + slot * 0.15, x0 + (i + 1) * slot - slot * 0.15
            by = y1 - (y1 - y0 - 20) * v / top
            d.rectangle([bx0, by, bx1, y1], fill="#c0504d" if n.startswith("vim") else "#4f81bd")
            d.text((bx0, by - 18), f"{v:.3g}", fill="black", font=font)
            d.text((bx0 - 4, y1 + 8 + 16 * (i % 2)), n, fill="black", font=font)
    img.save(path)
    return path


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser  # one-line usage errors, defaults in --help
    p = ArgumentParser(description=__doc__)
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="tiny (CPU) or base (ViT-B-sized, GPU)")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--patch-size", type=int, default=16, help="tokenizer patch: L = (img/patch)^2 (default 256)")
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--mage-steps", default="8,12,20")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per path (default 3 CPU / 5 CUDA)")
    p.add_argument("--no-uncached", action="store_true", help="skip the uncached VIM baseline")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/ar_vs_mage[_<size>]_<device>_<kind>[_b<B>].json, <kind> "
                        "the machine kind: benchmarks/results/README.md)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    B = args.batch_size or (64 if cuda else 8)
    reps = args.repeats or (5 if cuda else 3)
    steps = [int(s) for s in args.mage_steps.split(",")]
    ac_dtype = torch.bfloat16 if cuda else None
    env = environment(device)
    vq, mage, vim = build(args.size, args.img_size, args.patch_size, args.codebook, device)
    L = vim.seq_len
    print_header(f"AR (VIM) vs MAGE decoding: {args.size}, {args.img_size}px, L={L}, batch {B}, "
                 f"{'bf16 autocast' if cuda else 'fp32'}", env)
    params = {"vim": vim.num_parameters(), "mage": count_parameters(mage) - count_parameters(mage.vqgan),
              "tokenizer": count_parameters(vq)}
    print(f"  parameters: VIM {params['vim'] / 1e6:.2f}M | MAGE {params['mage'] / 1e6:.2f}M | "
          f"tokenizer {params['tokenizer'] / 1e6:.2f}M")

    def vim_fn(use_cache):
        return lambda: vim_generate(vim, B, seed=0, use_cache=use_cache, autocast_dtype=ac_dtype)

    def mage_fn(T):
        def run():
            with torch.autocast(device.type, dtype=ac_dtype, enabled=ac_dtype is not None):
                return mage_fast.generate(mage, B, num_iter=T, temperature=4.5, seed=0, rng="torch")
        return run

    paths = {"vim_cached": (vim_fn(True), vim.head, vim.blocks)}
    if not args.no_uncached:
        paths["vim_uncached"] = (vim_fn(False), vim.head, vim.blocks)
    for T in steps:
        paths[f"mage_T{T}"] = (mage_fn(T), mage.mlm_layer, list(mage.blocks) + list(mage.decoder_blocks))

    results = {}
    with torch.inference_mode():
        g = vq.grid
        codes = torch.zeros(B, g, g, dtype=torch.long, device=device)
        dec = time_fn(lambda: vq.decode_code(codes), device, reps, warmup=1)
        print(f"  tokenizer decode alone: {1e3 * dec['median_s']:.1f} ms per batch (shared by every path)")
        breakdown, step_backend = step_breakdown(vq, mage, vim, B, device, max(reps, 5), ac_dtype)
        print("  per step (ms, median): " + ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items())
              + f" (MAGE decode_step backend: {step_backend})")
        for name, (fn, head, blocks) in paths.items():
            counts = count_passes(fn, head, blocks, B)  # also the warm-up
            t = time_fn(fn, device, reps, warmup=0)
            results[name] = dict(counts, timing=t, images_per_s=B / t["median_s"])
            print(f"  {name:<13} {B / t['median_s']:9.3f} images/s (generation median {t['median_s']:.3f} s, "
                  f"min {t['min_s']:.3f}, max {t['max_s']:.3f}, IQR {t['iqr_s']:.3f}, n={reps}) | "
                  f"{counts['forward_passes_per_image']} passes/image, "
                  f"{counts['block_token_evals_per_image']:.0f} block-token evals/image")
    base = results["vim_cached"]["images_per_s"]
    ratios = {f"mage_T{T}_over_vim_cached": results[f"mage_T{T}"]["images_per_s"] / base for T in steps}
    if "vim_uncached" in results:
        ratios["vim_cached_over_uncached"] = base / results["vim_uncached"]["images_per_s"]
    print("  ratios (images/s): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    out = {"benchmark": "ar_vs_mage", "size": args.size, "img_size": args.img_size, "patch_size": args.patch_size,
           "seq_len": L, "codebook": args.codebook, "batch_size": B, "weights": "random",
           "autocast": "bf16" if cuda else "none (fp32)", "parameters": params, "environment": env,
           "tokenizer_decode": dec, "step_breakdown_ms": breakdown, "decode_step_backend": step_backend,
           "paths": results, "ratios": ratios,
           "sampling": {"vim": "unconditional, temperature 1.0, no top-k/top-p, counter-based Gumbel-max",
                        "mage": "unconditional, rng='torch', temperature 4.5, cosine schedule"}}
    name = result_name("ar_vs_mage", device, None if args.size == "tiny" else args.size,
                       None if args.batch_size is None else f"b{B}", ext="")
    path = write_json(out, args.out, name + ".json")
    png = plot(results, f"VIM vs MAGE, {args.size}, L={L}, batch {B}, {env['device']}",
               os.path.splitext(path)[0] + ".png" if args.out else os.path.join(RESULTS_DIR, name + ".png"))
    print(f"  wrote {path} and {png}")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
