"""How much the tokenizer's pixel decode alone moves the yardstick's Frechet distance: the exact
mode's seed-0 token ids (read from a ``decode_quality.py --exact-cache`` directory) decoded by the
official fp32 decode and by the decoding modes' copies (channels-last fp32, channels-last bf16),
each against the yardstick's test images and against the exact samples.

    PYTHONPATH=. python benchmarks/decode_quality.py --modes bf16 --exact-cache /work/dq_cache   # fills it
    PYTHONPATH=. python benchmarks/pixel_decode_quality.py --exact-cache /work/dq_cache [--copies bf16]

The official decode must give back the cached exact features (distance ~0): a check that the cache
matches the model.
"""
import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_quality as dq  # noqa: E402
from common import result_name, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exact-cache", required=True, metavar="DIR", help="a decode_quality.py --exact-cache directory")
    ap.add_argument("--copies", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"],
                    help="the channels-last tokenizer copies to decode with, beside the official (default: bf16 fp32)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--out", default=None, help="default: results/pixel_decode_quality_<model>_cpu_<kind>.json, "
                                                  "<kind> the machine kind (benchmarks/results/README.md)")
    a = ap.parse_args(argv)
    if a.threads < 1:
        ap.error(f"--threads must be >= 1, got {a.threads}")
    from mage_fast.cli import load_model
    from mage_fast.decoding.quant import fast_tokenizer
    torch.set_num_threads(a.threads)
    ys = dq.read_yardstick(dq.YARDSTICK)
    model, ckpt = load_model(ys.get("ckpt"), None)
    model.eval()
    hits = [torch.load(f, map_location="cpu", weights_only=True)
            for f in sorted(glob.glob(os.path.join(a.exact_cache, "exact_*.pt")))]
    hits = [h for h in hits if h["key"]["seed"] == ys["seeds"][0] and h["key"]["ckpt"] == os.path.abspath(ckpt)]
    if not hits:
        raise SystemExit(f"error: no exact run of {ckpt} with seed {ys['seeds'][0]} in {a.exact_cache}; "
                         f"run decode_quality.py --exact-cache {a.exact_cache} first")
    ids, ex_feat, size = hits[0]["ids"], hits[0]["features"], hits[0]["key"]["feature_size"]
    net = dq._efficientnet()
    ref = dq.features(net, dq.load_test_images(ids.shape[0], int(ys.get("reference", {}).get("seed", 0)),
                                            model.img_size), size)
    copies = [("fp32_official", None)] + [(f"{c}_channels_last", fast_tokenizer(
        model, torch.bfloat16 if c == "bf16" else torch.float32)) for c in a.copies]
    out = {"checkpoint": ckpt, "num_samples": int(ids.shape[0]), "feature_size": size, "decodes": {}}
    with torch.no_grad():
        for name, vq in copies:
            imgs = model.decode_tokens(ids, chunk=250, tokenizer=vq)
            f = dq.features(net, dq.to_8bit(imgs), size)
            out["decodes"][name] = {"frechet_vs_test": dq.fd(f, ref), "frechet_vs_exact_samples": dq.fd(f, ex_feat)}
            print(f"  {name:20s} Frechet to test {out['decodes'][name]['frechet_vs_test']:8.3f}, "
                  f"to the exact samples {out['decodes'][name]['frechet_vs_exact_samples']:.3f}", flush=True)
    print("wrote", write_json(out, a.out, result_name("pixel_decode_quality", torch.device("cpu"),
                                                            os.path.splitext(os.path.basename(ckpt))[0])))


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
