"""`python -m mage_fast info`: versions, device, compiled extension, and which backend each op picks."""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import subprocess

import torch

from . import __version__
from .ops.dispatch import Op


def _example_args(device: torch.device) -> dict:
    """Representative calls per op (real MAGE shapes, small batch) for backend selection."""
    f32 = dict(device=device, dtype=torch.float32)
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    L = 257
    return {
        "codebook_nn": ((torch.randn(256, 256, **f32), torch.randn(1024, 256, **f32), "l2"), {}),
        "codebook_nn (cosine, ViT-VQGAN)": ((torch.randn(256, 32, **f32), torch.randn(8192, 32, **f32), "cosine"), {}),
        "decode_step": ((torch.randn(2, 256, 1024, **f32), torch.full((2, 256), 2024, device=device),
                         torch.zeros(2, dtype=torch.long, device=device), 0, 255, 6.0, 2024), {}),
        "gather_tokens": ((torch.randn(2, L, 768, **f32), torch.zeros(2, 129, dtype=torch.long, device=device)), {}),
        "scatter_tokens": ((torch.randn(2, 129, 768, **f32), torch.zeros(2, 129, dtype=torch.long, device=device),
                            torch.zeros(2, L, dtype=torch.bool, device=device), torch.zeros(1, L, 768, **f32)), {}),
        "attention": ((*(torch.randn(2, 12, L, 64, device=device, dtype=half) for _ in range(3)),),
                      dict(dropout_p=0.0, causal=False, scale=None)),
        "attention (causal, VIM)": ((*(torch.randn(2, 12, 256, 64, device=device, dtype=half) for _ in range(3)),),
                                    dict(dropout_p=0.0, causal=True, scale=None)),
        "attention (training, dropout 0.1)": ((*(torch.randn(2, 12, L, 64, device=device, dtype=half,
                                                             requires_grad=True) for _ in range(3)),),
                                              dict(dropout_p=0.1, causal=False, scale=None)),
        "dropout": ((torch.randn(2, L, 3072, device=device, dtype=half), 0.1), {}),
        # the VQGAN decoder's last level (128 channels) at a 256-px image's 128-px stage
        "group_norm_silu": ((torch.randn(1, 128, 128, 128, **f32), 32, torch.ones(128, **f32),
                             torch.zeros(128, **f32), 1e-6), {}),
        "winograd_conv3x3": ((torch.randn(1, 128, 64, 64, **f32), torch.randn(128, 128, 3, 3, **f32),
                              torch.zeros(128, **f32), True), {}),
        "linear": ((torch.randn(2, L, 768, **f32), torch.randn(3072, 768, **f32), torch.randn(3072, **f32)), {}),
        "masked_ce": ((torch.randn(2, 256, 1024, **f32), torch.zeros(2, 256, dtype=torch.long, device=device),
                       torch.ones(2, 256, **f32), 0.1), {}),
    }


def versions() -> dict:
    out = {"mage_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cuda (torch build)": torch.version.cuda or "none"}
    # Read from package metadata: importing deepspeed or DALI just to print a version is slow.
    for label, dists in (("numpy", ("numpy",)), ("triton", ("triton",)), ("deepspeed", ("deepspeed",)),
                         ("nvidia-dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")),
                         ("flash-attn", ("flash-attn", "flash_attn_4", "flash-attn-4")), ("xformers", ("xformers",)),
                        ("torchao", ("torchao",)), ("onnx", ("onnx",)), ("onnxruntime", ("onnxruntime",)),
                        ("openvino", ("openvino",))):
        out[label] = "not installed"
        for dist in dists:
            try:
                out[label] = f"{importlib.metadata.version(dist)}" + ("" if dist == dists[0] else f" ({dist})")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    return f"CPU {cpu_model()}{cpu_matrix_units()}, {torch.get_num_threads()} torch threads"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else the platform's machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that decide CPU speed, as /proc/cpuinfo's flags name them: (label, flags that
# make it up). A group of several flags shows which of them are present, e.g. "AVX-512 (F/BW/VL)".
ISA_GROUPS = (
    ("AVX2", {"": "avx2"}),
    ("AVX-512", {"F": "avx512f", "BW": "avx512bw", "VL": "avx512vl"}),
    ("AVX512-BF16", {"": "avx512_bf16"}),
    ("AVX512-VNNI", {"": "avx512_vnni"}),
    ("AVX-VNNI", {"": "avx_vnni"}),
    ("AMX", {"bf16": "amx_bf16", "int8": "amx_int8"}),
)


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_instruction_sets(flags=None) -> dict:
    """The CPU's model and the instruction sets that decide fp32, bf16 and int8 speed, from
    /proc/cpuinfo: ``{"model", "flags": {flag: bool}, "present": [...], "absent": [...],
    "summary"}``, e.g. summary ``"AVX2, AVX-512 (F/BW/VL), AVX512-BF16, AVX512-VNNI, AVX-VNNI,
    AMX (bf16/int8)"`` or ``"AVX2; absent: AVX-512, AVX512-BF16, AVX512-VNNI, AVX-VNNI, AMX"``.
    ``flags``: a set of flag names to describe instead of this CPU's."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    present, absent, seen = [], [], {}
    for label, parts in ISA_GROUPS:
        have = [name for name, flag in parts.items() if flag in flags]
        seen.update({flag: flag in flags for flag in parts.values()})
        if not have:
            absent.append(label)
        elif have == [""]:
            present.append(label)
        else:
            present.append(f"{label} ({'/'.join(have)})")
    if not flags:
        summary = "unknown (no /proc/cpuinfo flags)"
    else:
        summary = ", ".join(present) or "none of " + ", ".join(label for label, _ in ISA_GROUPS)
        if present and absent:
            summary += "; absent: " + ", ".join(absent)
    return {"model": cpu_model(), "flags": seen, "present": present, "absent": absent, "summary": summary}


def cpu_bf16_native_flags(flags=None) -> bool:
    """Whether /proc/cpuinfo says the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX bf16)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_matrix_units() -> str:
    """' (AVX512, AMX bf16/int8)', ' (AVX512, AVX512-BF16, VNNI int8)', ' (AVX2)' or '': what decides
    the bf16 and int8 speed."""
    from .decoding.quant import cpu_bf16_units, cpu_int8_units
    cap, bf16, int8 = torch.backends.cpu.get_cpu_capability(), cpu_bf16_units(), cpu_int8_units()
    if bf16 == "AMX":
        units = ["AMX bf16/int8"]
    else:
        units = [u for u in (bf16, int8 and f"{int8} int8") if u]
    return f" ({', '.join([cap] + units)})" if cap else ""


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=__file__.rsplit("/", 2)[0]).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def backend_table(device: torch.device) -> list[tuple[str, str, list[tuple[str, str]]]]:
    examples = _example_args(device)
    rows = []
    for name, op in sorted(Op.registry.items()):
        probes = [(k, v) for k, v in examples.items() if k == name or k.startswith(name + " (")]
        if not probes:
            rows.append((name, "?", [(b.name, "registered (no example call to probe)") for b in op.backends]))
        for label, (args, kwargs) in probes:
            verdicts = op.explain(*args, **kwargs)
            rows.append((label, next((b for b, v in verdicts if v == "selected"), "none"), verdicts))
    return rows


def report() -> str:
    from . import backends
    lines = ["mage_fast environment", "=" * 21]
    for k, v in versions().items():
        lines.append(f"{k:>18}: {v}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"{'device':>18}: {device_description(dev)}")
    lines.append(f"{'cpu isa':>18}: {cpu_instruction_sets()['summary']}")
    try:
        from . import _ext
        _ext.load()
        lines.append(f"{'compiled ext':>18}: {_ext.status}" + (" (with CUDA ops)" if _ext.with_cuda() else ""))
    except Exception as e:
        lines.append(f"{'compiled ext':>18}: unavailable ({type(e).__name__}: {e})")
    for name, err in backends.load_errors.items():
        lines.append(f"{'backend ' + name:>18}: failed to load ({err})")
    for dev in devices:
        lines.append("")
        lines.append(f"op backends on {dev.type} (first accepted wins):")
        for name, chosen, verdicts in backend_table(dev):
            lines.append(f"  {name:<32} -> {chosen}")
            for b, v in verdicts:
                lines.append(f"      {b:<10} {v}")
    lines.append("")
    lines.extend(decoding_modes_report(devices))
    return "\n".join(lines)


def decoding_modes_report(devices) -> list[str]:
    """The decoding modes of ``generate(mode=...)`` / ``--mode`` (the registry, :data:`mage_fast.decoding.MODES`),
    what each computes and where each one runs."""
    from .decoding import MODES, DecodeMode, auto_mode, quant_slow_reason, quant_support
    lines = ["decoding modes (generate(mode=...), --mode; 'exact' is the default):"]
    for name, summary in MODES.table():
        mode = MODES[name]
        lines.append(f"  {name:<18} {summary}")
        if not isinstance(mode, DecodeMode):
            lines.append(f"  {'':<18} (a registered {type(mode).__name__})")
            continue
        where = []
        for dev in devices:
            why = quant_support(mode.quant, dev)
            slow = quant_slow_reason(mode.quant, dev) if why is None else None
            if slow:
                where.append(f"{dev.type}: yes ({slow})")
                continue
            where.append(f"{dev.type}: " + ("yes" if why is None else f"no ({why})"))
        lines.append(f"  {'':<18} {mode.describe()}; {'; '.join(where)}")
    lines.append(f"  {'auto':<18} the fastest preset this device runs natively: "
                 + "; ".join(f"{dev.type}: {auto_mode(dev)}" for dev in devices))
    return lines
