"""Checkpoint loading: official layouts, tokenizer-only files, and errors that say what a file is."""
import pytest
import torch

import mage_fast
from mage_fast import CheckpointError, load_checkpoint
from mage_fast.models.mage import TINY_VQGAN


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().state_dict()


def fresh_tiny():
    torch.manual_seed(123)
    return mage_fast.mage_vit_tiny()


def assert_same_params(model, sd):
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("layout", ["model", "state_dict", "bare", "ddp"])
def test_layouts_load(tmp_path, tiny_sd, layout):
    obj = {"model": {"model": tiny_sd}, "state_dict": {"state_dict": tiny_sd}, "bare": tiny_sd,
           "ddp": {"model": {"module." + k: v for k, v in tiny_sd.items()}}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = load_checkpoint(fresh_tiny(), str(path))
    assert_same_params(model, tiny_sd)


def test_tokenizer_only_checkpoint_fills_vqgan(tmp_path, tiny_sd):
    vq = {k[len("vqgan."):]: v for k, v in tiny_sd.items() if k.startswith("vqgan.")}
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": vq}, path)
    model = fresh_tiny()
    load_checkpoint(model, str(path))
    for k, v in vq.items():
        assert torch.equal(model.vqgan.state_dict()[k], v)
    standalone = mage_fast.VQModel(**TINY_VQGAN)
    load_checkpoint(standalone, str(path))
    assert torch.equal(standalone.quantize.embedding.weight, vq["quantize.embedding.weight"])
    built = mage_fast.MAGE(embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                           decoder_num_heads=2, vqgan_config=TINY_VQGAN, vqgan_ckpt_path=str(path))
    assert torch.equal(built.vqgan.quantize.embedding.weight, vq["quantize.embedding.weight"])


def test_from_pretrained_infers_size(tmp_path, tiny_sd):
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny_sd}, path)
    model = mage_fast.MAGE.from_pretrained(str(path))
    assert len(model.blocks) == 2 and model.blocks[0].attn.num_heads == 4
    assert model.decoder_blocks[0].attn.num_heads == 2
    assert_same_params(model, tiny_sd)


def test_vit_b_checkpoint_into_tiny_model_names_keys_and_size():
    with torch.device("meta"):
        vitb = mage_fast.mage_vit_base_patch16(vqgan_ckpt_path=None).state_dict()
    tiny = fresh_tiny()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tiny, {"model": vitb})
    msg = str(e.value)
    assert "the file holds a pre-trained MAGE ViT-B; the model is a MAGE width 64, depth 2" in msg
    n_unexpected = len(set(vitb) - set(tiny.state_dict()))
    assert "unexpected keys: " in msg and f"({n_unexpected} in all)" in msg
    assert "mis-shaped keys (file vs model): cls_token (1, 1, 768) vs (1, 1, 64)" in msg


def test_finetuned_classifier_is_recognised(tiny_sd):
    clf = {"cls_token": torch.zeros(1, 1, 768), "pos_embed": torch.zeros(1, 197, 768),
           "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000),
           "fc_norm.weight": torch.ones(768), "fc_norm.bias": torch.zeros(768)}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(fresh_tiny(), {"model": clf})
    msg = str(e.value)
    assert "classifier" in msg and "197-position pos_embed" in msg
    assert "missing keys:" in msg and "unexpected keys:" in msg


def test_missing_key_is_named(tiny_sd):
    sd = dict(tiny_sd)
    del sd["mlm_layer.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: mlm_layer\.bias"):
        load_checkpoint(fresh_tiny(), sd)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(fresh_tiny(), str(p))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(fresh_tiny(), str(tmp_path / "nope.pth"))


def test_missing_default_tokenizer_file_says_how_to_build_without(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="vqgan_ckpt_path=None"):
        mage_fast.MAGE(embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                       decoder_num_heads=2, vqgan_config=TINY_VQGAN)


def _no_nan(model):
    return all(not t.isnan().any() for t in model.state_dict().values() if t.is_floating_point())


def test_from_pretrained_draws_no_initial_weights(tmp_path, tiny_sd):
    """The strict load replaces every weight, so none is drawn first: the global RNG is untouched.
    Fresh allocations are NaN under the test setup, so a weight the load missed would show."""
    path = tmp_path / "tiny.pth"
    torch.save({"model": tiny_sd}, path)
    rng = torch.get_rng_state()
    model = mage_fast.MAGE.from_pretrained(str(path))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_params(model, tiny_sd)
    assert _no_nan(model)
    assert not model.pos_embed.requires_grad and not any(p.requires_grad for p in model.vqgan.parameters())
    assert model.cls_token.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad


def test_init_weights_false_skips_the_draws_but_keeps_a_loaded_tokenizer(tmp_path, tiny_sd):
    vq = {k[len("vqgan."):]: v for k, v in tiny_sd.items() if k.startswith("vqgan.")}
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": vq}, path)
    rng = torch.get_rng_state()
    model = mage_fast.mage_vit_tiny(vqgan_ckpt_path=str(path), init_weights=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model.vqgan.quantize.embedding.weight, vq["quantize.embedding.weight"])
    assert model.blocks[0].attn.qkv.weight.isnan().all()  # allocated, never drawn
    torch.manual_seed(0)
    drawn = mage_fast.mage_vit_tiny()  # the default draws exactly as before: the same seed, the same weights
    assert_same_params(drawn, tiny_sd)


def test_cli_load_model_skips_the_draws_only_for_a_whole_checkpoint(tmp_path, tiny_sd):
    from mage_fast.cli import load_model
    whole, tok = tmp_path / "tiny.pth", tmp_path / "vqgan.ckpt"
    torch.save({"model": tiny_sd}, whole)
    torch.save({"state_dict": {k[len("vqgan."):]: v for k, v in tiny_sd.items() if k.startswith("vqgan.")}}, tok)
    for name in (None, "tiny"):
        rng = torch.get_rng_state()
        model, _ = load_model(str(whole), name)
        assert torch.equal(torch.get_rng_state(), rng), name
        assert_same_params(model, tiny_sd)
    model, _ = load_model(str(tok), "tiny")  # only the tokenizer is in the file: the rest is drawn as before
    assert _no_nan(model)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, tiny_sd["blocks.0.attn.qkv.weight"])
