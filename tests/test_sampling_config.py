"""SamplingConfig: a run's sampling settings, checked once, shared by generate, inpaint, the CLI
and run.json."""
import pytest
import torch

import mage_fast
from mage_fast.decoding import SamplingConfig
from mage_fast.editing import inpaint
from mage_fast.models.checks import InputError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


@pytest.mark.parametrize("kw,words", [
    (dict(sampler="numpy"), "rng must be one of"),
    (dict(num_iter=0), "num_iter must be an integer >= 1"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2 ** 32), "seed must be an integer >= 0 and <= 4294967295"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(guidance_scale=float("nan"), sampler="torch"), "guidance_scale"),
    (dict(schedule="zigzag", sampler="torch"), "unknown mask schedule 'zigzag'"),
    (dict(temperature_annealing="fast", sampler="torch"), "unknown temperature annealing"),
    (dict(order="random", sampler="torch"), "order must be one of"),
    (dict(order="halton"), "orders"),  # the official sampler runs the official options only
])
def test_bad_settings_are_input_errors(kw, words):
    with pytest.raises(InputError, match=words):
        SamplingConfig(**kw)


def test_a_bad_mode_is_refused_when_made():
    with pytest.raises(ValueError, match="unknown decoding mode"):
        SamplingConfig(mode="fastest")
    assert SamplingConfig(seed=2 ** 40, sampler="torch").seed == 2 ** 40  # counter-based seeds are not 32-bit


def test_generate_with_a_config_is_generate_with_its_keywords(tiny):
    kw = dict(num_iter=3, temperature=2.0, seed=5, schedule="linear", mode="cached")
    cfg = SamplingConfig(sampler="torch", **kw)
    _, a = mage_fast.generate(tiny, 2, rng="torch", return_ids=True, **kw)
    _, b = mage_fast.generate(tiny, 2, config=cfg, return_ids=True)
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="also num_iter"):
        mage_fast.generate(tiny, 2, config=cfg, num_iter=4)
    with pytest.raises(InputError, match="SamplingConfig"):
        mage_fast.generate(tiny, 2, config={"num_iter": 3})


def test_inpaint_takes_a_config(tiny):
    img = torch.rand(3, tiny.img_size, tiny.img_size)
    region = torch.zeros(tiny.img_size, tiny.img_size, dtype=torch.bool)
    region[:64, :64] = True
    a = inpaint(tiny, img, region, num_iter=3, seed=2, temperature=3.0)
    b = inpaint(tiny, img, region, config=SamplingConfig(num_iter=3, seed=2, temperature=3.0, sampler="torch"))
    assert torch.equal(a["ids"], b["ids"])
    with pytest.raises(InputError, match="sampler must be 'torch'"):
        inpaint(tiny, img, region, config=SamplingConfig(num_iter=3))


def test_manifest_settings_keep_the_cli_names():
    """run.json keeps the keys earlier runs wrote, so they resume."""
    cfg = SamplingConfig(num_iter=20, temperature=6.0, sampler="torch", guidance_scale=1.5, mode="fast")
    assert cfg.manifest_settings() == {"num_iter": 20, "temperature": 6.0, "seed": 0, "rng": "torch",
                                       "schedule": "cosine", "temperature_annealing": "linear", "guidance": 1.5,
                                       "guidance_schedule": "constant", "mode": "fast", "order": "confidence"}
    assert cfg.manifest_settings(("seed", "guidance")) == {"seed": 0, "guidance": 1.5}
    assert cfg.replace(seed=3).seed == 3 and cfg.seed == 0
