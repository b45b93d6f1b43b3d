"""Which backend an op runs on: the Triton kernel or its pure-torch reference.

Resolution order, first match wins:
1. `TCP_KERNELS=torch|triton` in the environment (an override for debugging and benchmarks),
2. the `impl` the caller passes (`kernels.impl` in the run config): "torch" or "triton",
3. "auto": Triton for CUDA tensors when Triton is importable, the torch reference otherwise.

Triton on CPU tensors is only possible under the Triton interpreter (`TRITON_INTERPRET=1`), which
is how CI runs the kernels; asking for it otherwise is an error that says so.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

_CHOICES = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether `import triton` works here."""
    try:  # optional: Triton is absent on some platforms (macOS, aarch64 wheels)
        import triton
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(impl: str | None, device: torch.device) -> Literal["torch", "triton"]:
    """The backend to run for tensors on `device`, given the caller's `impl`."""
    env = os.environ.get("TCP_KERNELS", "").strip().lower()
    choice = env or (impl or "auto")
    if choice not in _CHOICES:
        src = "TCP_KERNELS" if env else "kernels.impl"
        raise ValueError(f"{src}={choice!r}: use one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("the Triton kernels were requested (kernels.impl / TCP_KERNELS = "
                           "triton) but `import triton` fails; install triton>=3.0 or use torch")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the Triton kernels need CUDA tensors (got {device.type}); set "
                           "TRITON_INTERPRET=1 to run them in the interpreter, or use torch")
    return "triton"
