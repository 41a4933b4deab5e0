"""The fused LoRA kernel against its PyTorch reference (Triton's interpreter on a CPU, the GPU where there is one)."""

import pytest
import torch

from reference_impls.kernels import fused_lora as fused_lora_module
from reference_impls.kernels.fused_lora import (
    FEW_ROWS_CONFIGS,
    MANY_ROWS_CONFIGS,
    FusedLoRAFunction,
    fused_lora,
    lora_gemm,
    reference_fused_lora,
)

from helpers import relative_error, spy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes bf16 wrongly (silently), so the CPU checks use fp32 and fp16.
DTYPES = [(torch.float32, 1e-4), (torch.float16, 2e-2)] + ([(torch.bfloat16, 3e-2)] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype, tolerance", DTYPES)
@pytest.mark.parametrize("M, K, N, r", [(37, 70, 45, 4), (1, 33, 17, 16), (65, 64, 96, 5)])
def test_forward_equals_reference(M, K, N, r, dtype, tolerance):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    W = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    A = torch.randn(r, K, device=DEVICE, dtype=dtype) / K**0.5
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
    W = torch.randn(N, K, device=DEVICE) / K**0.5
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


def test_the_lora_module_takes_the_kernel_only_where_it_is_exact(monkeypatch):
    """On CUDA, LoRALinear runs the kernel (asserted) and equals its own PyTorch path; everywhere, the
    kernel equals that path. An unfrozen base weight or bias keeps the PyTorch path: the fused backward
    gives them no gradient."""
    from reference_impls import lora as lora_module

    layer = lora_module.LoRALinear(torch.nn.Linear(30, 22), r=3, alpha=6).to(DEVICE)
    layer.base.requires_grad_(False)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(5, 30, device=DEVICE)
    launches = spy(monkeypatch, lora_module, "fused_lora")
    y = layer(x)
    assert len(launches) == (1 if DEVICE == "cuda" else 0)
    layer.use_kernels = False
    expected = layer(x)  # the module's PyTorch path
    assert len(launches) == (1 if DEVICE == "cuda" else 0)
    assert relative_error(y, expected) < 1e-4
    assert (
        relative_error(fused_lora(x, layer.base.weight, layer.A, layer.B, layer.scale, layer.base.bias), expected)
        < 1e-4
    )
    layer.use_kernels = True
    layer.base.bias.requires_grad_(True)  # a trainable bias: the kernel would not train it
    layer(x).sum().backward()
    assert len(launches) == (1 if DEVICE == "cuda" else 0) and layer.base.bias.grad is not None


@pytest.mark.parametrize("config", FEW_ROWS_CONFIGS + MANY_ROWS_CONFIGS, ids=str)
@pytest.mark.parametrize("shrink_in_kernel", [True, False])
def test_every_tile_shape_the_gpu_may_pick(config, shrink_in_kernel):
    """The tuner on a GPU picks any of these; each must compute the same thing (odd shapes, both
    ways of making u, a column scale and a bias)."""
    M, K, N, r = 37, 70, 45, 5
    # On a GPU in 16 bits, as the tuner meets them (the widest shapes do not fit fp32 in shared memory).
    dtype, limit = (torch.float16, 1e-2) if DEVICE == "cuda" else (torch.float32, 1e-5)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    W, A = (
        torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5,
        torch.randn(r, K, device=DEVICE, dtype=dtype) / K**0.5,
    )
    B, bias = torch.randn(N, r, device=DEVICE, dtype=dtype), torch.randn(N, device=DEVICE, dtype=dtype)
    c = torch.rand(N, device=DEVICE) + 0.5
    expected_u = (x.float() @ A.float().T).to(dtype)
    if shrink_in_kernel:
        y, u = lora_gemm(x, W, B, 0.5, A_rk=A, bias=bias, col_scale=c, config=config)
        assert relative_error(u, expected_u) < limit  # stored by the first column of tiles
    else:
        y, _ = lora_gemm(x, W, B, 0.5, u=expected_u, bias=bias, col_scale=c, config=config)
    expected = c * (x.float() @ W.float().T + 0.5 * expected_u.float() @ B.float().T) + bias.float()
    assert relative_error(y, expected) < limit


@pytest.mark.parametrize("rows", [3, 40])
def test_both_ways_of_making_u_in_training(rows, monkeypatch):
    """Forward and backward agree with the reference whether u = x Aᵀ is made in the kernel or before it."""
    K, N, r = 33, 29, 7
    x = torch.randn(rows, K, device=DEVICE, requires_grad=True)
    W = torch.randn(N, K, device=DEVICE) / K**0.5
    A = torch.randn(r, K, device=DEVICE, requires_grad=True)
    B = torch.randn(N, r, device=DEVICE, requires_grad=True)
    dy = torch.randn(rows, N, device=DEVICE)
    reference_fused_lora(x, W, A, B, 1.5).backward(dy)
    expected = [t.grad.clone() for t in (x, A, B)]
    for up_to in (0, 10**9):
        monkeypatch.setattr(fused_lora_module, "SHRINK_IN_KERNEL_UP_TO", up_to)
        for t in (x, A, B):
            t.grad = None
        y = FusedLoRAFunction.apply(x, W, A, B, 1.5, None)
        assert relative_error(y, reference_fused_lora(x, W, A, B, 1.5)) < 1e-5
        y.backward(dy)
        for ours, theirs in zip((x.grad, A.grad, B.grad), expected):
            assert relative_error(ours, theirs) < 1e-5


def test_layers_hand_the_kernel_only_operands_it_can_multiply():
    """LoRALinear and DoRALinear use the kernels on CUDA only for one dtype throughout and no autocast;
    otherwise (mixed dtypes, autocast) they take the plain PyTorch path."""
    from reference_impls.kernels.fused_lora import operands_match

    x, W = torch.randn(3, 8), torch.randn(5, 8)
    assert operands_match(x, W, torch.randn(2, 8), torch.randn(5, 2), None)
    assert not operands_match(x.to(torch.bfloat16), W, None)  # bf16 activations, fp32 weights
    assert not operands_match(x.to(torch.int64), W.to(torch.int64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not operands_match(x, W)
