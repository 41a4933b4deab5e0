"""DoRA, fused: the per-output-feature norm of W + s·BA without forming it, and the magnitude
rescale inside the GEMM's epilogue.

    y = (m / ‖W + s·BA‖) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b          (the norm treated as a constant)

The norm of output feature n is that of row n of W + s·BA. `weight_norm` computes it in one pass
over W: each program takes a block of rows, and for each block of columns forms that tile of B·A
(BLOCK_N × r times r × BLOCK_K, in registers), adds it to W's tile and accumulates the squares, so
the d_out × d_in matrix W + s·BA is never written. The forward then runs the fused LoRA GEMM
(fused_lora.py) with c = m / ‖·‖ applied per column in its epilogue, so y is written once.

Backward (W frozen; like PEFT, the norm gets no gradient), with h = x Wᵀ + s u Bᵀ, u = x Aᵀ and
g = dy ⊙ c:

    dm = Σ_rows dy ⊙ h / ‖·‖,    dx = g W + s (g B) A,    dA = s (g B)ᵀ x,    dB = s gᵀ u

h is recomputed by the same kernel rather than kept from the forward pass (memory over one GEMM).
"""

import torch
import triton
import triton.language as tl

from reference_impls.kernels.fused_lora import INTERPRETING, lora_gemm, lora_linear, use_kernel

FAMILY = "Kernels and serving systems"

IMPLEMENTS = ("dora",)


def reference_weight_norm(W, A, B, scale: float) -> torch.Tensor:
    return torch.linalg.norm(W.float() + scale * (B.float() @ A.float()), dim=1)


def reference_dora(x, W, A, B, m, scale: float, bias=None):
    """PEFT's DoRA forward, in fp32."""
    factor = m.float() / reference_weight_norm(W, A, B, scale).detach()
    h = x.float() @ W.float().T + scale * (x.float() @ A.float().T) @ B.float().T
    y = factor * h
    return (y if bias is None else y + bias.float()).to(x.dtype)


@triton.jit
def _weight_norm(
    w_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    R,
    scale,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_R)
    b = tl.load(
        b_ptr + rows[:, None] * stride_bn + j[None, :] * stride_br,
        mask=(rows[:, None] < N) & (j[None, :] < R),
        other=0.0,
    ).to(tl.float32)
    squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(
            w_ptr + rows[:, None] * stride_wn + k[None, :] * stride_wk,
            mask=(rows[:, None] < N) & (k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        a = tl.load(
            a_ptr + j[:, None] * stride_ar + k[None, :] * stride_ak, mask=(j[:, None] < R) & (k[None, :] < K), other=0.0
        ).to(tl.float32)
        v = w + scale * tl.dot(b, a, input_precision="ieee", out_dtype=tl.float32)  # W + s·BA's tile, in registers
        squares += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rows, tl.sqrt(squares), mask=rows < N)


def weight_norm(W, A, B, scale: float, block_n=None, block_k=None) -> torch.Tensor:
    """‖W + s·BA‖ per output feature (row of W), in fp32."""
    # Bound by reading W: on a GPU, narrow blocks of rows give every SM a share; the interpreter
    # wants few, large programs.
    block_n = block_n or (32 if INTERPRETING else 16)
    block_k = block_k or (64 if INTERPRETING else 128)
    N, K = W.shape
    R = A.shape[0]
    out = torch.empty(N, device=W.device, dtype=torch.float32)
    _weight_norm[(triton.cdiv(N, block_n),)](
        W,
        A,
        B,
        out,
        N,
        K,
        R,
        scale,
        W.stride(0),
        W.stride(1),
        A.stride(0),
        A.stride(1),
        B.stride(0),
        B.stride(1),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(R)),
    )
    return out


class FusedDoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, A, B, m, scale, bias):
        norm = weight_norm(W, A, B, scale)
        factor = (m.float() / norm).contiguous()
        y, u = lora_linear(x, W, A, B, scale, bias=bias, col_scale=factor)
        ctx.save_for_backward(x, W, A, B, u, norm, factor)
        ctx.scale, ctx.m_dtype = scale, m.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, u, norm, factor = ctx.saved_tensors
        s = ctx.scale
        h, _ = lora_gemm(x, W, B, s, u=u)  # recomputed: x Wᵀ + s u Bᵀ
        dm = ((dy.float() * h.float()).sum(dim=0) / norm).to(ctx.m_dtype)
        g = (dy.float() * factor).to(dy.dtype).contiguous()
        dx, gB = lora_linear(g, W.T, B.T, A.T, s)  # g W + s (g B) A, and g B
        dA = s * (gB.T @ x)
        dB = s * (g.T @ u)
        return dx, None, dA, dB, dm, None, None


def fused_dora(x, W, A, B, m, scale: float, bias=None):
    """DoRA's forward over any leading dimensions of x; the kernels where they can run."""
    if not use_kernel(x):
        return reference_dora(x, W, A, B, m, scale, bias)
    shape = x.shape
    y = FusedDoRAFunction.apply(x.reshape(-1, shape[-1]).contiguous(), W, A, B, m, scale, bias)
    return y.reshape(*shape[:-1], W.shape[0])
