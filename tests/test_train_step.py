"""The fast training step: the tokenizer's fp32 fast copy in the step, the fused AdamW, and the
throughput benchmark's check that the fast step computes the official one. The CPU training
attention and the hashed dropout, ops of their own, are tested in tests/ops/."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import mage_fast
from mage_fast.training import adamw, param_groups
from mage_fast.training.engine import keep_frozen_fp32
from mage_fast.training.objective import MAGEObjective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**kw):
    torch.manual_seed(0)
    m = mage_fast.MAGE(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                       decoder_num_heads=2, img_size=32, vqgan_config=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1,
                                                                           z_channels=32, embed_dim=32, n_embed=64),
                       vqgan_ckpt_path=None, **kw)
    for p in m.vqgan.parameters():
        p.requires_grad_(False)
    return m


def test_objective_tokens_equal_the_tokenizer_and_survive_a_bf16_cast():
    """The step's ids come from the fp32 fast copy: the same as model.tokenize; after a bf16 engine
    cast, from the kept fp32 weights (a bf16 tokenizer would pick other codes)."""
    m = _tiny()
    obj = MAGEObjective(m)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = m.tokenize(x)
    assert torch.equal(obj.tokens(x), want)
    ids = torch.randint(0, 64, (2, 256))
    assert torch.equal(obj.tokens(ids.int()), ids)
    keep_frozen_fp32(obj)
    obj.bfloat16()
    assert next(m.vqgan.parameters()).dtype == torch.bfloat16
    assert torch.equal(obj.tokens(x), want)
    with pytest.raises(ValueError):
        obj.tokens(torch.rand(2, 3, 16, 16))


def test_objective_tokens_refuse_a_cast_tokenizer_without_kept_weights():
    obj = MAGEObjective(_tiny())
    obj.bfloat16()
    with pytest.raises(RuntimeError, match="keep_frozen_fp32"):
        obj.tokens(torch.rand(1, 3, 32, 32))


def test_adamw_is_fused_and_updates_as_the_default_one():
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 8)
    b = torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    opt_a = adamw(param_groups(a, 0.05), 1e-2)
    assert opt_a.defaults["fused"] is True
    opt_b = torch.optim.AdamW([g for g in param_groups(b, 0.05) if g["params"]], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        x = torch.randn(4, 16)
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def _bench():
    spec = importlib.util.spec_from_file_location("train_throughput", os.path.join(REPO, "benchmarks",
                                                                                   "train_throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_fast_step_is_the_official_step():
    """The benchmark's own check on a tiny model: the fast paths' loss equals the official forward's
    (full logits, forward_loss, torch references) and every gradient is within 1e-5 relative."""
    bench = _bench()
    args = bench.parse_args(["--model", "tiny", "--img_size", "32", "--ch_mult", "1,2", "--batch_size", "3"])
    model, dev = bench.build(args)
    imgs, ids = bench.inputs(model, dev, 3)
    check = bench.check_same(model, dev, imgs, ids)
    assert set(check) == {"fast", "fast-ids"}
    for c in check.values():
        assert c["same_params_with_grad"]
        assert c["loss_rel_diff"] < 1e-6 and c["grad_max_rel_diff"] < 1e-5
    p = bench.Path("fast-bf16-ids", model, dev)
    t = p.step(imgs, ids)
    assert set(t) == set(bench.SECTIONS) | {"total"} and t["tokenizer"] < t["total"]


@pytest.mark.parametrize("argv, word", [(["--batch_size", "0"], "--batch_size"), (["--rounds", "-1"], "--rounds"),
                                        (["--img_size", "40"], "multiple of 16"), (["--paths", "bogus"], "--paths")])
def test_benchmark_refuses_bad_flags_in_one_line(argv, word):
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), *argv],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and word in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("name", ["reference", "fast-ids"])
def test_products_floor_replays_exactly_the_products_of_the_step(name):
    """The benchmark's products floor records every product of one step and replays it: the FLOPs of
    the replay equal torch's FLOP counter over the real step (every op on its plain-torch reference),
    so no product is missed, doubled or replayed at another shape; the reference, with its MLM head over
    every position and vocabulary column, has more of them than the fast step."""
    from torch.utils.flop_counter import FlopCounterMode

    from mage_fast.ops.dispatch import force_backend
    bench = _bench()
    args = bench.parse_args(["--model", "tiny", "--img_size", "32", "--ch_mult", "1,2", "--batch_size", "3"])
    model, dev = bench.build(args)
    imgs, ids = bench.inputs(model, dev, 3)
    p = bench.Path(name, model, dev)
    p.from_ids = True
    with force_backend("torch"), FlopCounterMode(display=False) as fc:
        p.loss(imgs, ids).backward()
    p.from_ids = name.endswith("-ids")
    floor = bench.products_floor(p, imgs, ids, reps=1)
    assert floor["gflop"] * 1e9 == pytest.approx(fc.get_total_flops(), rel=1e-9)
    assert floor["seconds"] > 0 and floor["distinct"] <= floor["products"]
    layers = len(model.blocks) + len(model.decoder_blocks)
    assert floor["by_op"]["bmm"]["calls"] == 6 * layers  # attention: two products forward, four backward
    if name == "reference":
        fast = bench.products_floor(bench.Path("fast-ids", model, dev), imgs, ids, reps=1)
        assert floor["gflop"] > fast["gflop"]


def test_gpu_checks_train_throughput_flags_are_the_benchmarks():
    """benchmarks/gpu_checks.sh runs train_throughput.py on a GPU machine, where a flag the benchmark
    does not have would end the check: its arguments must parse here."""
    import re
    import shlex
    text = open(os.path.join(REPO, "benchmarks", "gpu_checks.sh")).read().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "benchmarks/train_throughput.py" in ln)
    argv = shlex.split(re.sub(r"\$\w+", "X", line.split("benchmarks/train_throughput.py", 1)[1]))
    args = _bench().parse_args(argv)
    assert args.model == "vit_base" and args.batch_size == 64
