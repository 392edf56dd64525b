"""ctest `python_ops`: load a built mage_fast._C from its path and check every op against the reference.

    python csrc/tests/check_extension.py path/to/_C.cpython-*.so
"""
import importlib.util
import os
import sys

import torch


def load(path):
    spec = importlib.util.spec_from_file_location("mage_fast._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # registers torch.ops.mage_fast
    return mod


def main():
    mod = load(sys.argv[1])
    os.environ["MAGE_FAST_DISABLE_EXT"] = "1"  # the package must not load a second copy (e.g. an in-place build)
    from mage_fast.ops.codebook import codebook_nn_ref
    from mage_fast.ops.decode_step import decode_step_ref
    from mage_fast.ops.token_drop import gather_tokens_ref, scatter_tokens_ref
    ops = torch.ops.mage_fast
    torch.manual_seed(0)
    z, cb = torch.randint(-3, 4, (37, 11)).float(), torch.randint(-3, 4, (301, 11)).float()
    assert torch.equal(ops.codebook_nn(z, cb, "l2"), codebook_nn_ref(z, cb, "l2")), "codebook_nn"
    logits, ids, key = torch.randn(3, 29, 17), torch.full((3, 29), 17), torch.tensor([1, 2, 3])
    ids[:, ::4] = 2
    for a, b in zip(ops.decode_step(logits, ids, key, 2, 9, 1.5, 17), decode_step_ref(logits, ids, key, 2, 9, 1.5, 17)):
        assert torch.equal(a, b), "decode_step"
    x, index = torch.randn(2, 13, 5), torch.stack([torch.randperm(13)[:6] for _ in range(2)])
    assert torch.equal(ops.gather_tokens(x, index), gather_tokens_ref(x, index)), "gather_tokens"
    index[:, 0] = 0
    index[:, 1:] = torch.stack([torch.randperm(12)[:5] + 1 for _ in range(2)])
    kept, mask, pos = torch.randn(2, 6, 5), torch.rand(2, 13) < 0.3, torch.randn(1, 13, 5)
    assert torch.equal(ops.scatter_tokens(kept, index, mask, pos), scatter_tokens_ref(kept, index, mask, pos))
    print(f"{mod.__file__}: abi {mod.abi_version}, cuda {mod.with_cuda}: all ops match their references")


if __name__ == "__main__":
    main()
