"""S-LoRA: thousands of adapters of mixed ranks in one paged memory pool, served in one batch.

Sheng, Cao, Li, Hooper, Lee, Yang, Chou, Zhu, Zheng, Keutzer, Gonzalez, Stoica. "S-LoRA: Serving
Thousands of Concurrent LoRA Adapters." MLSys 2024. arXiv:2311.03285.

Adapters live in host memory and only the ones the running batch needs are in GPU memory. To keep
that memory from fragmenting as adapters of different ranks come and go, S-LoRA stores them in a
pool of fixed-size pages, one page per rank-row: an adapter of rank r takes r pages for A's rows
(K entries each) and r pages for B's columns (N entries each), wherever free pages are. A page
table gives the kernels each adapter's pages; loading and evicting only edits the table.

The kernels are Punica's (punica.py), reading through the table: prefill batches in segments
(SGMV) and decode batches one row per request (BGMV), each adapter with its own rank and scale
α / r. (S-LoRA's pool also holds the KV cache; here it holds only adapter weights.)
"""

from dataclasses import dataclass

import torch
from torch import nn

from reference_impls.kernels.punica import LoRATable, add_lora

IMPLEMENTS = ("s-lora",)


class PoolFull(RuntimeError):
    pass


@dataclass
class Resident:
    a_pages: list[int]
    b_pages: list[int]
    rank: int
    scale: float


class AdapterPool:
    """Pages of K (for A's rows) and N (for B's columns) entries; any adapter may use any free pages."""

    def __init__(self, pages: int, K: int, N: int, device=None, dtype=torch.float32, page_order: list[int] | None = None):
        self.a_pages = torch.zeros(pages, K, device=device, dtype=dtype)
        self.b_pages = torch.zeros(pages, N, device=device, dtype=dtype)
        # Free pages, taken from the front; evicted ones go to the back, so the pool fragments as in real use.
        self.free_a = list(page_order if page_order is not None else range(pages))
        self.free_b = list(reversed(self.free_a))
        self.resident: dict[str, Resident] = {}

    def load(self, name: str, A: torch.Tensor, B: torch.Tensor, alpha: float) -> None:
        """Copy adapter name (A: r × K, B: N × r) into free pages."""
        if name in self.resident:
            return
        rank = A.shape[0]
        if len(self.free_a) < rank or len(self.free_b) < rank:
            raise PoolFull(f"no room for {name!r} (rank {rank}): {len(self.free_a)} pages free; evict an adapter")
        a_pages, self.free_a = self.free_a[:rank], self.free_a[rank:]
        b_pages, self.free_b = self.free_b[:rank], self.free_b[rank:]
        with torch.no_grad():
            self.a_pages[a_pages] = A.to(self.a_pages)
            self.b_pages[b_pages] = B.T.to(self.b_pages)  # column j of B becomes page b_pages[j]
        self.resident[name] = Resident(a_pages, b_pages, rank, alpha / rank)

    def evict(self, name: str) -> None:
        resident = self.resident.pop(name)
        self.free_a += resident.a_pages
        self.free_b += resident.b_pages

    def table(self, names: list[str]) -> LoRATable:
        """The page table of the given resident adapters, in that order (adapter index = position)."""
        r_max = max([self.resident[name].rank for name in names] + [1])
        a_rows = torch.zeros(len(names), r_max, dtype=torch.int64)
        b_rows = torch.zeros(len(names), r_max, dtype=torch.int64)
        K, N = self.a_pages.shape[1], self.b_pages.shape[1]
        for index, name in enumerate(names):
            resident = self.resident[name]
            a_rows[index, :resident.rank] = torch.tensor(resident.a_pages) * K  # element offset of each page
            b_rows[index, :resident.rank] = torch.tensor(resident.b_pages) * N
        device = self.a_pages.device
        ranks = torch.tensor([self.resident[name].rank for name in names], dtype=torch.int32, device=device)
        scales = torch.tensor([self.resident[name].scale for name in names], dtype=torch.float32, device=device)
        return LoRATable(self.a_pages, a_rows.to(device), 1, self.b_pages, b_rows.to(device), 1, ranks, scales)


class SLoRALinear(nn.Module):
    """A frozen nn.Linear serving, per row of a batch, any adapter resident in its pool."""

    def __init__(self, base: nn.Linear, pool: AdapterPool):
        super().__init__()
        self.base, self.pool = base, pool

    @torch.no_grad()
    def forward(self, x: torch.Tensor, adapter_names: list[str | None]) -> torch.Tensor:
        """x: (M, K); adapter_names[m]: the adapter of row m, or None for the base model alone."""
        active = sorted({name for name in adapter_names if name is not None})
        index = {name: position for position, name in enumerate(active)}
        adapter_of_row = torch.tensor([index[name] if name is not None else -1 for name in adapter_names],
                                      device=x.device)
        return add_lora(self.base(x), x, self.pool.table(active), adapter_of_row)
