"""benchmarks/yardstick.json: the fixed work every decoding mode is judged on, read by
benchmarks/decode_quality.py as its defaults."""
import json
import os
import sys

import pytest

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
