"""Punica's kernels: one batch, many LoRA adapters (SGMV for segments, BGMV for one adapter per row).

Chen, Ye, Wu, Zhuo, Ceze, Krishnamurthy. "Punica: Multi-Tenant LoRA Serving." MLSys 2024.
arXiv:2310.18547.

A served batch mixes requests for different adapters. With the adapters stacked, A ∈ ℝ^{L×r×K} and
B ∈ ℝ^{L×N×r}, and i(m) the adapter of row m (−1: none), every row gets its own low-rank update:

    y_m += s · (x_m A_{i(m)}ᵀ) B_{i(m)}ᵀ

done in two steps, as in the paper: shrink, v_m = x_m A_{i(m)}ᵀ (K → r), then expand,
y_m += s · v_m B_{i(m)}ᵀ (r → N). Two layouts of the batch:

- SGMV (segmented gather matrix-vector): rows come in segments that share an adapter (prefill:
  a request's prompt tokens). Each program takes a block of one segment's rows and multiplies it
  as a matrix, so the matrix units are used.
- BGMV (batched gather matrix-vector): one row per request (decode). Each program takes one row
  and gathers its adapter's matrices.

`reference_shrink_expand` is the plain PyTorch function both must equal. `MultiLoRALinear` serves a
mixed batch through them: a frozen linear layer plus L adapters.
"""

import os

import torch
import triton
import triton.language as tl
from torch import nn

IMPLEMENTS = ("punica",)


def reference_shrink_expand(y, x, A, B, adapter_of_row, scale: float):
    """y + s · (x_m A_{i(m)}ᵀ) B_{i(m)}ᵀ for rows with i(m) ≥ 0, in fp32."""
    out = y.float().clone()
    rows = (adapter_of_row >= 0).nonzero().flatten()
    if len(rows):
        a = adapter_of_row[rows]
        v = torch.einsum("mk,mrk->mr", x[rows].float(), A[a].float())
        out[rows] += scale * torch.einsum("mr,mnr->mn", v, B[a].float())
    return out.to(y.dtype)


# ---- BGMV: one program per row ------------------------------------------------------------------

@triton.jit
def _bgmv_shrink(x_ptr, a_ptr, idx_ptr, v_ptr, K, R, stride_xm, stride_al, stride_ar, stride_vm,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    m = tl.program_id(0)
    adapter = tl.load(idx_ptr + m)
    if adapter >= 0:
        j = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + adapter * stride_al + j[:, None] * stride_ar + k[None, :],
                        mask=(j[:, None] < R) & (k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(v_ptr + m * stride_vm + j, acc, mask=j < R)


@triton.jit
def _bgmv_expand(v_ptr, b_ptr, idx_ptr, y_ptr, N, R, scale, stride_vm, stride_bl, stride_bn, stride_ym,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    m, pid_n = tl.program_id(0), tl.program_id(1)
    adapter = tl.load(idx_ptr + m)
    if adapter >= 0:
        j = tl.arange(0, BLOCK_R)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        v = tl.load(v_ptr + m * stride_vm + j, mask=j < R, other=0.0)
        b = tl.load(b_ptr + adapter * stride_bl + n[:, None] * stride_bn + j[None, :],
                    mask=(n[:, None] < N) & (j[None, :] < R), other=0.0).to(tl.float32)
        y = tl.load(y_ptr + m * stride_ym + n, mask=n < N, other=0.0).to(tl.float32)
        y += scale * tl.sum(b * v[None, :], axis=1)
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


def bgmv(y, x, A, B, adapter_of_row, scale: float, block_k=128, block_n=128):
    """In place: y_m += s · (x_m A_{i(m)}ᵀ) B_{i(m)}ᵀ, one program per row (decode batches)."""
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()  # the kernels step along the last dimension by 1
    assert y.is_contiguous()
    M, K = x.shape
    L, R, _ = A.shape
    N = B.shape[1]
    if M == 0:
        return y
    v = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(R))
    _bgmv_shrink[(M,)](x, A, adapter_of_row, v, K, R, x.stride(0), A.stride(0), A.stride(1), v.stride(0),
                       BLOCK_K=block_k, BLOCK_R=block_r)
    _bgmv_expand[(M, triton.cdiv(N, block_n))](v, B, adapter_of_row, y, N, R, scale, v.stride(0), B.stride(0),
                                               B.stride(1), y.stride(0), BLOCK_N=block_n, BLOCK_R=block_r)
    return y


# ---- SGMV: one program per block of a segment's rows ------------------------------------------

@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, starts_ptr, seg_adapter_ptr, v_ptr, K, R, stride_xm, stride_al, stride_ar,
                 stride_vm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    segment, block = tl.program_id(0), tl.program_id(1)
    adapter = tl.load(seg_adapter_ptr + segment)
    start, end = tl.load(starts_ptr + segment), tl.load(starts_ptr + segment + 1)
    rows = start + block * BLOCK_M + tl.arange(0, BLOCK_M)
    if (adapter >= 0) & (start + block * BLOCK_M < end):
        j = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=(rows[:, None] < end) & (k[None, :] < K),
                        other=0.0)
            a = tl.load(a_ptr + adapter * stride_al + j[None, :] * stride_ar + k[:, None],
                        mask=(j[None, :] < R) & (k[:, None] < K), other=0.0)  # (K, r) view of A_i
            acc += tl.dot(x, a, out_dtype=tl.float32)
        tl.store(v_ptr + rows[:, None] * stride_vm + j[None, :], acc, mask=(rows[:, None] < end) & (j[None, :] < R))


@triton.jit
def _sgmv_expand(v_ptr, b_ptr, starts_ptr, seg_adapter_ptr, y_ptr, N, R, scale, stride_vm, stride_bl, stride_bn,
                 stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    segment, block, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    adapter = tl.load(seg_adapter_ptr + segment)
    start, end = tl.load(starts_ptr + segment), tl.load(starts_ptr + segment + 1)
    rows = start + block * BLOCK_M + tl.arange(0, BLOCK_M)
    if (adapter >= 0) & (start + block * BLOCK_M < end):
        j = tl.arange(0, BLOCK_R)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        v = tl.load(v_ptr + rows[:, None] * stride_vm + j[None, :], mask=(rows[:, None] < end) & (j[None, :] < R),
                    other=0.0)
        b = tl.load(b_ptr + adapter * stride_bl + n[None, :] * stride_bn + j[:, None],
                    mask=(n[None, :] < N) & (j[:, None] < R), other=0.0).to(tl.float32)  # (r, N) view of B_i
        mask = (rows[:, None] < end) & (n[None, :] < N)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + n[None, :], mask=mask, other=0.0).to(tl.float32)
        y += scale * tl.dot(v, b, out_dtype=tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def sgmv(y, x, A, B, segment_starts, segment_adapter, scale: float, block_m=32, block_k=64, block_n=64):
    """In place, for segments [starts[s], starts[s+1]) with adapter segment_adapter[s] (−1: none)."""
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    assert y.is_contiguous()
    M, K = x.shape
    R, N = A.shape[1], B.shape[1]
    segments = len(segment_adapter)
    if M == 0 or segments == 0:
        return y
    longest = int((segment_starts[1:] - segment_starts[:-1]).max())
    v = torch.zeros(M, R, device=x.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(R))
    blocks = triton.cdiv(longest, block_m)
    _sgmv_shrink[(segments, blocks)](x, A, segment_starts, segment_adapter, v, K, R, x.stride(0), A.stride(0),
                                     A.stride(1), v.stride(0), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r)
    _sgmv_expand[(segments, blocks, triton.cdiv(N, block_n))](
        v, B, segment_starts, segment_adapter, y, N, R, scale, v.stride(0), B.stride(0), B.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return y


def segments_of(adapter_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of equal adapter ids: (starts with the end appended, the adapter of each run)."""
    change = torch.ones(len(adapter_of_row), dtype=torch.bool, device=adapter_of_row.device)
    change[1:] = adapter_of_row[1:] != adapter_of_row[:-1]
    starts = change.nonzero().flatten()
    ends = torch.tensor([len(adapter_of_row)], device=adapter_of_row.device)
    return torch.cat([starts, ends]).to(torch.int32), adapter_of_row[starts].to(torch.int32)


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear and L stacked LoRA adapters; each row of a batch names its adapter."""

    def __init__(self, base: nn.Linear, adapters: int, r: int = 16, alpha: float = 16.0):
        super().__init__()
        self.base, self.scale = base, alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.randn(adapters, r, base.in_features, **factory) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(adapters, base.out_features, r, **factory))

    def forward(self, x: torch.Tensor, adapter_of_row: torch.Tensor) -> torch.Tensor:
        """x: (M, K); adapter_of_row: (M,) adapter index per row, −1 for the base model alone."""
        y = self.base(x)
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            return reference_shrink_expand(y, x, self.A, self.B, adapter_of_row, self.scale)
        starts, adapters = segments_of(adapter_of_row)
        with torch.no_grad():  # serving: no gradients through the kernels
            if len(adapters) * 8 <= len(adapter_of_row):  # long runs (prefill): matrix tiles per segment
                return sgmv(y, x, self.A, self.B, starts, adapters, self.scale)
            return bgmv(y, x, self.A, self.B, adapter_of_row.to(torch.int32), self.scale)
