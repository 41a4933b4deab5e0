"""The fused DoRA kernels against PEFT-style DoRA in plain PyTorch (and against our DoRALinear)."""

import pytest
import torch

from reference_impls.kernels.dora import (
    FusedDoRAFunction,
    fused_dora,
    reference_dora,
    reference_weight_norm,
    weight_norm,
)

from helpers import relative_error, spy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-4), (torch.float16, 2e-2)] + ([(torch.bfloat16, 3e-2)] if DEVICE == "cuda" else [])


def inputs(M, K, N, r, dtype, grad=False):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=grad)
    W = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    A = (torch.randn(r, K, device=DEVICE, dtype=dtype) / K**0.5).requires_grad_(grad)
    B = torch.randn(N, r, device=DEVICE, dtype=dtype).requires_grad_(grad)
    m = torch.rand(N, device=DEVICE, dtype=dtype).add(0.5).requires_grad_(grad)
    return x, W, A, B, m


@pytest.mark.parametrize("dtype, tolerance", DTYPES)
@pytest.mark.parametrize("M, K, N, r", [(37, 70, 45, 4), (1, 33, 17, 16), (0, 20, 9, 3)])
def test_norm_and_forward_equal_reference(M, K, N, r, dtype, tolerance):
    x, W, A, B, m = inputs(M, K, N, r, dtype)
    assert relative_error(weight_norm(W, A, B, 0.5), reference_weight_norm(W, A, B, 0.5)) < tolerance
    bias = torch.randn(N, device=DEVICE, dtype=dtype)
    y = fused_dora(x, W, A, B, m, 0.5, bias)
    assert y.shape == (M, N)
    if M:
        assert relative_error(y, reference_dora(x, W, A, B, m, 0.5, bias)) < tolerance


def test_backward_equals_autograd_of_the_reference():
    x, W, A, B, m = inputs(19, 40, 27, 6, torch.float32, grad=True)
    dy = torch.randn(19, 27, device=DEVICE)
    FusedDoRAFunction.apply(x, W, A, B, m, 0.7, None).backward(dy)
    got = [t.grad.clone() for t in (x, A, B, m)]
    for t in (x, A, B, m):
        t.grad = None
    reference_dora(x, W, A, B, m, 0.7).backward(dy)
    for ours, theirs in zip(got, (x.grad, A.grad, B.grad, m.grad)):
        assert relative_error(ours, theirs) < 1e-4


def test_the_dora_module_takes_the_kernel_only_where_it_is_exact(monkeypatch):
    """On CUDA, DoRALinear runs the kernel (asserted) and equals its own PyTorch path; everywhere, the
    kernel equals that path; a trainable base keeps the PyTorch path."""
    from reference_impls import lora as lora_module

    layer = lora_module.DoRALinear(torch.nn.Linear(30, 22), r=3, alpha=6).to(DEVICE)
    layer.base.requires_grad_(False)
    with torch.no_grad():
        layer.B.normal_()
        layer.m.uniform_(0.5, 2)
    x = torch.randn(5, 30, device=DEVICE)
    launches = spy(monkeypatch, lora_module, "fused_dora")
    y = layer(x)
    layer.use_kernels = False
    expected = layer(x)
    assert len(launches) == (1 if DEVICE == "cuda" else 0)
    assert relative_error(y, expected) < 1e-4
    assert (
        relative_error(
            fused_dora(x, layer.base.weight, layer.A, layer.B, layer.m, layer.scale, layer.base.bias), expected
        )
        < 1e-4
    )
    layer.use_kernels = True
    layer.base.weight.requires_grad_(True)
    layer(x).sum().backward()
    assert len(launches) == (1 if DEVICE == "cuda" else 0) and layer.base.weight.grad is not None
