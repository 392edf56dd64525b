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
    (dict(top_k=0, sampler="torch"), "top_k must be an integer >= 1"),
    (dict(top_k=2.5, sampler="torch"), "top_k must be an integer"),
    (dict(top_p=0.0, sampler="torch"), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5, sampler="torch"), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=0.9), "top-k / top-p"),  # the official sampler has no token filter
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


def test_token_filter_keeps_the_tokens_it_should(tiny):
    """top_k=1 draws every token as the argmax of the step's logits; a filter that keeps every code
    (top_p=1, top_k = codebook size) changes nothing; a nucleus changes the draw."""
    kw = dict(num_iter=4, temperature=3.0, seed=1, rng="torch", return_ids=True)
    _, plain, trace = mage_fast.generate(tiny, 2, return_trace=True, **kw)
    _, greedy, gtrace = mage_fast.generate(tiny, 2, return_trace=True, top_k=1, **kw)
    state = torch.full_like(greedy, tiny.mask_token_label)
    for step in range(4):  # the sampled ids of every unknown position are the argmax of its logits
        unknown = state == tiny.mask_token_label
        best = tiny.code_logits(state).argmax(-1)
        assert torch.equal(gtrace["sampled"][step][unknown], best[unknown])
        state = gtrace["ids"][step]
    assert not torch.equal(plain, greedy)
    for keep_all in (dict(top_p=1.0), dict(top_k=tiny.codebook_size)):
        assert torch.equal(mage_fast.generate(tiny, 2, **keep_all, **kw)[1], plain)
    assert not torch.equal(mage_fast.generate(tiny, 2, top_p=0.5, **kw)[1], plain)


def test_token_filter_is_recorded_only_when_set():
    """Runs without a filter keep the manifest keys they had (older run.json files resume)."""
    cfg = SamplingConfig(sampler="torch")
    assert "top_p" not in cfg.manifest_settings() and "top_k" not in cfg.manifest_settings()
    assert cfg.replace(top_p=0.9, top_k=50).manifest_settings(("top_k", "top_p")) == {"top_k": 50, "top_p": 0.9}
    assert cfg.replace(top_p=1.0).token_filter is None and cfg.replace(top_k=5).token_filter is not None
