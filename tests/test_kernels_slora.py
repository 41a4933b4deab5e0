"""S-LoRA's paged pool: adapters of mixed ranks scattered over random pages, evicted and reloaded,
served through the kernels, always equal to the dense computation with the original matrices."""

import random
import re

import pytest
import torch

from reference_impls.kernels.punica import reference_shrink_expand, reference_table, stacked_table
from reference_impls.kernels.slora import AdapterPool, PoolFull, SLoRALinear

from helpers import relative_error, run_demo, spy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K, N = 40, 36


def adapter(rank):
    return torch.randn(rank, K, device=DEVICE) / K**0.5, torch.randn(N, rank, device=DEVICE), float(2 * rank)


def dense(base, x, names, adapters):
    """The plain computation, straight from each adapter's own A, B and α."""
    y = base(x)
    for row, name in enumerate(names):
        if name is not None:
            A, B, alpha = adapters[name]
            y[row] = y[row] + (alpha / A.shape[0]) * (x[row] @ A.T) @ B.T
    return y


@pytest.fixture
def served():
    pages = 48
    order = list(range(pages))
    random.shuffle(order)  # adapters land on random, non-contiguous pages
    pool = AdapterPool(pages, K, N, device=DEVICE, page_order=order)
    adapters = {name: adapter(rank) for name, rank in [("a", 2), ("b", 5), ("c", 16), ("d", 7), ("e", 3)]}
    for name in ("a", "b", "c", "d"):
        pool.load(name, *adapters[name])
    base = torch.nn.Linear(K, N).to(DEVICE)
    return pool, adapters, base, SLoRALinear(base, pool)


def test_prefill_and_decode_equal_dense_with_mixed_ranks(served, monkeypatch):
    from reference_impls.kernels import punica

    launches = [spy(monkeypatch, punica, name) for name in ("sgmv_table", "bgmv_table")]
    pool, adapters, base, layer = served
    prefill = ["c"] * 20 + ["a"] * 9 + [None] * 4 + ["d"] * 17  # segments: SGMV
    decode = ["b", "a", None, "d", "c", "b", "a"]  # one row per request: BGMV
    for names in (prefill, decode):
        x = torch.randn(len(names), K, device=DEVICE)
        assert relative_error(layer(x, names), dense(base, x, names, adapters)) < 1e-4
    assert [len(calls) for calls in launches] == [1, 1]  # the kernels ran (CUDA, or the interpreter)
    pages = [page for resident in pool.resident.values() for page in resident.a_pages]
    assert pages != sorted(pages)  # really scattered


def test_evict_and_reload_keeps_results_exact(served):
    pool, adapters, base, layer = served
    with pytest.raises(PoolFull):
        pool.load("e", *adapter(20))  # 48 pages, 30 in use: no room for rank 20
    pool.evict("c")
    pool.evict("a")
    pool.load("e", *adapters["e"])
    pool.load("a", *adapters["a"])  # back, on other pages
    names = ["e", "b", None, "a", "d", "e", "e"]
    x = torch.randn(len(names), K, device=DEVICE)
    assert relative_error(layer(x, names), dense(base, x, names, adapters)) < 1e-4
    assert "c" not in pool.resident and len(pool.free_a) == 48 - (3 + 5 + 2 + 7)


def test_reference_table_reads_stacked_tensors_like_the_direct_computation():
    A, B = torch.randn(3, 4, 10), torch.randn(3, 12, 4)
    x, y, ids = torch.randn(6, 10), torch.randn(6, 12), torch.tensor([0, 2, -1, 1, 1, 0])
    torch.testing.assert_close(
        reference_table(y, x, stacked_table(A, B, 0.5), ids), reference_shrink_expand(y, x, A, B, ids, 0.5)
    )


def test_adapters_are_fetched_per_batch_and_the_least_recently_used_evicted():
    adapters = {name: adapter(rank) for name, rank in [("a", 4), ("b", 4), ("c", 4), ("d", 6), ("e", 8), ("f", 16)]}
    pool = AdapterPool(20, K, N, device=DEVICE)
    base = torch.nn.Linear(K, N).to(DEVICE)
    layer = SLoRALinear(base, pool, host=adapters)
    for names, resident in [
        (["a", "b", None], ["a", "b"]),
        (["c", "a"], ["b", "a", "c"]),  # a was used again: b is now the oldest
        (["d", None], ["b", "a", "c", "d"]),  # 18 of 20 pages
        (["e", "a"], ["d", "a", "e"]),
    ]:  # e needs 8 pages: b, then c go; d is younger
        x = torch.randn(len(names), K, device=DEVICE)
        assert relative_error(layer(x, names), dense(base, x, names, adapters)) < 1e-4
        assert list(pool.resident) == resident  # oldest used first
    with pytest.raises(PoolFull, match="do not fit in the pool together"):
        layer(torch.randn(2, K, device=DEVICE), ["e", "f"])  # 8 + 16 > 20


def test_demo_serves_every_batch_exactly():
    output = run_demo("reference_impls.kernels.slora")
    differences = [float(value) for value in re.findall(r"dense computation ([\d.e+-]+)", output)]
    assert len(differences) == 6 and max(differences) < 1e-4
    assert "8 of 32 pages free" in output  # a batch needed a rank-16 adapter and evicted others for it
