"""Fused LoRA linear: the low-rank term added inside the GEMM's epilogue, forward and backward.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ            x: (M, K), W: (N, K), A: (r, K), B: (N, r)

Unfused (as PEFT runs it) this is three matrix products and an extra pass over y: read y, add
the update, write y again. Here the thin product u = x Aᵀ (M × r, about r/N of the work) runs
first, and the main kernel computes each (BLOCK_M × BLOCK_N) tile of x Wᵀ, then, while the tile is
still in registers, adds s · u_tile B_tileᵀ and the bias and writes y once. The same kernel, given
transposed strides, computes the input gradient of the backward pass for a frozen W:

    dx = dy W + s · (dy B) A            (the same shape: a GEMM plus a rank-r epilogue)
    dA = s · (dy B)ᵀ x,   dB = s · dyᵀ u           (thin products; torch.matmul)

`reference_fused_lora` is the plain PyTorch function the kernel must equal; `fused_lora` picks the
kernel on CUDA (or under TRITON_INTERPRET=1) and the reference elsewhere. Accumulation is in fp32
whatever the input dtype.
"""

import os

import torch
import triton
import triton.language as tl

IMPLEMENTS = ()  # a building block of the lora module's layers, not a paper of its own


def reference_fused_lora(x, W, A, B, scale: float, bias=None):
    """y = x Wᵀ + b + s · (x Aᵀ) Bᵀ in plain PyTorch, accumulated in fp32."""
    y = x.float() @ W.float().T + scale * ((x.float() @ A.float().T) @ B.float().T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _gemm_lowrank_epilogue(
    x_ptr, w_ptr, u_ptr, b_ptr, col_scale_ptr, bias_ptr, y_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_um, stride_ur, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[m, n] = c[n] · (Σ_k x[m, k] w[n, k] + scale · Σ_j u[m, j] b[n, j]) (+ bias[n]), a tile per program;
    c (DoRA's magnitude over norm) is optional."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=(cols[None, :] < N) & (k[:, None] < K), other=0.0)  # the (K, N) view of w
        acc += tl.dot(x, w, out_dtype=tl.float32)
    # Epilogue: the rank-r update while the tile is still in registers (r padded to BLOCK_R ≥ 16).
    j = tl.arange(0, BLOCK_R)
    u = tl.load(u_ptr + rows[:, None] * stride_um + j[None, :] * stride_ur,
                mask=(rows[:, None] < M) & (j[None, :] < R), other=0.0)
    b = tl.load(b_ptr + cols[None, :] * stride_bn + j[:, None] * stride_br,
                mask=(cols[None, :] < N) & (j[:, None] < R), other=0.0)
    acc += scale * tl.dot(u, b, out_dtype=tl.float32)
    if HAS_COL_SCALE:
        acc *= tl.load(col_scale_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def gemm_lowrank(x, W_nk, U, B_nr, scale: float, bias=None, col_scale=None, block_m=64, block_n=64, block_k=32):
    """[col_scale ⊙] (x (M, K) · W_nkᵀ + scale · U (M, r) · B_nrᵀ) (+ bias): W_nk, B_nr may be strided views."""
    M, K = x.shape
    N, R = W_nk.shape[0], U.shape[1]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _gemm_lowrank_epilogue[grid](
        x, W_nk, U, B_nr, col_scale if col_scale is not None else x, bias if bias is not None else x, y,
        M, N, K, R, scale, x.stride(0), x.stride(1), W_nk.stride(0), W_nk.stride(1), U.stride(0), U.stride(1),
        B_nr.stride(0), B_nr.stride(1), y.stride(0), y.stride(1),
        HAS_COL_SCALE=col_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(R)))
    return y


class FusedLoRAFunction(torch.autograd.Function):
    """Forward and backward of y = x Wᵀ + b + s (x Aᵀ) Bᵀ for a frozen W (and b)."""

    @staticmethod
    def forward(ctx, x, W, A, B, scale, bias):
        u = (x.float() @ A.float().T).to(x.dtype)  # the thin shrink, M × r
        ctx.save_for_backward(x, W, A, B, u)
        ctx.scale = scale
        return gemm_lowrank(x, W, u, B, scale, bias)

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, u = ctx.saved_tensors
        dy = dy.contiguous()
        dyB = (dy.float() @ B.float()).to(dy.dtype)  # M × r
        # dx = dy W + s (dy B) A: the forward kernel with W seen as (K, N) and A as (K, r).
        dx = gemm_lowrank(dy, W.T, dyB, A.T, ctx.scale)
        dA = (ctx.scale * dyB.float().T @ x.float()).to(A.dtype)
        dB = (ctx.scale * dy.float().T @ u.float()).to(B.dtype)
        return dx, None, dA, dB, None, None


def use_kernel(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def fused_lora(x, W, A, B, scale: float, bias=None):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ over any leading dimensions of x; the kernel where it can run."""
    if not use_kernel(x):
        return reference_fused_lora(x, W, A, B, scale, bias)
    shape = x.shape
    y = FusedLoRAFunction.apply(x.reshape(-1, shape[-1]).contiguous(), W, A, B, scale, bias)
    return y.reshape(*shape[:-1], W.shape[0])
