"""A new decoding mode is one class and one registry line: a toy mode run through generate() and
through the command line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mage_fast
from mage_fast.decoding import MODES, NetworkPass, resolve_mode

TOY_CODE = 7
# The settings below avoid a known rare draw: decode_step's uniforms can round to 1.0 in fp32, an infinite
# Gumbel noise that picks its code whatever the logits (at --num-iter 2, seed 0, image 1 gets one such token).


class OneCodePass:
    """The toy mode's network pass: the exact pass, with code 7 made certain at every position."""

    def __init__(self, model, masked_before, keys=None, draws=None):
        self.model, self.masked_before, self.calls = model, list(masked_before), []

    def __call__(self, ids, class_tokens, i):
        self.calls.append(i)
        logits = self.model.code_logits(ids, class_tokens, check=False)
        return logits.index_fill(-1, torch.tensor([TOY_CODE], device=logits.device), 1e4)

    def decode_images(self, ids, chunk=None):
        return self.model.decode_tokens(ids, chunk)


@pytest.fixture
def toy_mode():
    MODES.register("one_code", OneCodePass, "toy: the exact pass, every token becomes code 7")  # the one line
    yield "one_code"
    MODES.unregister("one_code")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


def test_a_registered_mode_runs_through_generate(tiny, toy_mode):
    built = resolve_mode(toy_mode).build(tiny, [256, 200])
    assert isinstance(built, NetworkPass) and built.masked_before == [256, 200]
    for rng in ("torch", "official"):
        imgs, ids = mage_fast.generate(tiny, 2, num_iter=3, rng=rng, mode=toy_mode, return_ids=True)
        assert bool((ids == TOY_CODE).all())  # the pass decided every token
        torch.testing.assert_close(imgs, tiny.decode_tokens(ids), rtol=0, atol=0)
    _, exact = mage_fast.generate(tiny, 2, num_iter=3, rng="torch", return_ids=True)
    assert not bool((exact == TOY_CODE).all())
    # guidance runs the pass on (conditional, unconditional) rows
    _, ids = mage_fast.generate(tiny, 2, num_iter=3, rng="torch", mode=toy_mode, class_ids=[1, 2], guidance_scale=1.0,
                                return_ids=True)
    assert bool((ids == TOY_CODE).all())


def test_a_registered_mode_is_listed_everywhere(toy_mode):
    from mage_fast.cli import build_parser
    from mage_fast.info import decoding_modes_report
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    mode_help = next(a.help for a in gen._actions if a.dest == "mode")
    assert "one_code: toy: the exact pass" in mode_help
    assert any("one_code" in line and "toy" in line for line in decoding_modes_report([torch.device("cpu")]))
    with pytest.raises(ValueError, match="already registered"):
        MODES.register(toy_mode, OneCodePass, "again")


def test_a_registered_mode_runs_through_the_cli(tmp_path, toy_mode):
    from mage_fast.cli import main
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": mage_fast.mage_vit_tiny().state_dict()}, ckpt)
    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", str(ckpt), "--model", "tiny", "--num-images", "2", "--batch-size", "2",
                 "--num-iter", "3", "--mode", toy_mode, "--grid", "0", "--out", str(out)]) == 0
    with open(out / "run.json") as f:
        assert json.load(f)["settings"]["mode"] == toy_mode
    a, b = (np.asarray(Image.open(out / f"0000{i}.png")) for i in (0, 1))
    assert np.array_equal(a, b)  # both images are all code 7
    model = mage_fast.MAGE.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        expect = mage_fast.images.to_uint8(model.decode_tokens(torch.full((1, model.seq_len), TOY_CODE)))[0]
    assert np.array_equal(a, expect)


def test_a_pass_without_the_contract_is_refused(tiny):
    class NoPixels:
        def build(self, model, masked_before, keys=None, draws=None):
            return lambda ids, class_tokens, i: model.code_logits(ids, class_tokens)

    with pytest.raises(TypeError, match="decode_images"):
        mage_fast.generate(tiny, 1, num_iter=2, rng="torch", mode=NoPixels())


def test_readme_mode_table_is_the_registry():
    """The README's table of modes is the registry's (regenerate it with MODES.markdown_table())."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    start = readme.index("<!-- decoding-modes")
    body = readme[readme.index("\n", start) + 1: readme.index("<!-- /decoding-modes -->")].strip()
    assert body == MODES.markdown_table()
