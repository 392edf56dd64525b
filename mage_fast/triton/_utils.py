"""Small helpers shared by the kernel files."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Interpreter mode is fixed when the kernels are defined, so it is read once at import.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def mix32(x):  # x: uint32 -> uint32, wrapping mod 2^32 like the references' `& 0xFFFFFFFF`
    """The counter hash behind the decode step's random numbers and attention's dropout mask."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def compute_f32(dtype: torch.dtype) -> bool:
    """Whether a kernel converts its loads to fp32 before any arithmetic.

    Always for fp32 inputs, and for bf16 in the interpreter, where bf16 arithmetic is wrong
    (values are held as raw 16-bit integers). Otherwise fp16/bf16 tiles go to ``tl.dot`` natively
    (fp32 accumulation, the tensor-core path) and everything around the products is fp32.
    """
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def lib_name(op: str) -> str:
    """Qualified name of a custom op in the ``mage_fast_triton`` library namespace."""
    return f"mage_fast_triton::{op}"
