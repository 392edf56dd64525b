"""ViT-VQGAN: the cosine lookup against brute force, the round trip, straight-through gradients,
the loss terms, MAGE with it as the tokenizer, and errors on bad input."""
import pytest
import torch
import torch.nn.functional as F

import mage_fast
from mage_fast.models.vit_vqgan import (ViTVQGAN, count_parameters, discriminator_loss, patchify, unpatchify,
                                        vit_vqgan_loss)
from mage_fast.ops import force_backend


pytestmark = pytest.mark.usefixtures("one_thread")


def small(img=32, patch=8, code_dim=8, n_embed=37, **kw):
    torch.manual_seed(img + patch + code_dim + n_embed)
    return ViTVQGAN(img_size=img, patch_size=patch, embed_dim=32, depth=1, num_heads=2, n_embed=n_embed,
                    code_dim=code_dim, **kw)


def projected(vq, x):
    """The encoder output in the code space, recomputed outside the quantizer: (N, code_dim)."""
    h = vq.encoder(patchify(x * 2 - 1, vq.patch_size))
    return vq.quant_proj(h).reshape(-1, vq.quantize.e_dim)


def brute_force_cosine(z, codes):
    """Index of the largest cosine similarity, one pair at a time in float64, first index on ties."""
    z, codes = z.double(), codes.double()
    best = []
    for v in z:
        sims = [float(v @ e / (v.norm() * e.norm())) for e in codes]
        best.append(max(range(len(sims)), key=lambda j: (sims[j], -j)))
    return torch.tensor(best)


@pytest.mark.parametrize("img,patch,code_dim,n_embed", [(32, 8, 8, 37), (24, 4, 32, 64), (6, 3, 8, 1)],
                         ids=["32px-p8-d8-K37", "24px-p4-d32-K64", "6px-p3-d8-K1"])
def test_cosine_lookup_matches_brute_force(img, patch, code_dim, n_embed):
    vq = small(img, patch, code_dim, n_embed)
    x = torch.rand(2, 3, img, img)
    with torch.no_grad():
        _, _, (_, _, idx) = vq.encode(x)
        want = brute_force_cosine(projected(vq, x), vq.quantize.embedding.weight)
        with force_backend("torch"):
            _, _, (_, _, idx_ref) = vq.encode(x)
    assert idx.shape == (2 * (img // patch) ** 2,) and idx.dtype == torch.int64
    assert torch.equal(idx, want) and torch.equal(idx_ref, want)


def test_lookup_is_by_angle_not_distance():
    vq = small(n_embed=2)
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(torch.tensor([[0.1] + [0.0] * 7, [5.0, 5.0] + [0.0] * 6]))
    z = torch.tensor([[3.0] + [0.0] * 7])  # nearer code 1 in l2, identical to code 0 in angle
    assert vq.quantize.lookup(z).tolist() == [0]


def test_patchify_layout_and_inverse():
    x = torch.randn(2, 3, 12, 8)
    p = patchify(x, 4)  # grid 3 x 2
    assert p.shape == (2, 6, 48)
    r, c = 2, 1
    assert torch.equal(p[1, r * 2 + c], x[1, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(p, 4, 3, 2, 3), x)


def test_round_trip_shapes_codes_and_loss_value():
    vq = small()
    x = torch.rand(3, 3, 32, 32)
    z_q, vq_loss, (perp, min_enc, idx) = vq.encode(x)
    assert perp is None and min_enc is None
    assert z_q.shape == (3, 8, 4, 4) and idx.shape == (48,)
    assert int(idx.min()) >= 0 and int(idx.max()) < vq.n_embed
    entry = vq.quantize.get_codebook_entry(idx, shape=(3, 4, 4, 8))
    assert entry.shape == z_q.shape
    torch.testing.assert_close(entry, z_q, atol=1e-6, rtol=0)  # straight-through value = the code
    torch.testing.assert_close(entry.norm(dim=1), torch.ones(3, 4, 4))
    zn = F.normalize(projected(vq, x), dim=1)
    e = F.normalize(vq.quantize.embedding.weight[idx], dim=1)
    torch.testing.assert_close(vq_loss, 1.25 * ((zn - e) ** 2).mean())
    rec = vq.decode(z_q)
    assert rec.shape == x.shape and torch.isfinite(rec).all()
    torch.testing.assert_close(vq.decode_code(idx.view(3, 4, 4)), rec)
    assert (vq.downsample, vq.resolution, vq.quantize.e_dim, vq.config["patch_size"]) == (8, 32, 8, 8)


def test_straight_through_gradient_reaches_encoder_not_codebook():
    vq = small()
    x = torch.rand(2, 3, 32, 32)
    rec, vq_loss = vq(x)
    loss, parts = vit_vqgan_loss(x, rec, vq_loss, vq_weight=0.0)  # reconstruction only
    loss.backward()
    assert vq.encoder.proj_in.weight.grad.abs().sum() > 0
    assert vq.quant_proj.weight.grad.abs().sum() > 0
    g = vq.quantize.embedding.weight.grad  # the code enters only through sg[e - z]: no gradient
    assert g is None or not g.any()
    vq.zero_grad()
    _, vq_loss = vq(x)
    vq_loss.backward()  # codebook + commitment: both sides move
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0
    assert vq.quant_proj.weight.grad.abs().sum() > 0
    assert vq.decoder.head.fc2.weight.grad is None


def test_loss_terms_and_hooks():
    x, rec = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    vq_loss = torch.tensor(0.2)
    total, parts = vit_vqgan_loss(x, rec, vq_loss, l1_weight=2.0, l2_weight=1.0)
    assert set(parts) == {"vq", "l1", "l2"}
    torch.testing.assert_close(total, torch.tensor(0.2 + 2 * 0.5 + 0.25))
    logits_fake = torch.zeros(1, 1)
    total2, parts2 = vit_vqgan_loss(x, rec, vq_loss, perceptual=lambda a, b: (a - b).abs().sum(),
                                    perceptual_weight=0.1, logits_fake=logits_fake, gan_weight=0.5)
    torch.testing.assert_close(parts2["perceptual"], torch.tensor(24.0))
    torch.testing.assert_close(total2, torch.tensor(0.2 + 0.25 + 2.4 + 0.5 * float(F.softplus(torch.tensor(0.0)))))
    torch.testing.assert_close(discriminator_loss(torch.zeros(2), torch.zeros(2)), 2 * F.softplus(torch.tensor(0.0)))
    with pytest.raises(ValueError, match="differ in shape"):
        vit_vqgan_loss(x, rec[:, :1], vq_loss)


def test_parameter_count_and_presets():
    vq = small()
    assert count_parameters(vq) == sum(p.numel() for p in vq.parameters())
    vq.quantize.embedding.weight.requires_grad_(False)
    assert count_parameters(vq, trainable_only=True) == count_parameters(vq) - 37 * 8
    tiny = mage_fast.models.vit_vqgan_tiny(img_size=64, patch_size=16)
    assert (tiny.n_embed, tiny.quantize.e_dim, tiny.downsample) == (1024, 32, 16)


def test_bad_inputs():
    vq = small()
    with pytest.raises(ValueError, match="32x32"):
        vq.encode(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vq.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vq.encode(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(TypeError, match="float images"):
        vq.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    for bad in (torch.tensor([37]), torch.tensor([-1])):
        with pytest.raises(ValueError, match=r"\[0, 37\)"):
            vq.quantize.get_codebook_entry(bad, None)
    with pytest.raises(TypeError, match="integer"):
        vq.quantize.get_codebook_entry(torch.tensor([1.0]), None)
    with pytest.raises(ValueError, match="latents"):
        vq.decode(torch.zeros(1, 8, 5, 5))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTVQGAN(img_size=30, patch_size=8)


def test_mage_trains_and_generates_with_vit_vqgan():
    vq = small(n_embed=64)
    torch.manual_seed(0)
    model = mage_fast.MAGE(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                           decoder_depth=1, decoder_num_heads=2, tokenizer=vq)
    assert model.seq_len == 16 and model.codebook_size == 64 and model.vqgan is vq
    assert not any(p.requires_grad for p in vq.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    imgs = torch.rand(2, 3, 32, 32)
    loss, _, mask = model(imgs, labels=torch.tensor([3, 5]))
    assert torch.isfinite(loss) and mask.shape == (2, 17)
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    assert all(p.grad is None for p in vq.parameters())
    model.eval()
    out, ids = mage_fast.generate(model, 2, num_iter=4, rng="torch", return_ids=True)
    assert out.shape == (2, 3, 32, 32) and ids.shape == (2, 16)
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    torch.testing.assert_close(out, vq.decode_code(ids.view(2, 4, 4)))
    assert torch.equal(model.tokenize(imgs), vq.encode(imgs)[2][2].view(2, 16))
