"""Every decoding mode from the command line, on the shipped model."""
import os

import pytest

from mage_fast.__main__ import DEFAULT_CKPT, main
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
