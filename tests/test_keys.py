"""Official state-dict key lists at ViT-B and ViT-L: every key, shape and dtype, in order."""
import pytest
import torch

import mage_fast
from conftest import SHARED


def read_key_list(name):
    path = SHARED / "fixtures" / f"official_state_dict_{name}.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (official key lists live in ../shared/fixtures)")
    rows = []
    for line in path.read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return rows


@pytest.mark.parametrize("name,factory,params_m", [("vitb", mage_fast.mage_vit_base_patch16, 146.5),
                                                    ("vitl", mage_fast.mage_vit_large_patch16, 409.9)])
def test_official_key_list(name, factory, params_m):
    with torch.device("meta"):
        model = factory(vqgan_ckpt_path=None)
    ours = [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    assert ours == read_key_list(name)
    n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("vqgan."))
    assert round(n / 1e6, 1) == params_m
    assert model.mask_token_label == 2024 and model.fake_class_label == 1100 and model.codebook_size == 1024
    assert model.seq_len == 256 and model.token_emb.position_ids.dtype == torch.int64
