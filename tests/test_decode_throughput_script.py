"""benchmarks/decode_throughput.py end to end at a tiny size: every asked-for path is timed against
the official one in the same run and lands in the JSON; 'all' expands to every named mode."""
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def test_decode_throughput_tiny_run_writes_every_path(tmp_path, one_thread):
    import decode_throughput as bench
    out = tmp_path / "d.json"
    bench.main(["--model", "tiny", "--num-iter", "2", "--batch-sizes", "1", "--gen-repeats", "1", "--no-warmup",
                "--mode", "exact", "fast", "--out", str(out)])
    res = json.loads(out.read_text())["results"]["1"]
    assert set(res["paths"]) == {"official", "exact", "fast", "vqgan_decode"}
    assert {"exact", "fast"} <= set(res["speedup_images_per_s_vs_official"])
    assert all(v["median_s"] > 0 for v in res["paths"].values())
    from mage_fast.decoding import MODES, bf16_native
    cpu = bench.default_modes(torch.device("cpu"))
    assert cpu[0] == "exact" and "fast" in cpu and set(cpu) <= set(MODES)
    assert ("fast_bf16" in cpu) == bf16_native(torch.device("cpu"))  # bf16 only where it is fast
