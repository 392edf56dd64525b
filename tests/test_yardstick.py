"""benchmarks/yardstick.json: the fixed work every decoding mode is judged on, read by
benchmarks/decode_quality.py as its defaults."""
import json
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def test_yardstick_settings_are_the_issue_minimum():
    import decode_quality
    ys = decode_quality.read_yardstick(decode_quality.YARDSTICK)
    assert ys["num_samples"] >= 5000 and len(ys["seeds"]) == 2 and ys["seeds"][0] != ys["seeds"][1]
    assert ys["reference"]["count"] == ys["num_samples"] and ys["feature_size"] == 224


def test_a_bad_yardstick_is_one_clear_error(tmp_path):
    import decode_quality
    bad = tmp_path / "y.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not readable JSON"):
        decode_quality.main(["--yardstick", str(bad)])
    bad.write_text(json.dumps({"seeds": [0]}))
    with pytest.raises(SystemExit, match="two seeds"):
        decode_quality.main(["--yardstick", str(bad)])


def test_decode_quality_end_to_end_at_a_tiny_size(tmp_path, monkeypatch):
    """The whole script on the shipped model: the exact mode's floor, a mode and a Halton step
    point, with a JSON whose numbers are finite and whose rows name what ran."""
    import math

    import functools

    import decode_quality
    # a classifier trained on 3 000 real training images for one epoch stands in for the full one
    monkeypatch.setattr(decode_quality, "train_classifier", functools.partial(
        decode_quality.train_classifier, limit=3000, epochs=1, cache_dir=str(tmp_path / "clf"), progress=False))
    out = tmp_path / "q.json"
    cache = tmp_path / "exact_cache"
    decode_quality.main(["--num-samples", "20", "--batch-size", "10", "--kl-samples", "10", "--feature-size", "32",
                         "--threads", "1", "--modes", "bf16", "--step-points", "halton:4", "--out", str(out),
                         "--exact-cache", str(cache)])
    res = json.loads(out.read_text())
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"exact", "exact_seed1", "bf16", "halton@T=4"}
    assert all(math.isfinite(r["frechet"]) for r in rows.values())
    assert 0 <= rows["bf16"]["token_diff"] <= 1 and rows["bf16"]["kl_per_step"]
    fixed = rows["bf16"]["kl_fixed_per_step"]  # KL at the tokens each step fixed: one value per step
    assert fixed.keys() == rows["bf16"]["kl_per_step"].keys() and all(0 <= v < 10 for v in fixed.values())
    assert rows["bf16"]["kl_fixed_mean"] == pytest.approx(sum(fixed.values()) / len(fixed))
    assert rows["halton@T=4"]["token_diff"] is None and rows["halton@T=4"]["spec"].startswith("exact pass, order=halton")
    assert os.path.isfile(str(out).replace(".json", ".png"))
    # class agreement: exact's two seeds in the floor, every sampled row scored, the classifier named
    assert res["classifier"]["train_images"] == 3000 and res["classifier"]["test_accuracy"] > 0.5
    for k in ("class_agreement_seed0", "class_agreement_seed1"):
        assert 0 <= res["noise_floor"][k] <= 1
    assert rows["exact"]["class_agreement"] == res["noise_floor"]["class_agreement_seed0"]
    assert 0 <= rows["bf16"]["class_agreement"] <= 1 and len(rows["bf16"]["class_agreement_per_class"]) == 10
    # --exact-cache: a second run on the same work reads the exact runs (one file per seed) instead
    # of generating them, with the same floor
    assert len(os.listdir(cache)) == 2
    calls, real = [], decode_quality.run_mode

    def counted(model, mode, *a, **k):
        calls.append(mode)
        return real(model, mode, *a, **k)
    monkeypatch.setattr(decode_quality, "run_mode", counted)
    decode_quality.main(["--num-samples", "20", "--batch-size", "10", "--kl-samples", "10", "--feature-size",
                         "32", "--threads", "1", "--modes", "bf16", "--out", str(tmp_path / "q2.json"),
                         "--exact-cache", str(cache), "--floor-seeds", "5"])
    monkeypatch.undo()
    assert calls == ["exact", "bf16"]  # seed 5 is new, seeds 0 and 1 come from the cache
    again = json.loads((tmp_path / "q2.json").read_text())
    floor = again.pop("noise_floor")
    wide = floor.pop("all_seeds_vs_test")
    assert {k: floor[k] for k in res["noise_floor"]} == res["noise_floor"]
    seed5 = {r["mode"]: r for r in again["rows"]}["exact_seed5"]
    assert floor["extra_seeds"]["exact_seed5"]["vs_test"] == seed5["frechet"] and 0 < seed5["token_diff"] <= 1
    assert wide["seeds"] == [0, 1, 5] and wide["min"] <= seed5["frechet"] <= wide["max"] and wide["sd"] >= 0
    with pytest.raises(SystemExit, match="--floor-seeds"):
        decode_quality.main(["--num-samples", "10", "--modes", "bf16", "--floor-seeds", "1"])
    # --merge: both runs' rows in one JSON and plot, the floor of the run with more seeds
    decode_quality.main(["--merge", str(out), str(tmp_path / "q2.json"), "--out", str(tmp_path / "m.json")])
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [r["mode"] for r in merged["rows"]] == ["exact", "exact_seed1", "bf16", "halton@T=4", "exact_seed5"]
    assert merged["noise_floor"]["all_seeds_vs_test"]["seeds"] == [0, 1, 5]
    assert os.path.isfile(tmp_path / "m.png")
    other = json.loads(out.read_text())
    other["num_samples"] = 40
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other work"):
        decode_quality.main(["--merge", str(out), str(tmp_path / "other.json"), "--out", str(tmp_path / "m2.json")])
    assert {r["mode"]: r["frechet"] for r in again["rows"]}["bf16"] == pytest.approx(rows["bf16"]["frechet"])
    # pixel_decode_quality.py reads the same cache: the official decode gives back the exact samples
    import pixel_decode_quality
    pixel_decode_quality.main(["--exact-cache", str(cache), "--out", str(tmp_path / "pix.json")])
    pix = json.loads((tmp_path / "pix.json").read_text())["decodes"]
    assert set(pix) == {"fp32_official", "bf16_channels_last", "fp32_channels_last"}
    assert abs(pix["fp32_official"]["frechet_vs_exact_samples"]) < 1e-3
    assert all(math.isfinite(v["frechet_vs_test"]) for v in pix.values())
    with pytest.raises(SystemExit) as bad:
        pixel_decode_quality.main(["--exact-cache", str(cache), "--threads", "0"])
    assert bad.value.code == 2
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="--exact-cache .* is not a usable folder"):
        decode_quality.main(["--num-samples", "10", "--modes", "bf16", "--exact-cache", str(tmp_path / "a_file")])
    with pytest.raises(SystemExit, match="ORDER:T"):
        decode_quality.main(["--num-samples", "10", "--batch-size", "10", "--feature-size", "32", "--modes",
                             "bf16", "--step-points", "spiral:4", "--out", str(tmp_path / "x.json")])


def test_reference_images_take_the_models_geometry():
    """The test-split reference is padded with black to the model's image size, as its training
    data was: a 32 px model (the 256-token one) is judged against 32 px references whose centre is
    the 28x28 image, never against the bare 28x28 ones."""
    import decode_quality
    plain = decode_quality.load_test_images(6, 3)
    padded = decode_quality.load_test_images(6, 3, 32)
    assert plain.shape == (6, 3, 28, 28) and padded.shape == (6, 3, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], plain) and plain.sum() > 0
    border = padded.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.abs().sum() == 0
    for bad in (24, 31):
        with pytest.raises(SystemExit, match="padded evenly"):
            decode_quality.load_test_images(2, 0, bad)


def test_quality_rows_find_their_speed_by_what_the_mode_computes(tmp_path):
    """A throughput run names modes as they were when it ran (a JSON's "fast" may be refresh=4 or refresh=10,
    the preset's definitions at different times); a quality row of spec drop=train,refresh=4,focus=2 takes
    that speed, and a row of spec refresh=10 does not, although both are called "fast" somewhere."""
    import decode_quality
    from mage_fast.decoding import DecodeMode
    old_fast = DecodeMode(drop="train", refresh_every=4, focus=2)
    tj = {"results": {"4": {"process_cpu_s": {"official": [100.0, 90.0], "fast": [25.0, 30.0]}}},
          "modes": {"fast": old_fast.describe()}}
    path = tmp_path / "tp.json"
    path.write_text(json.dumps(tj))
    speed = decode_quality._speedups(str(path))
    assert speed["fast"] == pytest.approx(3.5)  # median of 100/25 and 90/30
    row_old = {"mode": "drop=train,refresh=4,focus=2", "spec": "drop=train,refresh=4,quant=none,focus=2"}
    row_new = {"mode": "fast", "spec": "drop=train,refresh=10,quant=none,focus=2"}
    assert decode_quality._speed_of(row_old, speed) == pytest.approx(3.5)
    assert decode_quality._speed_of(row_new, speed) is None  # the name matches, what it computes does not
    tj["modes"]["drop=train,refresh=10,focus=2"] = DecodeMode(drop="train", refresh_every=10, focus=2).describe()
    tj["results"]["4"]["process_cpu_s"]["drop=train,refresh=10,focus=2"] = [20.0, 18.0]
    path.write_text(json.dumps(tj))
    assert decode_quality._speed_of(row_new, decode_quality._speedups(str(path))) == pytest.approx(5.0)
