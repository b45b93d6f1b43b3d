"""Shared by the kernel tests: backends, devices, per-dtype tolerances."""

import pytest
import torch

from tcp.kernels.dispatch import interpreting, triton_available

BACKENDS = ["torch", "triton"]
"""Every kernel test runs both backends; 'triton' on CUDA, or interpreted on CPU."""


def device_for(backend: str) -> torch.device:
    """Where a backend's tensors live: CUDA when there is one, else CPU (interpreter)."""
    if backend == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        if not torch.cuda.is_available() and not interpreting():
            pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
"""Largest allowed |fused - reference|, relative to the reference's largest entry, per dtype."""


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                        what: str) -> None:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    scale = float(ref.abs().max()) or 1.0
    err = float((got - ref).abs().max()) / scale
    assert err <= TOL[dtype], f"{what}: max |diff| / max |ref| = {err:.2e} > {TOL[dtype]:.0e}"
