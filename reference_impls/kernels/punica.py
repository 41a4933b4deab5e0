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
  and gathers its adapter's matrices; the shrink also splits K over programs (partial sums added
  atomically), since a few dozen rows alone would leave most of the GPU idle.

`reference_shrink_expand` is the plain PyTorch function both must equal. `MultiLoRALinear` serves a
mixed batch through them: a frozen linear layer plus L adapters. `inject_multi_lora` gives a model's
layers adapter slots, `load_lora` fills a slot from a model trained with `lora.inject_lora`, and
`route(model, adapter_of_row)` says which adapter each request of the next batch uses.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from reference_impls._plumbing import find_targets, replace_module, report, setting, toy_model, toy_task, train
from reference_impls.kernels.fused_lora import dot_precision, use_kernel

FAMILY = "Kernels and serving systems"

IMPLEMENTS = ("punica",)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("peft-survey-han-2024",)


def reference_shrink_expand(y, x, A, B, adapter_of_row, scale: float):
    """y + s · (x_m A_{i(m)}ᵀ) B_{i(m)}ᵀ for rows with i(m) ≥ 0, in fp32."""
    out = y.float().clone()
    rows = (adapter_of_row >= 0).nonzero().flatten()
    if len(rows):
        a = adapter_of_row[rows]
        v = torch.einsum("mk,mrk->mr", x[rows].float(), A[a].float())
        out[rows] += scale * torch.einsum("mr,mnr->mn", v, B[a].float())
    return out.to(y.dtype)


# The kernels find adapter a's rank-rows through a table of element offsets: row j of A_a starts at
# a_rows[a, j] (its K entries `a_stride` apart), and column j of B_a at b_rows[a, j] (its N entries
# `b_stride` apart). Stacked tensors are the table of a contiguous layout (`stacked_table`); S-LoRA's
# paged pool (slora.py) is any other, with a rank and a scale per adapter.


@dataclass(frozen=True)
class LoRATable:
    a_pool: torch.Tensor  # storage holding every A row
    a_rows: torch.Tensor  # (adapters, r_max) int64 element offsets of A's rows
    a_stride: int  # element stride along K within a row
    b_pool: torch.Tensor
    b_rows: torch.Tensor  # (adapters, r_max) int64 element offsets of B's columns
    b_stride: int  # element stride along N within a column
    ranks: torch.Tensor  # (adapters,) int32
    scales: torch.Tensor  # (adapters,) float32: α / r of each adapter

    @property
    def r_max(self) -> int:
        return self.a_rows.shape[1]


def stacked_table(A: torch.Tensor, B: torch.Tensor, scale: float) -> LoRATable:
    """The table of stacked, contiguous A (L, r, K) and B (L, N, r)."""
    L, r, K = A.shape
    N = B.shape[1]
    l, j = torch.arange(L, device=A.device)[:, None], torch.arange(r, device=A.device)[None, :]
    return LoRATable(
        A,
        l * r * K + j * K,
        1,
        B,
        l * N * r + j,
        r,
        torch.full((L,), r, dtype=torch.int32, device=A.device),
        torch.full((L,), scale, dtype=torch.float32, device=A.device),
    )


def reference_table(y, x, table: LoRATable, adapter_of_row):
    """y + s_a · (x_m A_aᵀ) B_aᵀ read through the table, in fp32 (the kernels' plain PyTorch twin)."""
    out = y.float().clone()
    K, N = x.shape[1], y.shape[1]
    a_flat, b_flat = table.a_pool.reshape(-1), table.b_pool.reshape(-1)
    for adapter in adapter_of_row.unique().tolist():
        if adapter < 0:
            continue
        rank, rows = int(table.ranks[adapter]), (adapter_of_row == adapter).nonzero().flatten()
        A = a_flat[table.a_rows[adapter, :rank, None] + torch.arange(K, device=x.device) * table.a_stride]
        Bt = b_flat[table.b_rows[adapter, :rank, None] + torch.arange(N, device=x.device) * table.b_stride]
        out[rows] += float(table.scales[adapter]) * (x[rows].float() @ A.float().T) @ Bt.float()
    return out.to(y.dtype)


def rows_aligned(table: LoRATable, K: int) -> bool:
    """Whether every row of A starts on 16 bytes: contiguous rows (a_stride 1) whose offsets, all
    multiples of K in both layouts here (stacked and paged), are multiples of 8 elements."""
    return table.a_stride == 1 and K % 8 == 0 and table.a_pool.data_ptr() % 16 == 0


# ---- BGMV: one program per row ------------------------------------------------------------------


@triton.jit
def _bgmv_shrink(
    x_ptr,
    a_ptr,
    a_rows_ptr,
    ranks_ptr,
    idx_ptr,
    v_ptr,
    K,
    stride_xm,
    a_stride,
    table_stride,
    stride_vm,
    ROWS_ALIGNED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """v[m] += x[m, k-block] · A_a[:, k-block]ᵀ: programs (row, block of K), their partial sums added
    atomically, so that a few rows still spread their adapters' reads over every SM."""
    m, pid_k = tl.program_id(0), tl.program_id(1)
    adapter = tl.load(idx_ptr + m)
    if adapter >= 0:
        rank = tl.load(ranks_ptr + adapter)
        j = tl.arange(0, BLOCK_R)
        rows = tl.load(a_rows_ptr + adapter * table_stride + j, mask=j < rank, other=0)
        if ROWS_ALIGNED:  # every row starts 16 bytes aligned: the loads along K can be vectors
            rows = tl.multiple_of(rows, 8)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + rows[:, None] + k[None, :] * a_stride, mask=(j[:, None] < rank) & (k[None, :] < K), other=0.0
        ).to(tl.float32)
        tl.atomic_add(v_ptr + m * stride_vm + j, tl.sum(a * x[None, :], axis=1), mask=j < rank, sem="relaxed")


@triton.jit
def _bgmv_expand(
    v_ptr,
    b_ptr,
    b_rows_ptr,
    ranks_ptr,
    scales_ptr,
    idx_ptr,
    y_ptr,
    N,
    b_stride,
    table_stride,
    stride_vm,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    m, pid_n = tl.program_id(0), tl.program_id(1)
    adapter = tl.load(idx_ptr + m)
    if adapter >= 0:
        rank, scale = tl.load(ranks_ptr + adapter), tl.load(scales_ptr + adapter)
        j = tl.arange(0, BLOCK_R)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.load(b_rows_ptr + adapter * table_stride + j, mask=j < rank, other=0)
        v = tl.load(v_ptr + m * stride_vm + j, mask=j < rank, other=0.0)
        b = tl.load(
            b_ptr + rows[None, :] + n[:, None] * b_stride, mask=(n[:, None] < N) & (j[None, :] < rank), other=0.0
        ).to(tl.float32)
        y = tl.load(y_ptr + m * stride_ym + n, mask=n < N, other=0.0).to(tl.float32)
        y += scale * tl.sum(b * v[None, :], axis=1)
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


def bgmv_table(y, x, table: LoRATable, adapter_of_row, block_k=512, block_n=128):
    """In place: y_m += s_a (x_m A_aᵀ) B_aᵀ with a = adapter_of_row[m] (−1: none), one program per row."""
    x = x.contiguous()
    assert y.is_contiguous()
    M, K = x.shape
    N = y.shape[1]
    if M == 0:
        return y
    v = torch.zeros(M, table.r_max, device=x.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(table.r_max))
    ids = adapter_of_row.to(torch.int32)
    _bgmv_shrink[(M, triton.cdiv(K, block_k))](
        x,
        table.a_pool,
        table.a_rows,
        table.ranks,
        ids,
        v,
        K,
        x.stride(0),
        table.a_stride,
        table.a_rows.stride(0),
        v.stride(0),
        ROWS_ALIGNED=rows_aligned(table, K),
        BLOCK_K=block_k,
        BLOCK_R=block_r,
    )
    _bgmv_expand[(M, triton.cdiv(N, block_n))](
        v,
        table.b_pool,
        table.b_rows,
        table.ranks,
        table.scales,
        ids,
        y,
        N,
        table.b_stride,
        table.b_rows.stride(0),
        v.stride(0),
        y.stride(0),
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )
    return y


def bgmv(y, x, A, B, adapter_of_row, scale: float):
    """Punica's BGMV over stacked A (L, r, K) and B (L, N, r)."""
    return bgmv_table(y, x, stacked_table(A.contiguous(), B.contiguous(), scale), adapter_of_row)


# ---- SGMV: one program per block of a segment's rows ------------------------------------------


@triton.jit
def _sgmv_shrink(
    x_ptr,
    a_ptr,
    a_rows_ptr,
    ranks_ptr,
    starts_ptr,
    seg_adapter_ptr,
    v_ptr,
    K,
    stride_xm,
    a_stride,
    table_stride,
    stride_vm,
    PRECISION: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    segment, block = tl.program_id(0), tl.program_id(1)
    adapter = tl.load(seg_adapter_ptr + segment)
    start, end = tl.load(starts_ptr + segment), tl.load(starts_ptr + segment + 1)
    rows = start + block * BLOCK_M + tl.arange(0, BLOCK_M)
    if (adapter >= 0) & (start + block * BLOCK_M < end):
        rank = tl.load(ranks_ptr + adapter)
        j = tl.arange(0, BLOCK_R)
        a_rows = tl.load(a_rows_ptr + adapter * table_stride + j, mask=j < rank, other=0)
        if ROWS_ALIGNED:
            a_rows = tl.multiple_of(a_rows, 8)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + k[None, :], mask=(rows[:, None] < end) & (k[None, :] < K), other=0.0
            )
            a = tl.load(
                a_ptr + a_rows[None, :] + k[:, None] * a_stride, mask=(j[None, :] < rank) & (k[:, None] < K), other=0.0
            )  # (K, r) view of A_a
            acc += tl.dot(x, a, input_precision=PRECISION, out_dtype=tl.float32)
        tl.store(v_ptr + rows[:, None] * stride_vm + j[None, :], acc, mask=(rows[:, None] < end) & (j[None, :] < rank))


@triton.jit
def _sgmv_expand(
    v_ptr,
    b_ptr,
    b_rows_ptr,
    ranks_ptr,
    scales_ptr,
    starts_ptr,
    seg_adapter_ptr,
    y_ptr,
    N,
    b_stride,
    table_stride,
    stride_vm,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    segment, block, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    adapter = tl.load(seg_adapter_ptr + segment)
    start, end = tl.load(starts_ptr + segment), tl.load(starts_ptr + segment + 1)
    rows = start + block * BLOCK_M + tl.arange(0, BLOCK_M)
    if (adapter >= 0) & (start + block * BLOCK_M < end):
        rank, scale = tl.load(ranks_ptr + adapter), tl.load(scales_ptr + adapter)
        j = tl.arange(0, BLOCK_R)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_rows = tl.load(b_rows_ptr + adapter * table_stride + j, mask=j < rank, other=0)
        v = tl.load(
            v_ptr + rows[:, None] * stride_vm + j[None, :], mask=(rows[:, None] < end) & (j[None, :] < rank), other=0.0
        )
        b = tl.load(
            b_ptr + b_rows[:, None] + n[None, :] * b_stride, mask=(n[None, :] < N) & (j[:, None] < rank), other=0.0
        ).to(tl.float32)  # (r, N) view of B_a
        mask = (rows[:, None] < end) & (n[None, :] < N)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + n[None, :], mask=mask, other=0.0).to(tl.float32)
        y += scale * tl.dot(v, b, input_precision="ieee", out_dtype=tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def sgmv_table(y, x, table: LoRATable, segment_starts, segment_adapter, block_m=32, block_k=64, block_n=64):
    """In place, for segments [starts[s], starts[s+1]) whose rows share adapter segment_adapter[s] (−1: none)."""
    x = x.contiguous()
    assert y.is_contiguous()
    M, K = x.shape
    N, segments = y.shape[1], len(segment_adapter)
    if M == 0 or segments == 0:
        return y
    longest = int((segment_starts[1:] - segment_starts[:-1]).max())
    v = torch.zeros(M, table.r_max, device=x.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(table.r_max))
    blocks = triton.cdiv(longest, block_m)
    _sgmv_shrink[(segments, blocks)](
        x,
        table.a_pool,
        table.a_rows,
        table.ranks,
        segment_starts,
        segment_adapter,
        v,
        K,
        x.stride(0),
        table.a_stride,
        table.a_rows.stride(0),
        v.stride(0),
        PRECISION=dot_precision(x.dtype),
        ROWS_ALIGNED=rows_aligned(table, K),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=block_r,
    )
    _sgmv_expand[(segments, blocks, triton.cdiv(N, block_n))](
        v,
        table.b_pool,
        table.b_rows,
        table.ranks,
        table.scales,
        segment_starts,
        segment_adapter,
        y,
        N,
        table.b_stride,
        table.b_rows.stride(0),
        v.stride(0),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
    )
    return y


def sgmv(y, x, A, B, segment_starts, segment_adapter, scale: float):
    """Punica's SGMV over stacked A (L, r, K) and B (L, N, r)."""
    return sgmv_table(y, x, stacked_table(A.contiguous(), B.contiguous(), scale), segment_starts, segment_adapter)


def segments_of(adapter_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of equal adapter ids: (starts with the end appended, the adapter of each run)."""
    change = torch.ones(len(adapter_of_row), dtype=torch.bool, device=adapter_of_row.device)
    change[1:] = adapter_of_row[1:] != adapter_of_row[:-1]
    starts = change.nonzero().flatten()
    ends = torch.tensor([len(adapter_of_row)], device=adapter_of_row.device)
    return torch.cat([starts, ends]).to(torch.int32), adapter_of_row[starts].to(torch.int32)


def add_lora(y, x, table: LoRATable, adapter_of_row):
    """y + s_a (x_m A_aᵀ) B_aᵀ per row: SGMV when the batch comes in long runs of one adapter
    (prefill), BGMV otherwise (decode); the plain PyTorch twin where no kernel can run."""
    if not use_kernel(x):
        return reference_table(y, x, table, adapter_of_row)
    starts, adapters = segments_of(adapter_of_row)
    with torch.no_grad():  # serving: no gradients through the kernels
        if len(adapters) * 8 <= len(adapter_of_row):
            return sgmv_table(y, x, table, starts, adapters)
        return bgmv_table(y, x, table, adapter_of_row)


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear and L stacked LoRA adapters; each row of a batch names its adapter."""

    def __init__(self, base: nn.Linear, adapters: int, r: int = 16, alpha: float = 16.0):
        super().__init__()
        self.base, self.scale = base, alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.randn(adapters, r, base.in_features, **factory) / base.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(adapters, base.out_features, r, **factory))
        self.adapter_of_row: torch.Tensor | None = None  # set by route() for a whole model's forward pass

    @torch.no_grad()
    def load_adapter(self, index: int, A: torch.Tensor, B: torch.Tensor) -> None:
        """Put a trained adapter (A: r × K, B: N × r) in slot `index`."""
        if A.shape != self.A.shape[1:] or B.shape != self.B.shape[1:]:
            raise ValueError(
                f"adapter of shapes A {tuple(A.shape)}, B {tuple(B.shape)} does not fit slots of "
                f"A {tuple(self.A.shape[1:])}, B {tuple(self.B.shape[1:])}"
            )
        self.A[index], self.B[index] = A, B

    def forward(self, x: torch.Tensor, adapter_of_row: torch.Tensor | None = None) -> torch.Tensor:
        """x: (M, K) or (M, ..., K); adapter_of_row: (M,) adapter index per row (a request: all its
        tokens use its adapter), −1 for the base model alone. Without it, the one route() set."""
        routing = adapter_of_row if adapter_of_row is not None else self.adapter_of_row
        if routing is None:
            raise ValueError(
                "MultiLoRALinear needs an adapter index per row: pass adapter_of_row, or call the "
                "model inside `with route(model, adapter_of_row):`"
            )
        if len(routing) != x.shape[0]:
            raise ValueError(f"{len(routing)} adapter indices for a batch of {x.shape[0]} rows")
        rows = x.reshape(-1, x.shape[-1])
        per_row = routing.to(x.device).repeat_interleave(rows.shape[0] // max(len(routing), 1))
        out = add_lora(self.base(rows), rows, stacked_table(self.A, self.B, self.scale), per_row)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def inject_multi_lora(
    model: nn.Module, target_names: list[str], adapters: int, r: int = 16, alpha: float = 16.0
) -> list[str]:
    """Give the named nn.Linear layers L adapter slots each, for serving: every parameter is frozen."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, MultiLoRALinear(model.get_submodule(name), adapters, r, alpha))
    model.requires_grad_(False)
    return targets


def load_lora(served: nn.Module, index: int, trained: nn.Module) -> None:
    """Copy the LoRA adapter of a model trained with lora.inject_lora into slot `index` of the served
    model, layer by layer (same names, ranks and α)."""
    from reference_impls.lora import LoRALinear

    for name, layer in trained.named_modules():
        if isinstance(layer, LoRALinear):
            slot = served.get_submodule(name)
            if layer.scale != slot.scale:
                raise ValueError(f"{name}: adapter scale {layer.scale} differs from the served layer's {slot.scale}")
            slot.load_adapter(index, layer.A, layer.B)


def route(model: nn.Module, adapter_of_row: torch.Tensor):
    """`with route(model, adapter_of_row):` every MultiLoRALinear reads the batch's adapter indices."""
    return setting(model, MultiLoRALinear, "adapter_of_row", adapter_of_row)


def demo() -> None:
    """Train three LoRA adapters on three tasks, then serve them and the base model in one mixed batch."""
    from reference_impls.lora import inject_lora

    targets, tasks = ["0", "2", "4"], [toy_task(seed=seed) for seed in (1, 2, 3)]
    trained = []
    for index, (x, y) in enumerate(tasks):
        model = toy_model()
        inject_lora(model, targets, r=4, alpha=8)
        before, after = train(model, x, y)
        report(f"LoRA adapter {index} (task {index})", model, before, after)
        trained.append(model.eval())

    served = toy_model()
    inject_multi_lora(served, targets, adapters=3, r=4, alpha=8)
    for index, model in enumerate(trained):
        load_lora(served, index, model)
    # 16 requests per adapter and 16 for the base model alone, in random order.
    adapter_of_row = torch.arange(-1, 3).repeat_interleave(16)[
        torch.randperm(64, generator=torch.Generator().manual_seed(0))
    ]
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), route(served, adapter_of_row):
        y = served(x)
    base = toy_model()
    with torch.no_grad():
        expected = torch.stack(
            [(trained[index] if index >= 0 else base)(row) for row, index in zip(x, adapter_of_row.tolist())]
        )
    print(
        f"One batch of 64 requests on 3 adapters and the base model: largest difference from running each "
        f"request through its own model {(y - expected).abs().max().item():.1e}"
    )


if __name__ == "__main__":
    demo()
