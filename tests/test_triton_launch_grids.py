"""Every Triton launcher's grid fits CUDA's limits (x < 2^31, y and z <= 65535) at large batches.

The launches are recorded instead of run: in the interpreter (the blocks the CPU tests use) and with
the launchers' GPU choices (fixed blocks, and every autotune config of the autotuned kernels), at
batch sizes where batch * heads or the row count passes 65535 (a 4096-image probe batch of a
16-head model).
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton not installed")
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from mage_fast.triton import attention, codebook, decode_step, layer_norm, mlm_head_loss  # noqa: E402
from mage_fast.triton import token_drop, token_embed  # noqa: E402
from mage_fast.triton.compile_check import GRID_LIMITS  # noqa: E402

MODULES = (attention, codebook, decode_step, layer_norm, mlm_head_loss, token_drop, token_embed)


def _dims(grid):
    return tuple(grid) + (1,) * (3 - len(grid))


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel, grid) of every launch; nothing runs."""
    seen = []

    def interpreted(self, *args, grid, warmup=False, **kwargs):
        seen.append((self.fn.__name__, _dims(grid(kwargs) if callable(grid) else grid)))

    def tuned(self, *args, grid, warmup=False, **kwargs):
        for c in self.configs:
            seen.append((self.base_fn.__name__ + str(c.kwargs), _dims(grid({**kwargs, **c.kwargs}))))

    monkeypatch.setattr(InterpretedFunction, "run", interpreted)
    monkeypatch.setattr(Autotuner, "run", tuned)
    return seen


def _call_every_launcher():
    B, H = 4096, 17  # batch * heads = 69632
    q = torch.randn(B, H, 3, 16)
    o, lse = attention.attention_fwd(q, q, q, torch.zeros(1, dtype=torch.int64), 0.1, False, 0.25)
    attention.attention_bwd(q, q, q, q, o, lse, torch.zeros(1, dtype=torch.int64), 0.1, False, 0.25)
    attention.dropout_keep_mask(B, H, 3, 3, 0.1, torch.zeros(1, dtype=torch.int64))
    rows = 70000
    codebook.codebook_nn_triton(torch.randn(rows, 4), torch.randn(300, 4))
    codebook.codebook_nn_triton(torch.randn(rows, 4, dtype=torch.bfloat16), torch.randn(300, 4))
    decode_step.decode_step_triton(torch.randn(rows, 2, 3), torch.full((rows, 2), 3), torch.zeros(rows,
                                   dtype=torch.int64), 0, 1, 1.0, 3)
    x, w = torch.randn(rows, 4), torch.ones(4)
    _, mean, rstd = layer_norm.layer_norm_fwd(x, w, w, 1e-5)
    layer_norm.layer_norm_bwd(x, x, w, mean, rstd)
    ids = torch.zeros(rows, 1, dtype=torch.int64)
    emb = torch.randn(2, 4)
    _, mean, rstd = token_embed.token_embed_fwd(ids, ids, emb, emb, w, w, 1e-6)
    token_embed.token_embed_bwd(torch.randn(rows, 1, 4), ids, ids, emb, emb, w, mean, rstd)
    index = torch.zeros(rows, 1, dtype=torch.int64)
    token_drop.gather_fwd(torch.randn(rows, 2, 4), index)
    token_drop.gather_bwd(torch.randn(rows, 1, 4), index, 2)
    all_mask = torch.zeros(rows, 2, dtype=torch.bool)
    token_drop.scatter_fwd(torch.randn(rows, 1, 4), index, all_mask, torch.randn(1, 2, 4))
    token_drop.scatter_bwd(torch.randn(rows, 2, 4), index, all_mask, torch.float32)
    mlm_head_loss.smoothed_ce_(torch.randn(rows, 3), torch.zeros(3), torch.zeros(rows, dtype=torch.int64),
                               torch.ones(rows), torch.ones(1), 0.1, True)


def _assert_within_limits(launches):
    kernels = {name.split("{")[0] for name, _ in launches}
    for expected in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_codebook_nn_kernel", "_sample_kernel",
                     "_remask_kernel", "_ln_fwd_kernel", "_embed_bwd_kernel", "_scatter_bwd_kernel"):
        assert expected in kernels, f"{expected} was not launched"
    bad = [(name, grid) for name, grid in launches if any(g > lim or g < 1 for g, lim in zip(grid, GRID_LIMITS))]
    assert not bad, f"grids outside CUDA's limits {GRID_LIMITS}: {bad[:5]}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="records interpreter launches (CPU tensors)")
def test_interpreter_grids_fit_the_limits(launches):
    _call_every_launcher()
    _assert_within_limits(launches)


@pytest.mark.skipif(torch.cuda.is_available(), reason="records launches of CPU tensors")
def test_gpu_grids_fit_the_limits(launches, monkeypatch):
    for mod in MODULES:
        if hasattr(mod, "INTERPRET"):
            monkeypatch.setattr(mod, "INTERPRET", False)
    monkeypatch.setattr(layer_norm, "_num_sms", lambda device: 132)
    monkeypatch.setattr(token_embed, "_num_sms", lambda device: 132)
    if hasattr(codebook, "_num_sms"):
        monkeypatch.setattr(codebook, "_num_sms", lambda device: 132)
    _call_every_launcher()
    assert any("{" in name for name, _ in launches), "no autotuned launch was recorded"
    _assert_within_limits(launches)
