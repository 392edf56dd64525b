"""Official API surface, training-forward invariants, and clear errors on bad input."""
import pytest
import torch

import mage_fast


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny()


def test_official_attributes(tiny):
    for name in ("token_emb", "blocks", "norm", "decoder_embed", "decoder_blocks", "decoder_norm",
                 "decoder_pos_embed_learned", "mlm_layer", "vqgan"):
        assert hasattr(tiny, name), name
    assert (tiny.mask_token_label, tiny.fake_class_label, tiny.codebook_size) == (2024, 1100, 1024)
    assert not any(p.requires_grad for p in tiny.vqgan.parameters())


def test_training_forward_masks_and_gradients(tiny):
    tiny.train()
    torch.manual_seed(3)
    imgs = torch.rand(3, 3, 256, 256)
    latent, gt, drop, allm = tiny.forward_encoder(imgs)
    assert latent.shape == (3, 129, 64) and gt.shape == (3, 256)
    assert drop.dtype == torch.float32 and drop.shape == (3, 257)
    assert (drop[:, 0] == 0).all() and (allm[:, 0] == 0).all()
    assert (drop.sum(1) == 128).all() and (drop <= allm).all()
    n_masked = allm.sum(1)
    assert (n_masked == n_masked[0]).all() and 128 <= int(n_masked[0]) <= 256
    loss, out, mask = tiny(imgs)
    assert out is imgs and mask.shape == (3, 257) and loss.ndim == 0
    loss.backward()
    assert tiny.token_emb.word_embeddings.weight.grad is not None
    assert tiny.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.vqgan.parameters())
    tiny.zero_grad()
    tiny.eval()


def test_mask_ratio_distribution(tiny):
    torch.manual_seed(0)
    counts = torch.stack([tiny.sample_masks(1, "cpu")[1].sum() for _ in range(400)]).float()
    ratio = counts / 256
    assert float(ratio.min()) >= 0.5 and float(ratio.max()) <= 1.0
    # truncated normal(0.55, 0.25) on [0.5, 1] has mean ~0.694 (ceil adds < 1/256)
    assert abs(float(ratio.mean()) - 0.694) < 0.02


@pytest.mark.parametrize("bad,match", [
    (torch.rand(2, 3, 224, 224), "expected 256x256 images"),
    (torch.rand(2, 1, 256, 256), r"shape \(B, 3, H, W\)"),
    (torch.rand(3, 256, 256), r"shape \(B, 3, H, W\)"),
    ((torch.rand(2, 3, 256, 256) * 255).to(torch.uint8), "expected float images"),
    (torch.rand(2, 3, 256, 256) * 255, r"values in \[0, 1\]"),
    ((torch.rand(2, 3, 256, 256) - 0.45) / 0.22, r"values in \[0, 1\]"),
], ids=["size", "channels", "ndim", "uint8", "0-255", "mean-std"])
def test_bad_images(tiny, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny(bad)


def test_range_check_can_be_disabled(tiny):
    tiny.check_input_range = False
    try:
        tiny.tokenize(torch.rand(1, 3, 256, 256) * 3)  # no error: the caller vouches for the range
    finally:
        tiny.check_input_range = True


def test_token_ids_out_of_range(tiny):
    ids = torch.full((1, 257), 5)
    ids[0, 3] = 2025
    with pytest.raises(ValueError, match=r"must lie in \[0, 2025\)"):
        tiny.forward_ids(ids)
    with pytest.raises(ValueError, match=r"codebook indices must lie in \[0, 1024\)"):
        tiny.vqgan.quantize.get_codebook_entry(torch.tensor([[1024, 0]]), None)
    with pytest.raises(TypeError, match="integer tensor"):
        tiny.forward_ids(ids.float())


def test_inconsistent_given_masks(tiny):
    drop = torch.zeros(1, 257)
    drop[0, 1:129] = 1
    allm = torch.zeros(1, 257)
    with pytest.raises(ValueError, match="dropped token must also be masked"):
        tiny.forward_encoder(torch.rand(1, 3, 256, 256), drop, allm)


def test_vqgan_config_errors():
    with pytest.raises(ValueError, match="must equal z_channels"):
        mage_fast.VQModel(ch=32, z_channels=32, embed_dim=16)
    with pytest.raises(TypeError, match="unknown VQGAN config keys"):
        mage_fast.VQModel(ch=32, z_channels=32, embed_dim=32, chmult=(1, 2))


def test_dropout_argument():
    """MAGE(dropout=p) sets every dropout (embedding, residual, attention); the official 0.1 by default."""
    cfg = dict(vqgan_config=dict(ch=32, num_res_blocks=1, z_channels=32, embed_dim=32), vqgan_ckpt_path=None)
    for p, want in ((None, 0.1), (0.0, 0.0), (0.3, 0.3)):
        m = mage_fast.mage_vit_tiny(**cfg) if p is None else mage_fast.mage_vit_tiny(dropout=p, **cfg)
        ps = [d.p for d in m.modules() if isinstance(d, torch.nn.Dropout)]
        assert ps and set(ps) == {want}
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        mage_fast.mage_vit_tiny(dropout=1.0, **cfg)


def test_fused_training_loss_matches_official_path_with_gradients(tiny):
    """forward() uses the fused MLM-head loss; it must equal forward_loss(forward_decoder(...))."""
    tiny.eval()  # no dropout: both paths see the same network
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 256, 256)
    drop, allm = tiny.sample_masks(2, "cpu")
    loss_fused, _, _ = tiny(imgs, drop, allm)
    g_fused = torch.autograd.grad(loss_fused, [tiny.mlm_layer.fc.weight, tiny.blocks[0].attn.qkv.weight,
                                               tiny.token_emb.word_embeddings.weight])
    latent, gt, d, a = tiny.forward_encoder(imgs, drop, allm)
    loss_ref = tiny.forward_loss(gt, tiny.forward_decoder(latent, d, a), a)
    g_ref = torch.autograd.grad(loss_ref, [tiny.mlm_layer.fc.weight, tiny.blocks[0].attn.qkv.weight,
                                           tiny.token_emb.word_embeddings.weight])
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=1e-6)
    for a_, b_ in zip(g_fused, g_ref):
        torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-7)
