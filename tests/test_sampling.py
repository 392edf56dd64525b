"""Decoding: the schedule and the samplers (the counter-based torch one, the official one). The
decode-step reference and its counter-based hash are tested in tests/ops/test_decode_step.py."""
import numpy as np
import pytest
import torch

import mage_fast

FACTS_T20 = [255, 252, 248, 243, 236, 228, 218, 207, 194, 181, 166, 150, 133, 116, 97, 79, 59, 40, 20, 1]


def test_schedule_matches_official_counts():
    assert mage_fast.mask_schedule(20) == FACTS_T20
    s12 = mage_fast.mask_schedule(12)
    assert s12[-1] == 1 and all(a > b for a, b in zip(s12, s12[1:]))
    with pytest.raises(ValueError):
        mage_fast.mask_schedule(0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


def test_torch_rng_image_depends_only_on_seed_and_index(tiny):
    _, ids3 = mage_fast.generate(tiny, 3, num_iter=4, seed=5, rng="torch", return_ids=True)
    _, ids1 = mage_fast.generate(tiny, 1, num_iter=4, seed=5, rng="torch", return_ids=True, first_index=2)
    _, ids2 = mage_fast.generate(tiny, 2, num_iter=4, seed=5, rng="torch", return_ids=True, first_index=1)
    assert torch.equal(ids3[2:], ids1) and torch.equal(ids3[1:], ids2)
    _, other = mage_fast.generate(tiny, 3, num_iter=4, seed=6, rng="torch", return_ids=True)
    assert not torch.equal(ids3, other)
    assert not torch.equal(ids3[0], ids3[1])


def test_torch_rng_touches_no_global_rng(tiny):
    np.random.seed(1)
    torch.manual_seed(1)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    imgs, ids = mage_fast.generate(tiny, 2, num_iter=3, rng="torch", return_ids=True)
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)
    assert imgs.shape == (2, 3, 256, 256) and ids.shape == (2, 256)
    assert int(ids.min()) >= 0 and int(ids.max()) < 1024


def test_official_rng_depends_on_batch_as_official(tiny):
    _, a = mage_fast.generate(tiny, 2, num_iter=3, seed=0, rng="official", return_ids=True)
    _, b = mage_fast.generate(tiny, 1, num_iter=3, seed=0, rng="official", return_ids=True)
    _, c = mage_fast.generate(tiny, 2, num_iter=3, seed=0, rng="official", return_ids=True)
    assert torch.equal(a, c)  # reseeded each call
    assert not torch.equal(a[1:], b)  # image 1 of a batch of 2 differs from a batch of 1's image


def test_bad_rng_mode(tiny):
    with pytest.raises(ValueError, match="rng must be one of"):
        mage_fast.generate(tiny, 1, rng="numpy")
