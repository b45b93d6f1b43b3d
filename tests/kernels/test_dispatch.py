"""Backend resolution: TCP_KERNELS over the config's impl over 'auto'."""

import pytest
import torch

from tcp.kernels.dispatch import resolve

CPU = torch.device("cpu")


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TCP_KERNELS", raising=False)
    assert resolve("auto", CPU) == "torch"
    assert resolve(None, CPU) == "torch"


def test_environment_overrides_config(monkeypatch):
    monkeypatch.setenv("TCP_KERNELS", "torch")
    assert resolve("triton", CPU) == "torch"


def test_unknown_values_name_their_source(monkeypatch):
    monkeypatch.setenv("TCP_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="TCP_KERNELS='cuda-magic'"):
        resolve("auto", CPU)
    monkeypatch.delenv("TCP_KERNELS")
    with pytest.raises(ValueError, match=r"kernels\.impl='fast'"):
        resolve("fast", CPU)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TCP_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("triton", CPU) == "triton"
