"""Layer-mean pooling: Triton (interpreted on CPU) and torch against a float64 stack-mean."""

import pytest
import torch

from tcp.kernels.pooling import layer_mean_pool, pool_layer_
from tests.kernels.common import BACKENDS, device_for

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32),
                                                (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float16),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("layers", [1, 3])
def test_matches_float64_mean(backend, in_dtype, out_dtype, layers):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(layers)
    B, T, d, N = 3, 11, 123, 17  # N and d are not multiples of any block
    states = [(torch.randn(B, T, d, generator=g) * 3).to(in_dtype).to(dev) for _ in range(layers)]
    rows = torch.randperm(B * T, generator=g)[:N].to(dev)
    out = layer_mean_pool(states, rows, out_dtype=out_dtype, impl=backend)
    ref = torch.stack([s.reshape(-1, d).double()[rows] for s in states]).mean(0)
    assert out.dtype == out_dtype and out.shape == (N, d)
    # fp32 accumulation, then one rounding to the output dtype: within one ulp (the Triton
    # interpreter's float->bf16 cast truncates instead of rounding to nearest)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[out_dtype]
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_exactly_in_float32(backend):
    dev = device_for(backend)
    states = [torch.randn(2, 7, 33, device=dev) for _ in range(4)]
    rows = torch.tensor([0, 13, 5, 6, 2], device=dev)
    ref = layer_mean_pool(states, rows, impl="torch")
    torch.testing.assert_close(layer_mean_pool(states, rows, impl=backend), ref, rtol=1e-7,
                               atol=1e-7)


def test_rejects_mismatched_accumulator():
    with pytest.raises(ValueError, match="float32"):
        pool_layer_(torch.zeros(2, 4, dtype=torch.float16), torch.zeros(1, 3, 4),
                    torch.tensor([0, 1]), first=True, impl="torch")
