"""Generation modes: exact token logic of inpainting/outpainting, schedule starts, guidance, classes."""
import pytest
import torch

import mage_fast
from mage_fast.editing import box_to_pixel_mask, inpaint, outpaint, soft_composite_mask, token_region
from mage_fast.decoding import SCHEDULES, mask_schedule, schedule_from
from mage_fast.decoding.loop import cfg_logits as _cfg_logits


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


def test_box_to_tokens_grown_by_one():
    region = box_to_pixel_mask((64, 64, 160, 128), 256)  # columns 4..9, rows 4..7 of a 16x16 grid
    assert int(region.sum()) == 96 * 64
    t = token_region(region, 16, grow=0)
    expect = torch.zeros(16, 16, dtype=torch.bool)
    expect[4:8, 4:10] = True
    assert torch.equal(t, expect)
    expect_grown = torch.zeros(16, 16, dtype=torch.bool)
    expect_grown[3:9, 3:11] = True
    assert torch.equal(token_region(region, 16, grow=1), expect_grown)
    # a box touching one pixel of a cell takes the whole cell; growth stops at the border
    t2 = token_region(box_to_pixel_mask((0, 0, 17, 1), 256), 16, grow=1)
    assert t2.nonzero().tolist() == [[r, c] for r in range(2) for c in range(3)]
    with pytest.raises(ValueError, match="box must satisfy"):
        box_to_pixel_mask((10, 10, 5, 20), 256)


def test_schedule_start_step():
    full = [256] + mask_schedule(20)
    for n in (1, 20, 97, 100, 200, 255, 256):
        start, lens = schedule_from(20, 256, n)
        assert full[start] >= n and (start == 19 or full[start + 1] < n)
        assert len(lens) == 20 - start and lens[-1] == 1 and lens[0] <= max(1, n - 1)
    assert schedule_from(20, 256, 256) == (0, mask_schedule(20))
    assert schedule_from(20, 256, 100) == (14, [97, 79, 59, 40, 20, 1])
    for name in SCHEDULES:
        lens = mask_schedule(10, 64, name)
        assert all(a >= b for a, b in zip(lens, lens[1:])) and lens[-1] == 1, name  # clamps may repeat 1
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_schedule(10, 64, "zigzag")


def test_inpaint_keeps_known_tokens_and_pixels(tiny):
    torch.manual_seed(1)
    img = torch.rand(3, 256, 256)
    region = box_to_pixel_mask((64, 64, 160, 128), 256)
    res = inpaint(tiny, img, region, num_samples=2, num_iter=12, seed=3)
    codes = tiny.tokenize(img[None])
    tm = res["token_mask"].view(-1)
    assert int(tm.sum()) == 48 and res["start_step"] == schedule_from(12, 256, 48)[0]
    assert torch.equal(res["ids"][:, ~tm], codes[:, ~tm].expand(2, -1))
    assert not torch.equal(res["ids"][0, tm], res["ids"][1, tm])  # two different samples
    outside = ~torch.nn.functional.interpolate(res["token_mask"].float()[None, None], size=(256, 256))[0, 0].bool()
    assert torch.equal(res["images"][:, :, outside], img[None].expand(2, -1, -1, -1)[:, :, outside])
    w = res["composite_mask"]
    assert float(w.max()) == pytest.approx(1.0) and float(w[~outside].min()) > 0


def test_outpaint_regenerates_outside_the_box(tiny):
    img = torch.rand(3, 256, 256)
    res = outpaint(tiny, img, (64, 64, 192, 192), num_samples=1, num_iter=8)
    expect = torch.ones(16, 16, dtype=torch.bool)
    expect[4:12, 4:12] = False
    assert torch.equal(res["token_mask"], expect)


def test_soft_composite_mask_edges():
    t = torch.zeros(4, 4, dtype=torch.bool)
    t[1:3, 1:3] = True
    w = soft_composite_mask(t, 64, blur_sigma=4.0)
    assert float(w[:16].max()) == 0 and float(w[32, 32]) == pytest.approx(1.0, abs=1e-4)
    assert 0 < float(w[16, 32]) < 1  # blurred edge inside the area
    assert torch.equal(soft_composite_mask(t, 64, 0.0) > 0, t.repeat_interleave(16, 0).repeat_interleave(16, 1))


def test_classifier_free_guidance_formula(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (2, 256))
    ids[:, ::3] = tiny.mask_token_label
    cls = tiny.class_token_ids(torch.tensor([3, 7]))
    lc = tiny.code_logits(ids, cls)
    lu = tiny.code_logits(ids)
    torch.testing.assert_close(_cfg_logits(tiny, ids, cls, 2.5), lc + 2.5 * (lc - lu), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_cfg_logits(tiny, ids, cls, 0.0), lc)


def test_class_tokens_skip_fake_class(tiny):
    assert tiny.class_token_ids(torch.tensor([0, 75, 76, 998])).tolist() == [1024, 1099, 1101, 2023]
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 999\)"):
        tiny.class_token_ids(torch.tensor([999]))


def test_class_conditional_generation_and_training(tiny):
    _, a = mage_fast.generate(tiny, 2, num_iter=4, rng="torch", class_ids=1, return_ids=True)
    _, b = mage_fast.generate(tiny, 2, num_iter=4, rng="torch", class_ids=torch.tensor([5, 5]), return_ids=True)
    _, u = mage_fast.generate(tiny, 2, num_iter=4, rng="torch", return_ids=True)
    assert not torch.equal(a, b) and not torch.equal(a, u)
    with pytest.raises(ValueError, match="rng='official' reproduces"):
        mage_fast.generate(tiny, 2, class_ids=1)
    with pytest.raises(ValueError, match="guidance_scale needs class_ids"):
        mage_fast.generate(tiny, 2, rng="torch", guidance_scale=1.0)
    tiny.train()
    tiny.class_dropout_prob = 0.0
    imgs = torch.rand(2, 3, 256, 256)
    torch.manual_seed(0)
    l_cond, _, _ = tiny(imgs, labels=torch.tensor([1, 2]))
    torch.manual_seed(0)
    l_unc, _, _ = tiny(imgs)
    labels = torch.tensor([1, 2, 3, 4])
    assert tiny._class_slot(labels, 4, "cpu").tolist() == [1025, 1026, 1027, 1028]
    tiny.class_dropout_prob = 1.0
    assert tiny._class_slot(labels, 4, "cpu").tolist() == [1100] * 4
    tiny.eval()  # no class dropout at evaluation
    assert tiny._class_slot(labels, 4, "cpu").tolist() == [1025, 1026, 1027, 1028]
    tiny.class_dropout_prob = 0.1
    assert float(l_cond.detach()) != float(l_unc.detach())


def test_trace_fixed_at_follows_schedule(tiny):
    _, ids, tr = mage_fast.generate(tiny, 2, num_iter=6, rng="torch", return_ids=True, return_trace=True)
    lens = mask_schedule(6)
    assert tr["ids"].shape == (6, 2, 256)
    assert [int((tr["ids"][t, 0] == tiny.mask_token_label).sum()) for t in range(6)] == lens
    counts = torch.bincount(tr["fixed_at"][0], minlength=6).tolist()
    assert counts == [256 - lens[0]] + [lens[t - 1] - lens[t] for t in range(1, 5)] + [lens[4]]
    assert torch.equal(tr["sampled"][-1], ids)
