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
                "--mode", "exact", "fast", "--peers", "none", "--startup-repeats", "1",
                "--out", str(out)])  # peers: test_peer_runtimes.py
    written = json.loads(out.read_text())
    start = written["startup"]  # import and model build, reported apart from the generations
    assert set(start["import"]) >= {"torch", "mage_fast"} and start["import"]["mage_fast"]["cpu"]["median_s"] > 0
    assert {"tiny, from a checkpoint", "tiny, random weights"} <= set(start["build"])
    assert any(k.startswith("shipped") for k in start["build"])
    assert all(v["cpu"]["repeats"] == 1 and v["wall"]["median_s"] > 0 for v in start["build"].values())
    res = written["results"]["1"]
    assert set(res["paths"]) == {"official", "exact", "fast", "vqgan_decode"}
    assert {"exact", "fast"} <= set(res["speedup_images_per_s_vs_official"])
    assert all(v["median_s"] > 0 for v in res["paths"].values())
    cpu_ratios = res["speedup_process_cpu_vs_official"]  # the ranking to read on a shared machine
    assert set(cpu_ratios) == {"exact", "fast"}
    for name, r in cpu_ratios.items():
        assert r["median"] == res["process_cpu_s"]["official"][0] / res["process_cpu_s"][name][0]
    from mage_fast.decoding import MODES, bf16_native
    cpu = bench.default_modes(torch.device("cpu"))
    assert cpu[0] == "exact" and "fast" in cpu and set(cpu) <= set(MODES)
    assert ("fast_bf16" in cpu) == bf16_native(torch.device("cpu"))  # bf16 only where it is fast


def test_mode_all_leaves_out_what_is_slower_than_fp32_here(monkeypatch, capsys):
    """--mode all: every named mode that is fast on this device; int8 without int8 units (many times
    slower than exact on an AVX2-only CPU) and bf16 without bf16 units are named and left out."""
    import decode_throughput as bench
    from mage_fast.decoding import MODES, quant
    monkeypatch.setattr(quant, "cpu_int8_units", lambda: None)
    monkeypatch.setattr(quant, "cpu_bf16_units", lambda: None)
    modes = bench.all_modes(torch.device("cpu"))
    assert set(modes) == {m for m in MODES if MODES[m].quant == "none"}
    note = capsys.readouterr().out
    assert "int8" in note and "cached_int8" in note and "fast_bf16" in note
    monkeypatch.setattr(quant, "cpu_int8_units", lambda: "AMX")
    monkeypatch.setattr(quant, "cpu_bf16_units", lambda: "AMX")
    assert bench.all_modes(torch.device("cpu"), exclude=["exact"]) == [m for m in MODES if m != "exact"]
