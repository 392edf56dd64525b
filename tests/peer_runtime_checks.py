"""The peer runtimes (benchmarks/peers.py) and their paths in benchmarks/decode_throughput.py.

The exact network pass and the pixel decode, exported to ONNX and run in ONNX Runtime and OpenVINO
fp32, agree with mage_fast's exact pass at the fixture's tiny size: logits within LOGIT_TOL of the
largest logit, images within PIXEL_TOL of the largest pixel (float32 summation order differs between
runtimes; seen: about 1e-6 and 3e-5), and a short sampling run through a peer draws exact mode's ids.
The runtimes come with the ``test`` extra (and ``peers``)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import mage_fast
from mage_fast.info import cpu_bf16_native_flags, cpu_flags, cpu_instruction_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

LOGIT_TOL = 1e-5  # max |peer - exact| over max |exact|, fp32 network pass
PIXEL_TOL = 1e-4  # the same for the pixel decode
FP32_PEERS = ("onnxruntime_fp32", "openvino_fp32")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


@pytest.fixture(scope="module")
def runtimes(tiny):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    import peers
    names = list(FP32_PEERS) + (["openvino_bf16"] if cpu_bf16_native_flags() else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with peers.PeerRuntimes(tiny, names, threads=1) as pr:
        pr.prepare(2)
        yield pr
    torch.set_num_threads(threads)


def _states(model, B: int) -> list:
    """Decoding states: all masked, half masked, one masked per row (random known ids)."""
    g = torch.Generator().manual_seed(1)
    L, mask = model.seq_len, model.mask_token_label
    out = [torch.full((B, L), mask, dtype=torch.long)]
    ids = torch.randint(0, model.codebook_size, (B, L), generator=g)
    out.append(torch.where(torch.rand(B, L, generator=g) < 0.5, mask, ids))
    one = ids.clone()
    one[:, 7] = mask
    out.append(one)
    return out


def test_export_leaves_the_model_in_eval_mode(tiny, runtimes):
    assert not tiny.training and not any(m.training for m in tiny.modules())


@pytest.mark.parametrize("name", FP32_PEERS)
def test_fp32_peer_network_pass_matches_the_exact_pass(tiny, runtimes, name):
    with torch.inference_mode():
        for ids in _states(tiny, 2):
            ref = tiny.code_logits(ids, None, check=False)
            got = runtimes.network_pass(name, ids, None)
            assert got.shape == ref.shape and got.dtype == torch.float32
            err = (got - ref).abs().max().item() / ref.abs().max().item()
            assert err <= LOGIT_TOL, f"{name}: relative logit error {err:.2e} > {LOGIT_TOL}"
        cls = tiny.class_token_ids(torch.tensor([3, 5]))  # a class in the class slot is an input of the graph
        ref = tiny.code_logits(ids, cls, check=False)
        assert (runtimes.network_pass(name, ids, cls) - ref).abs().max().item() <= LOGIT_TOL * ref.abs().max().item()


@pytest.mark.parametrize("name", FP32_PEERS)
def test_fp32_peer_pixel_decode_matches_the_exact_decode(tiny, runtimes, name):
    ids = torch.randint(0, tiny.codebook_size, (2, tiny.seq_len), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = tiny.decode_tokens(ids)
        got = runtimes.pixel_decode(name, ids)
        assert (got - ref).abs().max().item() <= PIXEL_TOL * ref.abs().max().item()
        # one image per call (decode_chunk=1) exports and opens batch-1 sessions on first use
        one_by_one = runtimes.pixel_decode(name, ids, chunk=1)
        assert (one_by_one - ref).abs().max().item() <= PIXEL_TOL * ref.abs().max().item()


@pytest.mark.parametrize("name", FP32_PEERS)
def test_sampling_through_an_fp32_peer_draws_exact_modes_ids(tiny, runtimes, name):
    """The peer is a mode of generate()'s own loop: same random numbers, same re-masking."""
    kw = dict(num_iter=6, temperature=6.0, seed=3, rng="torch", return_ids=True)
    with torch.inference_mode():
        ref_imgs, ref_ids = mage_fast.generate(tiny, 2, mode="exact", **kw)
        imgs, ids = mage_fast.generate(tiny, 2, mode=runtimes.mode(name), **kw)
    assert torch.equal(ids, ref_ids)
    assert (imgs - ref_imgs).abs().max().item() <= PIXEL_TOL * ref_imgs.abs().max().item()


def test_peer_precision_is_what_the_runtime_reports(runtimes):
    """fp32 peers run fp32 (OpenVINO's default would be bf16 on a CPU with bf16 units); the bf16
    peer exists only where the CPU multiplies bf16 natively, and then runs bf16."""
    import peers
    d = runtimes.describe()
    for name in FP32_PEERS:
        assert d[name]["precision"] == "fp32" and d[name]["runtime_reports"] == ["fp32"]
    if cpu_bf16_native_flags():
        assert d["openvino_bf16"]["runtime_reports"] == ["bf16"]
    else:
        assert "AVX512-BF16" in peers.unavailable(["openvino_bf16"])["openvino_bf16"]
    assert "openvino_bf16" in peers.unavailable(["openvino_bf16"], flags={"avx2", "avx512f"})
    assert peers.unavailable(["openvino_bf16"], flags={"avx2", "amx_bf16"}) == {}


def test_a_missing_runtime_is_named_with_the_extra(monkeypatch):
    import peers
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    why = peers.unavailable()
    assert set(why) >= {"onnxruntime_fp32"} and "onnxruntime" in why["onnxruntime_fp32"]
    assert "mage_fast[peers]" in why["onnxruntime_fp32"]
    assert "openvino_fp32" not in why
    monkeypatch.setitem(sys.modules, "onnx", None)  # the exporter needs onnx: no peer can run
    assert set(peers.unavailable()) == set(peers.PEERS)


def test_cpu_instruction_sets_name_each_set_present_or_absent():
    zen3 = cpu_instruction_sets({"avx2", "fma", "sse4_2"})
    assert zen3["present"] == ["AVX2"] and zen3["summary"].startswith("AVX2; absent: AVX-512")
    zen5 = cpu_instruction_sets({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"})
    assert zen5["present"] == ["AVX2", "AVX-512 (F/BW/VL)", "AVX512-BF16", "AVX512-VNNI"]
    assert zen5["absent"] == ["AVX-VNNI", "AMX"]
    spr = cpu_instruction_sets({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni",
                                "amx_bf16", "amx_int8", "amx_tile"})
    assert spr["present"][-1] == "AMX (bf16/int8)" and not spr["absent"]
    here = cpu_instruction_sets()
    assert here["flags"] == {f: f in cpu_flags() for f in here["flags"]} and "amx_bf16" in here["flags"]
    r = subprocess.run([sys.executable, "-m", "mage_fast", "info"], capture_output=True, text=True, cwd=REPO,
                       timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0 and f"cpu isa: {here['summary']}" in r.stdout, r.stderr[-2000:]


# ------------------------------------------------------------------------- the benchmark script
BENCH = ["--model", "tiny", "--num-iter", "2", "--batch-sizes", "1", "--gen-repeats", "1", "--no-warmup",
         "--startup-repeats", "0"]  # start-up: test_decode_throughput_script.py


def test_benchmark_times_the_peers_in_the_same_run(tmp_path, one_thread, capsys):
    pytest.importorskip("onnxruntime")
    import decode_throughput as bench
    out = tmp_path / "d.json"
    bench.main([*BENCH, "--mode", "exact", "--peers", "onnxruntime_fp32", "--out", str(out)])
    d = json.loads(out.read_text())
    res = d["results"]["1"]
    assert set(res["paths"]) == {"official", "exact", "onnxruntime_fp32", "vqgan_decode"}
    assert "onnxruntime_fp32" in res["speedup_images_per_s_vs_official"]
    assert set(res["peer_speedup_images_per_s_vs_exact"]) == {"onnxruntime_fp32"}
    for n in ("exact", "onnxruntime_fp32"):  # time inside the network passes and the pixel decode
        parts = res["parts_s"][n]
        assert 0 < parts["network_pass_s"]["median"] + parts["pixel_decode_s"]["median"] <= res["paths"][n]["max_s"]
    assert d["peers"]["timed"] == ["onnxruntime_fp32"] and d["peers"]["batch_sizes"] == [1]
    assert d["peers"]["details"]["onnxruntime_fp32"]["runtime_reports"] == ["fp32"]
    assert d["environment"]["cpu"]["summary"] == cpu_instruction_sets()["summary"]
    text = capsys.readouterr().out
    assert f"cpu    : {cpu_instruction_sets()['model']} | " in text and "peers skipped" not in text


def test_benchmark_names_the_skipped_peers_on_one_line(tmp_path, one_thread, capsys, monkeypatch):
    import decode_throughput as bench
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the package were not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "d.json"
    bench.main([*BENCH, "--mode", "exact", "--out", str(out)])  # default: every available peer (here none)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "skipped" in ln]
    assert len(lines) == 1 and lines[0].startswith("peers skipped: ")
    for n in ("onnxruntime_fp32", "openvino_fp32", "openvino_bf16"):
        assert n in lines[0]
    d = json.loads(out.read_text())
    assert d["peers"]["timed"] == [] and set(d["peers"]["skipped"]) == {"onnxruntime_fp32", "openvino_fp32",
                                                                          "openvino_bf16"}
    assert set(d["results"]["1"]["paths"]) == {"official", "exact", "vqgan_decode"}
    bench.main([*BENCH, "--mode", "exact", "--peers", "none", "--out", str(out)])
    assert "skipped" not in capsys.readouterr().out
    assert json.loads(out.read_text())["peers"] == {"asked": "none", "timed": [], "skipped": {}, "batch_sizes": []}


@pytest.mark.parametrize("argv,words", [
    (["--peers", "tensorrt"], ["--peers tensorrt", "unknown peer", "onnxruntime_fp32"]),
    (["--peers", "none", "onnxruntime_fp32"], ["'all' and 'none' stand alone"]),
    (["--peer-batch-sizes", "3"], ["--peer-batch-sizes 3", "batch sizes"]),
])
def test_benchmark_refuses_bad_peer_flags_with_one_line(tmp_path, argv, words):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("MAGE_FAST_DEBUG", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "decode_throughput.py"), "--model", "tiny",
                           *argv, "--out", str(tmp_path / "d.json")], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for w in words:
        assert w in lines[0]
    assert not (tmp_path / "d.json").exists()


def test_benchmark_help_shows_the_peer_defaults(capsys):
    import decode_throughput as bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--peers PEERS [PEERS ...] peer runtimes" in text and "(default: all: every peer" in text
    assert "(default: the largest of --batch-sizes" in text
