"""The fused LoRA kernel against its PyTorch reference (Triton's interpreter on a CPU, the GPU where there is one)."""

import pytest
import torch

from helpers import relative_error

from reference_impls.kernels.fused_lora import FusedLoRAFunction, fused_lora, reference_fused_lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes bf16 wrongly (silently), so the CPU checks use fp32 and fp16.
DTYPES = [(torch.float32, 1e-4), (torch.float16, 2e-2)] + ([(torch.bfloat16, 3e-2)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype, tolerance", DTYPES)
@pytest.mark.parametrize("M, K, N, r", [(37, 70, 45, 4), (1, 33, 17, 16), (65, 64, 96, 5)])
def test_forward_equals_reference(M, K, N, r, dtype, tolerance):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    W = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
    A = torch.randn(r, K, device=DEVICE, dtype=dtype) / K ** 0.5
    B = torch.randn(N, r, device=DEVICE, dtype=dtype)
    bias = torch.randn(N, device=DEVICE, dtype=dtype)
    y = fused_lora(x, W, A, B, 0.5, bias)
    assert y.shape == (M, N) and y.dtype == dtype and torch.isfinite(y).all()
    assert relative_error(y, reference_fused_lora(x, W, A, B, 0.5, bias)) < tolerance


def test_empty_batch_and_leading_dimensions():
    W, A, B = torch.randn(9, 20, device=DEVICE), torch.randn(3, 20, device=DEVICE), torch.randn(9, 3, device=DEVICE)
    assert fused_lora(torch.randn(0, 20, device=DEVICE), W, A, B, 1.0).shape == (0, 9)
    x = torch.randn(2, 3, 20, device=DEVICE)
    assert relative_error(fused_lora(x, W, A, B, 2.0), reference_fused_lora(x, W, A, B, 2.0)) < 1e-4


def test_backward_equals_autograd_of_the_reference():
    M, K, N, r = 19, 40, 27, 6
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE) / K ** 0.5
    A = torch.randn(r, K, device=DEVICE, requires_grad=True)
    B = torch.randn(N, r, device=DEVICE, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE)
    FusedLoRAFunction.apply(x, W, A, B, 0.7, None).backward(dy)
    got = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    reference_fused_lora(x, W, A, B, 0.7).backward(dy)
    for ours, theirs in zip(got, (x.grad, A.grad, B.grad)):
        assert relative_error(ours, theirs) < 1e-4


def test_matches_the_lora_module():
    from reference_impls.lora import LoRALinear
    layer = LoRALinear(torch.nn.Linear(30, 22), r=3, alpha=6).to(DEVICE)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 30, device=DEVICE)
    y = fused_lora(x, layer.base.weight, layer.A, layer.B, layer.scale, layer.base.bias)
    assert relative_error(y, layer(x)) < 1e-4
