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

FAMILY = "Kernels and serving systems"

IMPLEMENTS = ("s-lora",)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("peft-survey-han-2024",)


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

    def __init__(
        self, pages: int, K: int, N: int, device=None, dtype=torch.float32, page_order: list[int] | None = None
    ):
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

    def make_resident(self, names: list[str], host: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Load the batch's adapters that are not in the pool from host memory (name → A, B, α),
        evicting the least recently used adapters the batch does not need when pages run out."""
        needed = dict.fromkeys(names)
        for name in needed:  # resident is kept oldest-used first: move the batch's adapters to the end
            if name in self.resident:
                self.resident[name] = self.resident.pop(name)
        for name in needed:
            while name not in self.resident:
                try:
                    self.load(name, *host[name])
                except PoolFull:
                    idle = [other for other in self.resident if other not in needed]
                    if not idle:
                        raise PoolFull(f"the batch's adapters {list(needed)} do not fit in the pool together") from None
                    self.evict(idle[0])

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
            a_rows[index, : resident.rank] = torch.tensor(resident.a_pages) * K  # element offset of each page
            b_rows[index, : resident.rank] = torch.tensor(resident.b_pages) * N
        device = self.a_pages.device
        ranks = torch.tensor([self.resident[name].rank for name in names], dtype=torch.int32, device=device)
        scales = torch.tensor([self.resident[name].scale for name in names], dtype=torch.float32, device=device)
        return LoRATable(self.a_pages, a_rows.to(device), 1, self.b_pages, b_rows.to(device), 1, ranks, scales)


class SLoRALinear(nn.Module):
    """A frozen nn.Linear serving, per row of a batch, any adapter resident in its pool; with `host`
    (name → A, B, α in host memory), adapters a batch needs are fetched into the pool first."""

    def __init__(self, base: nn.Linear, pool: AdapterPool, host: dict | None = None):
        super().__init__()
        self.base, self.pool, self.host = base, pool, host

    @torch.no_grad()
    def forward(self, x: torch.Tensor, adapter_names: list[str | None]) -> torch.Tensor:
        """x: (M, K); adapter_names[m]: the adapter of row m, or None for the base model alone."""
        active = sorted({name for name in adapter_names if name is not None})
        if self.host is not None:
            self.pool.make_resident(active, self.host)
        index = {name: position for position, name in enumerate(active)}
        adapter_of_row = torch.tensor(
            [index[name] if name is not None else -1 for name in adapter_names], device=x.device
        )
        return add_lora(self.base(x), x, self.pool.table(active), adapter_of_row)


def demo() -> None:
    """Serve 8 adapters of ranks 2 to 16 (60 rank-rows) from a pool of 32 pages: each batch fetches
    the adapters it needs from host memory, evicting the least recently used."""
    generator = torch.Generator().manual_seed(0)
    K = N = 64
    torch.manual_seed(0)
    base = nn.Linear(K, N)
    host = {
        f"adapter-{i}": (
            torch.randn(rank, K, generator=generator) / K**0.5,
            torch.randn(N, rank, generator=generator),
            2.0 * rank,
        )
        for i, rank in enumerate([2, 4, 8, 16, 2, 4, 8, 16])
    }
    layer = SLoRALinear(base, AdapterPool(32, K, N), host)
    for batch in range(6):
        pair = [f"adapter-{i}" for i in torch.randperm(8, generator=generator)[:2].tolist()]
        if batch % 2:  # decode: one row per request, adapters mixed
            names = [pair[i] if i < 2 else None for i in torch.randint(0, 3, (12,), generator=generator).tolist()]
        else:  # prefill: each request's prompt is a segment of rows
            names = [pair[0]] * 9 + [None] * 3 + [pair[1]] * 14
        x = torch.randn(len(names), K, generator=generator)
        y = layer(x, names)
        expected = base(x)
        for row, name in enumerate(names):
            if name is not None:
                A, B, alpha = host[name]
                expected[row] += (alpha / A.shape[0]) * (x[row] @ A.T) @ B.T
        print(
            f"batch {batch} ({'decode' if batch % 2 else 'prefill'}, {len(names)} rows) on {', '.join(sorted(pair))}: "
            f"resident now {', '.join(sorted(layer.pool.resident))} ({len(layer.pool.free_a)} of 32 pages free); "
            f"largest difference from the dense computation {(y - expected).abs().max().item():.1e}"
        )


if __name__ == "__main__":
    demo()
