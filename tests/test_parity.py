"""mage_fast.MAGE against the official code's outputs at a tiny size (../shared fixture)."""
import pytest
import torch

import mage_fast
from mage_fast.ops import force_backend

RTOL = 1e-4  # relative to the reference's max magnitude, fp32


def assert_close_rel(actual, expected, rtol=RTOL):
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} > {rtol} x {scale:.3e}"


def test_state_dict_keys_match_fixture(official_tiny, fixture_data):
    ours = {k: (tuple(v.shape), v.dtype) for k, v in official_tiny.state_dict().items()}
    ref = {k: (tuple(v.shape), v.dtype) for k, v in fixture_data["state_dict"].items()}
    assert ours == ref


def test_vq_indices_exact(official_tiny, fixture_data):
    with torch.no_grad():
        z_q, _, (perp, enc, idx) = official_tiny.vqgan.encode(fixture_data["images"])
    assert idx.dtype == torch.int64 and idx.shape == (2 * 256,)
    assert torch.equal(idx.view(2, 256), fixture_data["vq_indices"])
    assert_close_rel(z_q, fixture_data["vq_z_q"])


def test_reconstruction(official_tiny, fixture_data):
    with torch.no_grad():
        rec = official_tiny.vqgan.decode(fixture_data["vq_z_q"])
    assert_close_rel(rec, fixture_data["vq_recon"])


@pytest.mark.parametrize("backend", [None, "torch"], ids=["dispatched", "reference"])
def test_full_sequence_encoder_and_logits(official_tiny, fixture_data, backend):
    ctx = force_backend(backend) if backend else torch.no_grad()
    with ctx, torch.no_grad():
        enc, logits = official_tiny.forward_ids(fixture_data["full_input_ids"])
    assert_close_rel(enc, fixture_data["full_enc_out"])
    assert_close_rel(logits, fixture_data["full_logits"])


def test_codes_only_logits_equal_full_logits_slice(official_tiny, fixture_data):
    ids = fixture_data["full_input_ids"][:, 1:]
    with torch.no_grad():
        codes = official_tiny.code_logits(ids)
        _, full = official_tiny.forward_ids(fixture_data["full_input_ids"])
    assert codes.shape == (2, 256, 1024)
    assert_close_rel(codes, full[:, 1:, :1024], rtol=1e-5)


def test_training_forward_with_fixture_masks(official_tiny, fixture_data):
    d = fixture_data
    with torch.no_grad():
        latent, gt, drop, allm = official_tiny.forward_encoder(d["images"], d["train_token_drop_mask"],
                                                               d["train_token_all_mask"])
        assert latent.shape == (2, 129, 64)
        assert torch.equal(gt, d["vq_indices"])
        assert torch.equal(drop, d["train_token_drop_mask"]) and torch.equal(allm, d["train_token_all_mask"])
        assert_close_rel(latent, d["train_latent"])
        logits = official_tiny.forward_decoder(latent, drop, allm)
        assert_close_rel(logits, d["train_logits"])
        loss = official_tiny.forward_loss(gt, logits, allm)
        assert_close_rel(loss, d["train_loss"])
        loss2, imgs, mask = official_tiny(d["images"], d["train_token_drop_mask"], d["train_token_all_mask"])
    assert_close_rel(loss2, d["train_loss"])
    assert imgs is d["images"] and torch.equal(mask, d["train_token_all_mask"])


def test_probe_features(official_tiny, fixture_data):
    assert_close_rel(official_tiny.probe_features(fixture_data["images"]), fixture_data["probe_features"])


SETTINGS = [(0, 12, 4.5), (1, 8, 6.0)]


@pytest.mark.parametrize("seed,T,temp", SETTINGS, ids=["seed0-T12-t4.5", "seed1-T8-t6.0"])
def test_generate_official_rng_exact(official_tiny, fixture_data, seed, T, temp):
    key = f"gen_seed{seed}_T{T}_temp{temp}"
    imgs, ids = mage_fast.generate(official_tiny, 2, num_iter=T, temperature=temp, seed=seed, rng="official",
                                   return_ids=True)
    assert torch.equal(ids, fixture_data[key + "_ids"])
    assert_close_rel(imgs, fixture_data[key + "_img"])


@pytest.mark.parametrize("seed,T,temp", SETTINGS, ids=["seed0-T12-t4.5", "seed1-T8-t6.0"])
def test_official_sampler_runs_unchanged_on_mage_fast(official_tiny, fixture_data, seed, T, temp):
    """The official loop (token_emb, blocks, norm, forward_decoder, get_codebook_entry, decode)."""
    with force_backend("torch"):
        imgs = mage_fast.official_gen_image(official_tiny, 2, seed, num_iter=T, choice_temperature=temp)
    assert_close_rel(imgs, fixture_data[f"gen_seed{seed}_T{T}_temp{temp}_img"])
