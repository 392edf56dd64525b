"""Optional fast backends. Each submodule registers its implementations on the ops in
:mod:`mage_fast.ops` when imported; a backend whose requirements are missing registers nothing
(or registers with a ``supports`` that explains why it declines) and never breaks import.

- ``cpp``: the compiled extension ``mage_fast._C`` (C++ CPU ops, CUDA ops where built).
- ``triton``: Triton kernels (GPU; the interpreter with ``TRITON_INTERPRET=1`` on a CPU).
"""
from __future__ import annotations

import importlib
import warnings

BACKEND_MODULES = ("cpp", "triton")
load_errors: dict[str, str] = {}


def register_all() -> None:
    for name in BACKEND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # backend not part of this build
            load_errors[name] = f"{type(e).__name__}: {e}"
        except Exception as e:  # a broken backend must not break `import mage_fast`
            load_errors[name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"mage_fast: backend {name!r} failed to load and is disabled ({e})", RuntimeWarning,
                          stacklevel=2)
