"""Compile every Triton kernel for a GPU architecture without a GPU (Triton ships ptxas).

    python -m mage_fast.triton.compile_check [--arch 90] [--dtypes fp16,bf16,fp32] [--all-configs]

Catches what the interpreter cannot: typing and lowering errors, unsupported ``tl.dot`` precisions,
tiles over the shared-memory limit (reported per kernel, as the autotuner would skip them). Run it
with ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_FLOAT_ARGS = {"noise_scale", "qk_scale", "sm_scale", "p_drop", "eps", "smoothing"}
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def _signature(fn, data: str, pointers: dict, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, data)
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def _cases(dtype: str, all_configs: bool):
    from . import attention, codebook, decode_step, layer_norm, mlm_head_loss, token_drop, token_embed
    f32 = dtype == "fp32"
    fp32 = "fp32"

    def cfgs(configs):
        return configs if all_configs else configs[:1]

    for c in cfgs(codebook._F32_CONFIGS if f32 else codebook._HALF_CONFIGS):
        for d in (16, 256):
            yield (codebook._codebook_nn_kernel, {"out_ptr": "i64"},
                   dict(COSINE=d == 16, COMPUTE_F32=f32, BLOCK_D=d, **c.kwargs), c.num_warps, c.num_stages)
    yield (decode_step._sample_kernel, {"ids_ptr": "i64", "key_ptr": "i64", "sampled_ptr": "i64", "conf_ptr": fp32},
           dict(STREAM_SAMPLE=decode_step._STREAM_SAMPLE, STREAM_CONF=decode_step._STREAM_CONF, LIBDEVICE=True,
                BLOCK_N=4, BLOCK_C=1024), 4, 1)
    yield (decode_step._remask_kernel, {"conf_ptr": fp32, "sampled_ptr": "i64", "next_ptr": "i64"},
           dict(BLOCK_N=256, BLOCK_J=32), 4, 1)
    yield token_drop._gather_kernel, {"idx_ptr": "i64"}, dict(BLOCK_K=16, BLOCK_D=256), 4, 1
    yield token_drop._gather_bwd_kernel, {"idx_ptr": "i64", "dx_ptr": fp32}, dict(BLOCK_K=16, BLOCK_D=256), 4, 1
    yield token_drop._scatter_kernel, {"src_ptr": "i32", "mask_ptr": "i1"}, dict(BLOCK_L=16, BLOCK_D=256), 4, 1
    yield (token_drop._scatter_bwd_kernel, {"src_ptr": "i32", "mask_ptr": "i1", "idx_ptr": "i64"},
           dict(BLOCK_R=64, BLOCK_D=64), 4, 1)
    stats = {"lse_ptr": fp32, "delta_ptr": fp32, "seed_ptr": "i64"}
    for kernel, configs in ((attention._fwd_kernel, attention._fwd_configs()),
                            (attention._bwd_dkdv_kernel, attention._bwd_configs()),
                            (attention._bwd_dq_kernel, attention._dq_tuned.configs)):
        for c in cfgs(configs):
            for d, causal, dropout in ((64, False, True), (128, True, False)):
                yield (kernel, stats, dict(CAUSAL=causal, DROPOUT=dropout, F32=f32, BLOCK_D=d, **c.kwargs),
                       c.num_warps, c.num_stages)
    ln = {"mean_ptr": fp32, "rstd_ptr": fp32, "dw_ptr": fp32, "db_ptr": fp32}
    yield layer_norm._ln_fwd_kernel, ln, dict(BLOCK_M=4, BLOCK_D=1024), 4, 1
    yield layer_norm._ln_bwd_kernel, ln, dict(BLOCK_M=4, BLOCK_D=1024), 4, 1
    yield (mlm_head_loss._smoothed_ce_kernel,
           {"target_ptr": "i64", "weight_ptr": fp32, "denom_ptr": fp32, "loss_ptr": fp32},
           dict(WRITE_GRAD=True, BLOCK_R=4, BLOCK_C=1024), 4, 1)
    emb = {"ids_ptr": "i64", "pos_ptr": "i64", "mean_ptr": fp32, "rstd_ptr": fp32, "dw_ptr": fp32, "dp_ptr": fp32,
           "dlnw_ptr": fp32, "dlnb_ptr": fp32}
    yield token_embed._embed_fwd_kernel, emb, dict(BLOCK_M=4, BLOCK_D=1024), 4, 1
    yield token_embed._embed_bwd_kernel, emb, dict(BLOCK_M=4, BLOCK_D=1024), 4, 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--all-configs", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype in args.dtypes.split(","):
        for kernel, pointers, consts, warps, stages in _cases(dtype, args.all_configs):
            t0 = time.time()
            label = f"{dtype} {kernel.fn.__name__} {consts} warps={warps} stages={stages}"
            try:
                src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, pointers, consts), constexprs=consts)
                k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                shared = k.metadata.shared
                over = shared > SHARED_LIMIT.get(args.arch, 232448)
                print(f"{'SKIPPED-BY-AUTOTUNE' if over else 'ok'} {label}: shared {shared} B, "
                      f"{time.time() - t0:.1f} s", flush=True)
            except Exception as e:
                failures += 1
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
