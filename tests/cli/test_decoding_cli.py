"""Every decoding mode from the command line, on the shipped model."""
import os

import pytest

from mage_fast.cli import DEFAULT_CKPT, main
from mage_fast.decoding import MODES


@pytest.mark.skipif(not os.path.isfile(DEFAULT_CKPT), reason="the shipped model is not present")
@pytest.mark.parametrize("mode", sorted(MODES) + ["drop=all,refresh=3,focus=1"])
def test_generate_runs_in_every_mode(mode, tmp_path):
    if MODES.get(mode) is not None and MODES[mode].quant != "none":
        pytest.importorskip("torchao")
    out = tmp_path / "gen"
    assert main(["generate", "--num-images", "2", "--batch-size", "2", "--rng", "torch", "--class-id", "all",
                 "--mode", mode, "--grid", "0", "--out", str(out)]) == 0
    assert {"00000.png", "00001.png"} <= set(os.listdir(out))


def test_unknown_mode_is_a_usage_error(tmp_path, capsys):
    assert main(["generate", "--num-images", "1", "--mode", "fastest", "--out", str(tmp_path / "o")]) == 2
    assert "mode" in capsys.readouterr().err
    # a spec with a bad value: one line, and no run folder half-made
    out = tmp_path / "bad_spec"
    assert main(["generate", "--num-images", "1", "--mode", "refresh=4,focus=2,focus_by=bogus", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: focus_by must be one of ('sampler', 'max'), got 'bogus'"] and not out.exists()


def _no_int8_units(monkeypatch):
    """This CPU as one without int8 matrix units (an AVX2-only EPYC, where torch's int8 product is a
    plain loop and a whole int8 decode is many times slower than exact)."""
    from mage_fast.decoding import quant
    monkeypatch.setattr(quant, "cpu_int8_units", lambda: None)


@pytest.mark.skipif(not os.path.isfile(DEFAULT_CKPT), reason="the shipped model is not present")
def test_int8_without_int8_units_runs_with_one_note(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torchao")
    import warnings
    _no_int8_units(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "--num-images", "1", "--rng", "torch", "--num-iter", "2", "--mode", "cached_int8",
                     "--grid", "0", "--out", str(tmp_path / "gen")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: --mode cached_int8: int8 runs, but")]
    assert len(notes) == 1 and "AVX512-VNNI" in notes[0], err
    from mage_fast.decoding import SlowModeWarning
    assert not [w for w in caught if issubclass(w.category, SlowModeWarning)]  # said once, as the note
    assert os.path.isfile(tmp_path / "gen" / "00000.png")


def test_generate_warns_of_a_mode_slower_than_fp32_here(monkeypatch):
    """generate(mode=...) says when the mode's arithmetic has no hardware here; not where it has."""
    pytest.importorskip("torchao")
    import torch
    import mage_fast
    from mage_fast.decoding import SlowModeWarning, int8_native, quant
    model = mage_fast.mage_vit_tiny().eval()
    _no_int8_units(monkeypatch)
    assert not int8_native(torch.device("cpu"))
    with pytest.warns(SlowModeWarning, match="int8 runs, but many times slower than fp32"):
        mage_fast.generate(model, 1, num_iter=2, rng="torch", mode="int8")
    monkeypatch.setattr(quant, "cpu_int8_units", lambda: "VNNI")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowModeWarning)
        mage_fast.generate(model, 1, num_iter=2, rng="torch", mode="int8")
        mage_fast.generate(model, 1, num_iter=2, rng="torch", mode="cached")


def test_torchao_import_is_quiet_on_a_cpu_torch():
    """With a CPU-only torch, torchao's import logs that its CUDA extensions cannot load (and torch a
    deprecation meant for torchao's developers): noise before every int8 run. mage_fast imports it
    without those lines; any other output stays."""
    pytest.importorskip("torchao")
    import subprocess
    import sys
    import torch
    if torch.version.cuda:
        pytest.skip("a CUDA torch: torchao's extensions load, and a failure to load them must show")
    code = "from mage_fast.decoding.quant import import_torchao; import_torchao(); print('imported')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "imported", r.stderr
    assert "Failed to load" not in r.stderr and "KernelPreference" not in r.stderr, r.stderr


@pytest.mark.parametrize("native, want", [(True, "fast_bf16"), (False, "fast")])
def test_auto_mode_is_bf16_only_where_bf16_is_native(native, want, monkeypatch):
    from mage_fast.decoding import AUTO, auto_mode, modes, resolve_mode
    monkeypatch.setattr(modes, "bf16_native", lambda dev: native)
    assert auto_mode() == want and auto_mode("cpu") == want
    assert resolve_mode(AUTO) is MODES[want]


@pytest.mark.skipif(not os.path.isfile(DEFAULT_CKPT), reason="the shipped model is not present")
@pytest.mark.parametrize("native", [True, False])
def test_auto_mode_from_the_api_and_the_cli_records_the_preset(native, tmp_path, capsys, monkeypatch):
    """generate(mode="auto") is the chosen preset exactly; the CLI names it once and run.json holds
    the preset's name (a resume on another CPU kind reruns what ran, not a new choice)."""
    import json

    import torch
    import mage_fast
    from mage_fast.decoding import modes
    monkeypatch.setattr(modes, "bf16_native", lambda dev: native)
    want = "fast_bf16" if native else "fast"
    model = mage_fast.MAGE.from_pretrained(DEFAULT_CKPT)
    kw = dict(num_iter=3, temperature=6.0, seed=4, rng="torch", class_ids=torch.tensor([0, 5]))
    assert torch.equal(mage_fast.generate(model, 2, mode="auto", **kw), mage_fast.generate(model, 2, mode=want, **kw))
    out = tmp_path / "gen"
    assert main(["generate", "--num-images", "2", "--batch-size", "2", "--num-iter", "3", "--class-id", "all",
                 "--mode", "auto", "--grid", "0", "--out", str(out)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--mode auto:")]
    assert len(notes) == 1 and f": {want} on this cpu" in notes[0]
    assert json.loads((out / "run.json").read_text())["settings"]["mode"] == want
