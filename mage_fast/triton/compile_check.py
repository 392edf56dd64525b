"""Compile every Triton kernel for a GPU architecture without a GPU, and report its resources.

    python -m mage_fast.triton.compile_check [--arch 90] [--json PATH] [--subset] [--only NAME,...]

Every autotune config of every kernel is compiled at the shapes ViT-B runs at batch 64 (encoder 12 heads,
d=64, N=257 and N=129; decoder 16 heads, d=48; tokenizer codebook K=1024 and 262144, D=256, bf16, fp32 and
the autocast mix bf16 z / fp32 codebook; decode step B=64, N=256, C=1024; LayerNorm and embedding at
D=768), with the integer and pointer specialisations a real launch gets (multiples of 16, unit strides).
For each config it records shared memory, registers, spill bytes (``ptxas -v``) and SASS instructions,
and judges it launchable on the architecture. Exit status 1 when a kernel fails to compile, when a kernel
has no launchable config, or when a kernel launched without autotuning (one config) spills.

Catches what the interpreter cannot: typing and lowering errors, unsupported ``tl.dot`` precisions,
tiles over the shared-memory or register file, spills. Run it with ``TRITON_INTERPRET`` unset. The ptxas
is the one Triton picks for the architecture (for sm_90 with Triton 3.9 its ``ptxas-blackwell``: the
bundled ``ptxas`` 12.9 rejects the PTX 9.x Triton emits); ``TRITON_PTXAS_BLACKWELL_PATH`` overrides it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_FLOAT_ARGS = {"noise_scale", "qk_scale", "sm_scale", "p_drop", "eps", "smoothing"}
# Per-block limits: opt-in shared memory (bytes), 32-bit registers per SM and per thread, threads.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
REGISTERS_PER_SM = 65536
MAX_THREADS = 1024
# Grid limits of every CUDA architecture Triton targets: x up to 2^31 - 1, y and z up to 65535.
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


@dataclasses.dataclass
class Case:
    """One compile: a kernel at one config, with the argument types and values of a real launch."""

    op: str  # what the kernel serves, e.g. "attention encoder N=257 bf16"
    kernel: object  # the @triton.jit function
    pointers: dict  # pointer argument -> element type ("fp32", "bf16", "i64", ...); others: `data`
    data: str  # element type of unlisted pointers
    consts: dict  # constexpr arguments (and specialised ints equal to 1)
    ints: dict  # integer argument -> value at the real shape (multiples of 16 get Triton's hint)
    num_warps: int
    num_stages: int
    autotuned: bool  # False: this is the one config the launcher uses
    options: dict = dataclasses.field(default_factory=dict)  # extra compile options of the launcher

    def label(self) -> str:
        meta = {k: v for k, v in self.consts.items() if k.isupper()}
        return (f"{self.op} {self.kernel.fn.__name__} {meta} warps={self.num_warps} stages={self.num_stages}"
                + (f" {self.options}" if self.options else ""))


def signature(case: Case) -> tuple[dict, dict]:
    """(signature, attrs) as the launcher would specialise them: pointers 16-byte aligned, ints % 16."""
    sig, attrs = {}, {}
    for i, name in enumerate(case.kernel.arg_names):
        if name in case.consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + case.pointers.get(name, case.data)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            value = case.ints.get(name)
            sig[name] = "i64" if value is not None and abs(value) >= 2 ** 31 else "i32"
            if value is not None and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_case(case: Case, arch: int = 90):
    sig, attrs = signature(case)
    consts = {k: v for k, v in case.consts.items() if k in case.kernel.arg_names}
    src = ASTSource(fn=case.kernel, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages, **case.options}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself runs for ``arch``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except ImportError:  # older Triton: one bundled ptxas
        from triton import knobs
        return knobs.nvidia.ptxas.path


def _tool(name: str) -> Optional[str]:
    from triton import knobs
    try:
        return getattr(knobs.nvidia, name).path
    except Exception:
        return None


def resources(kernel, arch: int, fp_fusion: bool) -> dict:
    """Shared memory (Triton's metadata), registers and spills (``ptxas -v`` on the kernel's PTX, with
    the options Triton used), SASS instruction count (``nvdisasm`` of the cubin)."""
    out = {"shared_bytes": int(kernel.metadata.shared)}
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        cmd = [ptxas_path(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", ptx, "-o", os.path.join(tmp, "k.o")]
        if not fp_fusion:
            cmd.insert(1, "--fmad=false")
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        m = re.search(r"Used (\d+) registers", log)
        out["registers"] = int(m.group(1)) if m else None
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        out["spill_store_bytes"], out["spill_load_bytes"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        nvdisasm = _tool("nvdisasm")
        if nvdisasm:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(kernel.asm["cubin"])
            sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True).stdout
            out["sass_instructions"] = sum(1 for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line))
    return out


def launchable(res: dict, num_warps: int, arch: int) -> Optional[str]:
    """None when a block with these resources can be resident on ``arch``; otherwise why not."""
    threads = 32 * num_warps
    if res["shared_bytes"] > SHARED_LIMIT.get(arch, 232448):
        return f"shared memory {res['shared_bytes']} B > {SHARED_LIMIT.get(arch, 232448)} B"
    if threads > MAX_THREADS:
        return f"{threads} threads > {MAX_THREADS}"
    if res.get("registers") is not None and res["registers"] * threads > REGISTERS_PER_SM:
        return f"{res['registers']} registers x {threads} threads > {REGISTERS_PER_SM}"
    return None


def contracted_fp32_ops(ptx: str) -> dict:
    """fp32 arithmetic in ``ptx`` that may round differently from torch: fused multiply-adds the
    compiler formed (``fma.rn.f32``; libdevice's own explicit ones are ``fma.rn.ftz.f32``) and products
    or sums without a rounding mode, which ptxas may still contract unless it runs with --fmad=false."""
    return {
        "fma.rn.f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        "mul.f32": len(re.findall(r"\bmul\.f32\b", ptx)),
        "add.f32": len(re.findall(r"\badd\.f32\b", ptx)),
        "sub.f32": len(re.findall(r"\bsub\.f32\b", ptx)),
    }


# ------------------------------------------------------------------------------- the cases
def _configs(configs, subset: bool):
    return configs[:1] if subset else configs


def attention_cases(subset: bool = False) -> Iterator[Case]:
    from . import attention
    B = 64
    shapes = [("encoder N=257", 12, 257, 64), ("encoder N=129", 12, 129, 64), ("decoder N=257", 16, 257, 48)]
    if subset:
        shapes = shapes[2:]
    stats = {"lse_ptr": "fp32", "delta_ptr": "fp32", "seed_ptr": "i64"}
    kernels = ((attention._fwd_kernel, attention._fwd_tuned.configs),
               (attention._bwd_dkdv_kernel, attention._dkdv_tuned.configs),
               (attention._bwd_dq_kernel, attention._dq_tuned.configs))
    for dtype in (("bf16",) if subset else ("bf16", "fp32")):
        for name, H, N, d in shapes:
            s = N * d
            ints = dict(sqb=H * s, sqh=s, sqn=d, skb=H * s, skh=s, skn=d, svb=H * s, svh=s, svn=d,
                        H=H, N_Q=N, N_K=N, D=d)
            for kernel, configs in kernels:
                for c in _configs(configs, subset):
                    for dropout in ((True,) if subset else (False, True)):
                        yield Case(f"attention {name} {dtype}", kernel, stats, dtype,
                                   dict(CAUSAL=False, DROPOUT=dropout, F32=dtype == "fp32",
                                        BLOCK_D=max(16, triton.next_power_of_2(d)), **c.kwargs),
                                   ints, c.num_warps, c.num_stages, autotuned=True)


def codebook_cases(subset: bool = False) -> Iterator[Case]:
    from . import codebook
    N, D = 64 * 256, 256
    paths = [("bf16", "bf16", "bf16"), ("fp32", "fp32", "fp32"), ("autocast", "bf16", "fp32")]
    yield Case(f"codebook norms D={D}", codebook._code_norm_kernel, {"norm_ptr": "fp32"}, "bf16",
               dict(COSINE=False, BLOCK_K=4096 // D, BLOCK_D=D), dict(K=262144, D=D, stride_ek=D), 4, 1, False)
    for K in ((262144,) if subset else (1024, 262144)):
        for name, zt, et in (paths[2:] if subset else paths):
            f32 = zt != "bf16" or et != "bf16"
            for c in _configs(codebook.configs_for(f32), subset):
                yield Case(f"codebook K={K} D={D} {name}", codebook._codebook_nn_kernel,
                           {"z_ptr": zt, "e_ptr": et, "norm_ptr": "fp32", "best_ptr": "i64", "out_ptr": "i64"}, et,
                           {**codebook.launch_meta(D, f32, cosine=False), **c.kwargs},
                           dict(N=N, K=K, D=D, stride_zn=D, stride_ek=D, codes_per_program=K),
                           c.num_warps, c.num_stages, autotuned=True)


def decode_step_cases(subset: bool = False) -> Iterator[Case]:
    from . import decode_step as ds
    B, N, C = 64, 256, 1024
    for dtype in (("fp32",) if subset else ("fp32", "bf16")):
        (bn, bc, warps), (ball, bj, rwarps) = ds.sample_blocks(N, C), ds.remask_blocks(N)
        yield Case(f"decode step B={B} N={N} C={C} {dtype}", ds._sample_kernel,
                   {"ids_ptr": "i64", "key_ptr": "i64", "sampled_ptr": "i64", "conf_ptr": "fp32"}, dtype,
                   dict(STREAM_SAMPLE=ds._STREAM_SAMPLE, STREAM_CONF=ds._STREAM_CONF, LIBDEVICE=True,
                        BLOCK_N=bn, BLOCK_C=bc, stride_lc=1),
                   dict(N=N, C=C, mask_id=C, stride_lb=N * C, stride_ln=C), warps, 1, autotuned=False,
                   options=dict(ds.LAUNCH_OPTIONS))
    yield Case(f"decode step B={B} N={N}", ds._remask_kernel, {"sampled_ptr": "i64", "next_ptr": "i64"}, "fp32",
               dict(BLOCK_N=ball, BLOCK_J=bj), dict(N=N, mask_id=C), rwarps, 1, autotuned=False,
               options=dict(ds.LAUNCH_OPTIONS))


def row_op_cases(subset: bool = False) -> Iterator[Case]:
    """LayerNorm, token embedding, token dropping and the MLM loss: one config each, chosen by the launcher."""
    from . import layer_norm, mlm_head_loss, token_drop, token_embed
    M, D, L, K, C = 64 * 257, 768, 257, 129, 1024
    for dtype in (("bf16",) if subset else ("bf16", "fp32")):
        meta = layer_norm.blocks(D, M)
        w = meta.pop("num_warps")
        ln = {"mean_ptr": "fp32", "rstd_ptr": "fp32", "dw_ptr": "fp32", "db_ptr": "fp32"}
        yield Case(f"layer_norm D={D} {dtype}", layer_norm._ln_fwd_kernel, ln, dtype, meta, dict(M=M, D=D), w, 1,
                   False)
        yield Case(f"layer_norm D={D} {dtype}", layer_norm._ln_bwd_kernel, ln, dtype, meta, dict(M=M, D=D), w, 1,
                   False)
        if subset:
            continue
        emb = {"ids_ptr": "i64", "pos_ptr": "i64", "hot_ptr": "i64", "mean_ptr": "fp32", "rstd_ptr": "fp32",
               "dw_ptr": "fp32", "dp_ptr": "fp32", "dlnw_ptr": "fp32", "dlnb_ptr": "fp32"}
        yield Case(f"token_embed D={D} {dtype}", token_embed._embed_fwd_kernel, emb, dtype, meta, dict(M=M, D=D), w,
                   1, False)
        yield Case(f"token_embed D={D} {dtype}", token_embed._embed_bwd_kernel, emb, dtype, meta, dict(M=M, D=D), w,
                   1, False)
        bk, bdd = token_drop._blocks(K, D)
        yield Case(f"token_drop D={D} {dtype}", token_drop._gather_kernel, {"idx_ptr": "i64"}, dtype,
                   dict(BLOCK_K=bk, BLOCK_D=bdd), dict(L=L, K=K, D=D), 4, 1, False)
        yield Case(f"token_drop D={D} {dtype}", token_drop._gather_bwd_kernel, {"idx_ptr": "i64", "dx_ptr": "fp32"},
                   dtype, dict(BLOCK_K=bk, BLOCK_D=bdd), dict(L=L, K=K, D=D), 4, 1, False)
        bl, bdd = token_drop._blocks(L, D)
        yield Case(f"token_drop D={D} {dtype}", token_drop._scatter_kernel, {"src_ptr": "i32", "mask_ptr": "i1"},
                   dtype, dict(BLOCK_L=bl, BLOCK_D=bdd), dict(L=L, K=K, D=D), 4, 1, False)
        yield Case(f"token_drop D={D} {dtype}", token_drop._scatter_bwd_kernel,
                   {"src_ptr": "i32", "mask_ptr": "i1", "idx_ptr": "i64"}, dtype,
                   dict(BLOCK_R=64, BLOCK_D=64), dict(L=L, K=K, D=D), 4, 1, False)
        br, bc, w = mlm_head_loss.ce_blocks(M, C)
        yield Case(f"mlm loss C={C} {dtype}", mlm_head_loss._smoothed_ce_kernel,
                   {"target_ptr": "i64", "weight_ptr": "fp32", "denom_ptr": "fp32", "loss_ptr": "fp32"}, dtype,
                   dict(WRITE_GRAD=True, BLOCK_R=br, BLOCK_C=bc), dict(R=M, C=C, stride_r=C), w, 1, False)


ALL = {"attention": attention_cases, "codebook": codebook_cases, "decode_step": decode_step_cases,
       "rows": row_op_cases}


def run(cases, arch: int = 90, log=print) -> tuple[list[dict], list[str]]:
    """Compile the cases; returns (one record per case, failures). Identical compiles are done once."""
    records, failures, done = [], [], {}
    for case in cases:
        sig, attrs = signature(case)
        key = (case.kernel.fn.__name__, str(sig), str(attrs), str(sorted(case.consts.items())), case.num_warps,
               case.num_stages, str(case.options))
        rec = {"op": case.op, "kernel": case.kernel.fn.__name__,
               "config": {k: v for k, v in case.consts.items() if k.isupper() and k.startswith("BLOCK")},
               "meta": {k: v for k, v in case.consts.items() if k.isupper() and not k.startswith("BLOCK")},
               "num_warps": case.num_warps, "num_stages": case.num_stages, "autotuned": case.autotuned}
        t0 = time.time()
        if key not in done:
            try:
                k = compile_case(case, arch)
                res = resources(k, arch, case.options.get("enable_fp_fusion", True))
                res["launch_problem"] = launchable(res, case.num_warps, arch)
                done[key] = res
            except Exception as e:
                done[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        rec.update(done[key])
        rec["compile_s"] = round(time.time() - t0, 2)
        records.append(rec)
        if "error" in rec:
            failures.append(f"FAIL {case.label()}: {rec['error']}")
            log(failures[-1], flush=True)
            continue
        verdict = "ok" if rec["launch_problem"] is None else f"CANNOT LAUNCH ({rec['launch_problem']})"
        log(f"{verdict} {case.label()}: shared {rec['shared_bytes']} B, {rec['registers']} regs, spills "
            f"{rec['spill_store_bytes']}/{rec['spill_load_bytes']} B, {rec.get('sass_instructions')} SASS, "
            f"{rec['compile_s']} s", flush=True)
    failures += judge(records)
    return records, failures


def judge(records: list[dict]) -> list[str]:
    """Per kernel and op: at least one launchable config; a launcher's only config must not spill."""
    problems, groups = [], {}
    for r in records:
        if "error" not in r:
            groups.setdefault((r["op"], r["kernel"], str(r["meta"])), []).append(r)
    for (op, kernel, meta), rs in groups.items():
        if all(r["launch_problem"] is not None for r in rs):
            problems.append(f"NO LAUNCHABLE CONFIG {op} {kernel} {meta}: " + "; ".join(r["launch_problem"] for r in rs))
        for r in rs:
            if not r["autotuned"] and (r["spill_store_bytes"] or 0) > 0:
                problems.append(f"SPILLS {op} {kernel} {meta} {r['config']}: {r['spill_store_bytes']} B stores")
    return problems


def _environment(arch: int) -> dict:
    ptxas = ptxas_path(arch)
    env = {"triton": triton.__version__, "arch": f"sm_{arch}", "ptxas": os.path.basename(ptxas)}
    try:
        env["ptxas_version"] = subprocess.run([ptxas, "--version"], capture_output=True,
                                              text=True).stdout.strip().splitlines()[-1]
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, IndexError):
        pass
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", default=None, help="write the records here (default: "
                    "benchmarks/results/gpu_resources_sm<arch>.json of the repository, full runs only)")
    ap.add_argument("--subset", action="store_true", help="one config per kernel and shape (what the CI test runs)")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated groups of {', '.join(ALL)}")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    groups = args.only.split(",")
    unknown = [g for g in groups if g not in ALL]
    if unknown:
        print(f"unknown groups {unknown} (known: {', '.join(ALL)})", file=sys.stderr)
        return 2
    t0 = time.time()
    records, failures = run((c for g in groups for c in ALL[g](args.subset)), args.arch)
    path = args.json
    if path is None and not args.subset and groups == list(ALL):
        path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results",
                            f"gpu_resources_sm{args.arch}.json")
    if path:
        with open(path, "w") as f:
            json.dump({"environment": _environment(args.arch), "seconds": round(time.time() - t0, 1),
                       "failures": failures, "records": records}, f, indent=1)
            f.write("\n")
        print(f"wrote {os.path.normpath(path)}")
    for line in failures:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
