"""Fused LoRA linear: the low-rank term added inside the GEMM's epilogue, forward and backward.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ            x: (M, K), W: (N, K), A: (r, K), B: (N, r)

Unfused (as PEFT runs it) this is three matrix products and an extra pass over y: read y, add
the update, write y again. Here one kernel computes each (BLOCK_M × BLOCK_N) tile of x Wᵀ, then,
while the tile is still in registers, adds s · u_tile B_tileᵀ and the bias and writes y once. The
thin product u = x Aᵀ (M × r) is made one of two ways:

- in the kernel (`A=`): while x's tiles stream through for x Wᵀ, the same tiles are multiplied by
  A's too. Every program along N repeats this (r / BLOCK_N extra work), but the whole layer is one
  launch, which is what counts for a few tokens, where reading W is all the time there is. The
  programs of the first column of tiles also store u, which the backward pass needs;
- beforehand (`u=`), as one thin GEMM: for many tokens, where re-reading x costs less than
  repeating the shrink in every column of tiles.

`lora_linear` picks by the number of rows (SHRINK_IN_KERNEL_UP_TO; the GPU benchmark times both).
The same kernel, given transposed strides, computes the input gradient for a frozen W:

    dx = dy W + s · (dy B) A            (the same shape: a GEMM plus a rank-r epilogue)
    dA = s · (dy B)ᵀ x,   dB = s · dyᵀ u           (thin products; torch.matmul)

Tile shapes: on a GPU the first call for each (row-count bucket, N, K, dtype) times a handful of
tile shapes and keeps the fastest (narrow tiles for few rows, so that every SM gets a share of W
to read; wide ones for many rows, for the tensor cores). Triton's interpreter cannot time them, so
on a CPU the kernel runs with INTERPRETER_CONFIG; the tests run every GPU shape there too.

`reference_fused_lora` is the plain PyTorch function the kernel must equal; `fused_lora` picks the
kernel on CUDA (or under TRITON_INTERPRET=1) and the reference elsewhere. Products accumulate in
fp32; fp32 inputs are multiplied in full fp32 unless PyTorch allows TF32 (as torch.matmul does).
"""

import os

import torch
import triton
import triton.language as tl

FAMILY = "Kernels and serving systems"

IMPLEMENTS = ()  # a building block of the lora module's layers, not a paper of its own

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
SHRINK_IN_KERNEL_UP_TO = 1024  # rows; above this, u = x Aᵀ is one thin GEMM before the kernel


def reference_fused_lora(x, W, A, B, scale: float, bias=None):
    """y = x Wᵀ + b + s · (x Aᵀ) Bᵀ in plain PyTorch, accumulated in fp32."""
    y = x.float() @ W.float().T + scale * ((x.float() @ A.float().T) @ B.float().T)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def use_kernel(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or INTERPRETING


def kernel_takes(x: torch.Tensor, *operands) -> bool:
    """Whether a layer can hand x and its operands (None for an absent bias) to the kernels on CUDA."""
    return x.is_cuda and operands_match(x, *operands)


def operands_match(x: torch.Tensor, *operands) -> bool:
    """One floating dtype for all (tl.dot multiplies like with like), and no autocast, which would
    want other dtypes than the ones stored."""
    dtypes = {x.dtype} | {operand.dtype for operand in operands if operand is not None}
    return (
        len(dtypes) == 1
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and not torch.is_autocast_enabled(x.device.type)
    )


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: what torch.matmul would use for this dtype (TF32 only where allowed)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _config(block_m, block_n, block_k, warps, stages):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
    )


FEW_ROWS_CONFIGS = [  # up to 128 rows: bound by reading W, so many narrow tiles and deep pipelines
    _config(16, 32, 256, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(16, 64, 256, 4, 3),
    _config(32, 32, 256, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(64, 64, 128, 4, 3),
    _config(16, 128, 128, 4, 4),
    _config(64, 128, 64, 4, 4),
]
MANY_ROWS_CONFIGS = [  # bound by the tensor cores: wide tiles, 8 warps
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
]
INTERPRETER_CONFIG = _config(64, 64, 64, 4, 1)  # few, large programs: the interpreter pays per step


@triton.jit
def _lora_gemm(
    x_ptr,
    w_ptr,
    a_ptr,
    u_ptr,
    b_ptr,
    col_scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    scale,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    SHRINK: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[m, n] = c[n] · (Σ_k x[m, k] w[n, k] + scale · Σ_j u[m, j] b[n, j]) (+ bias[n]), a tile per program.
    SHRINK: u[m, j] = Σ_k x[m, k] a[j, k] is computed here (and stored by the first column of tiles)
    rather than loaded. c (DoRA's magnitude over norm) is optional. M_BUCKET only keys the tuning."""
    # Tiles in groups of GROUP_M rows of tiles, column by column, so that programs running at the
    # same time share x's and W's tiles in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_R)
    # Out-of-range rows and columns read a valid row instead (wrapped) and are never stored: no masks
    # on the hot loads but K's.
    rows_in, cols_in = rows % M, cols % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows_in[:, None] * stride_xm + k[None, :] * stride_xk, mask=k[None, :] < K, other=0.0)
        w = tl.load(
            w_ptr + cols_in[None, :] * stride_wn + k[:, None] * stride_wk, mask=k[:, None] < K, other=0.0
        )  # the (K, N) view of w
        acc += tl.dot(x, w, input_precision=PRECISION, out_dtype=tl.float32)
        if SHRINK:
            a = tl.load(
                a_ptr + j[None, :] * stride_ar + k[:, None] * stride_ak,
                mask=(j[None, :] < R) & (k[:, None] < K),
                other=0.0,
            )  # the (K, r) view of A
            u_acc += tl.dot(x, a, input_precision=PRECISION, out_dtype=tl.float32)
    # Epilogue: the rank-r update while the tile is still in registers (r padded to BLOCK_R ≥ 16).
    u_mask = (rows[:, None] < M) & (j[None, :] < R)
    if SHRINK:
        u = u_acc.to(u_ptr.dtype.element_ty)  # rounded as a separate x Aᵀ would round it
        if pid_n == 0:
            tl.store(u_ptr + rows[:, None] * stride_um + j[None, :] * stride_ur, u, mask=u_mask)
    else:
        u = tl.load(u_ptr + rows[:, None] * stride_um + j[None, :] * stride_ur, mask=u_mask, other=0.0)
    b = tl.load(b_ptr + cols_in[None, :] * stride_bn + j[:, None] * stride_br, mask=j[:, None] < R, other=0.0)
    acc += scale * tl.dot(u, b, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_COL_SCALE:
        acc *= tl.load(col_scale_ptr + cols_in).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_in).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (cols[None, :] < N),
    )


_TUNING_KEY = ["M_BUCKET", "N", "K", "R", "SHRINK", "HAS_COL_SCALE", "HAS_BIAS"]
if INTERPRETING:
    _lora_gemm_few_rows = _lora_gemm_many_rows = triton.autotune([INTERPRETER_CONFIG], key=_TUNING_KEY)(_lora_gemm)
else:
    _lora_gemm_few_rows = triton.autotune(FEW_ROWS_CONFIGS, key=_TUNING_KEY)(_lora_gemm)
    _lora_gemm_many_rows = triton.autotune(MANY_ROWS_CONFIGS, key=_TUNING_KEY)(_lora_gemm)


def lora_gemm(x, W_nk, B_nr, scale: float, *, A_rk=None, u=None, bias=None, col_scale=None, config=None):
    """[col_scale ⊙] (x (M, K) · W_nkᵀ + scale · u (M, r) · B_nrᵀ) (+ bias), and u.

    Give u, or A_rk (r, K) to compute u = x A_rkᵀ in the kernel. W_nk, A_rk, B_nr may be strided
    views. config (a triton.Config) skips the tuning and runs that tile shape."""
    assert (A_rk is None) != (u is None), "give A_rk or u"
    M, K = x.shape
    N, R = W_nk.shape[0], B_nr.shape[1]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if u is None:
        u = torch.empty(M, R, device=x.device, dtype=x.dtype)
    if M == 0:
        return y, u
    a = A_rk if A_rk is not None else u  # an unused pointer must still point somewhere
    args = (
        x,
        W_nk,
        a,
        u,
        B_nr,
        col_scale if col_scale is not None else x,
        bias if bias is not None else x,
        y,
        M,
        N,
        K,
        R,
        triton.next_power_of_2(M),
        scale,
        x.stride(0),
        x.stride(1),
        W_nk.stride(0),
        W_nk.stride(1),
        a.stride(0),
        a.stride(1),
        u.stride(0),
        u.stride(1),
        B_nr.stride(0),
        B_nr.stride(1),
        y.stride(0),
        y.stride(1),
    )
    flags = {
        "SHRINK": A_rk is not None,
        "HAS_COL_SCALE": col_scale is not None,
        "HAS_BIAS": bias is not None,
        "PRECISION": dot_precision(x.dtype),
        "BLOCK_R": max(16, triton.next_power_of_2(R)),
        "GROUP_M": 8,
    }
    if config is not None:
        grid = (triton.cdiv(M, config.kwargs["BLOCK_M"]) * triton.cdiv(N, config.kwargs["BLOCK_N"]),)
        _lora_gemm[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        kernel = _lora_gemm_few_rows if M <= 128 else _lora_gemm_many_rows
        kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return y, u


def shrink_in_kernel(rows: int) -> bool:
    return rows <= SHRINK_IN_KERNEL_UP_TO


def lora_linear(x, W_nk, A_rk, B_nr, scale: float, *, bias=None, col_scale=None):
    """lora_gemm with u = x A_rkᵀ made the way that suits the number of rows: in the kernel for few,
    as one thin GEMM beforehand for many. Returns y and u."""
    if shrink_in_kernel(x.shape[0]):
        return lora_gemm(x, W_nk, B_nr, scale, A_rk=A_rk, bias=bias, col_scale=col_scale)
    return lora_gemm(x, W_nk, B_nr, scale, u=x @ A_rk.T, bias=bias, col_scale=col_scale)


class FusedLoRAFunction(torch.autograd.Function):
    """Forward and backward of y = x Wᵀ + b + s (x Aᵀ) Bᵀ for a frozen W (and b)."""

    @staticmethod
    def forward(ctx, x, W, A, B, scale, bias):
        y, u = lora_linear(x, W, A, B, scale, bias=bias)
        ctx.save_for_backward(x, W, A, B, u)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, u = ctx.saved_tensors
        dy = dy.contiguous()
        # dx = dy W + s (dy B) A: the forward with W seen as (K, N), Bᵀ as the shrink and A as (K, r).
        dx, dyB = lora_linear(dy, W.T, B.T, A.T, ctx.scale)
        dA = ctx.scale * (dyB.T @ x)
        dB = ctx.scale * (dy.T @ u)
        return dx, None, dA, dB, None, None


def fused_lora(x, W, A, B, scale: float, bias=None):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ over any leading dimensions of x; the kernel where it can run."""
    if not use_kernel(x):
        return reference_fused_lora(x, W, A, B, scale, bias)
    shape = x.shape
    y = FusedLoRAFunction.apply(x.reshape(-1, shape[-1]).contiguous(), W, A, B, scale, bias)
    return y.reshape(*shape[:-1], W.shape[0])
