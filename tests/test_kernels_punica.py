"""Punica's SGMV and BGMV kernels against the dense per-row computation; serving a model's mixed batch."""

import copy

import pytest
import torch
from torch import nn

from reference_impls.kernels.punica import (
    MultiLoRALinear,
    bgmv,
    bgmv_table,
    inject_multi_lora,
    load_lora,
    reference_shrink_expand,
    route,
    rows_aligned,
    segments_of,
    sgmv,
    stacked_table,
)

from helpers import demo_losses, relative_error, run_demo, spy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [(torch.float32, 1e-4), (torch.float16, 2e-2)] + ([(torch.bfloat16, 3e-2)] if DEVICE == "cuda" else [])


def stacks(L, r, K, N, dtype):
    A = torch.randn(L, r, K, device=DEVICE, dtype=dtype) / K**0.5
    B = torch.randn(L, N, r, device=DEVICE, dtype=dtype)
    return A, B


@pytest.mark.parametrize("dtype, tolerance", DTYPES)
@pytest.mark.parametrize("M, K, N, r, L", [(13, 70, 45, 4, 5), (1, 33, 17, 16, 2), (40, 64, 130, 8, 3)])
def test_bgmv_equals_reference(M, K, N, r, L, dtype, tolerance):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    y = torch.randn(M, N, device=DEVICE, dtype=dtype)
    A, B = stacks(L, r, K, N, dtype)
    adapter_of_row = torch.randint(-1, L, (M,), device=DEVICE)  # random adapters, some rows with none
    expected = reference_shrink_expand(y, x, A, B, adapter_of_row, 0.5)
    got = bgmv(y.clone(), x, A, B, adapter_of_row.to(torch.int32), 0.5)
    assert relative_error(got, expected) < tolerance
    untouched = adapter_of_row < 0
    assert torch.equal(got[untouched], y[untouched])  # rows without an adapter are left exactly as they were


@pytest.mark.parametrize("block_k", [16, 64])
def test_bgmv_shrink_split_over_k(block_k):
    """The shrink splits K over programs whose partial sums are added atomically: several blocks, the last partial."""
    M, K, N, r, L = 9, 70, 33, 5, 4
    x, y = torch.randn(M, K, device=DEVICE), torch.randn(M, N, device=DEVICE)
    A, B = stacks(L, r, K, N, torch.float32)
    adapter_of_row = torch.tensor([3, 0, -1, 3, 1, 2, 2, -1, 0], device=DEVICE)
    got = bgmv_table(y.clone(), x, stacked_table(A, B, 0.5), adapter_of_row, block_k=block_k)
    assert relative_error(got, reference_shrink_expand(y, x, A, B, adapter_of_row, 0.5)) < 1e-5


def test_vector_loads_of_a_only_where_every_row_is_aligned():
    """The kernels may load A's rows as 16-byte vectors only when each row starts on 16 bytes."""
    for K, aligned in ((64, True), (70, False), (36, False)):
        A, B = stacks(3, 4, K, 8, torch.float32)
        assert rows_aligned(stacked_table(A, B, 1.0), K) is aligned
    storage, B = torch.randn(1 + 3 * 4 * 64, device=DEVICE), stacks(3, 4, 64, 8, torch.float32)[1]
    shifted = storage[1:].view(3, 4, 64)  # contiguous, K a multiple of 8, but starting 4 bytes in
    assert not rows_aligned(stacked_table(shifted, B, 1.0), 64)


@pytest.mark.parametrize("dtype, tolerance", DTYPES)
def test_sgmv_equals_reference_on_segments_of_odd_lengths(dtype, tolerance):
    lengths, adapters = [5, 37, 1, 16, 9], [2, 0, -1, 2, 1]
    M, K, N, r, L = sum(lengths), 50, 70, 6, 3
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    y = torch.randn(M, N, device=DEVICE, dtype=dtype)
    A, B = stacks(L, r, K, N, dtype)
    adapter_of_row = torch.cat([torch.full((n,), a, device=DEVICE) for n, a in zip(lengths, adapters)])
    starts, segment_adapter = segments_of(adapter_of_row)
    assert starts.tolist() == [0, 5, 42, 43, 59, 68] and segment_adapter.tolist() == adapters
    expected = reference_shrink_expand(y, x, A, B, adapter_of_row, 2.0)
    got = sgmv(y.clone(), x, A, B, starts, segment_adapter, 2.0)
    assert relative_error(got, expected) < tolerance


def test_empty_batch():
    A, B = stacks(2, 4, 8, 8, torch.float32)
    empty = torch.empty(0, 8, device=DEVICE)
    assert bgmv(empty.clone(), empty, A, B, torch.empty(0, dtype=torch.int32, device=DEVICE), 1.0).shape == (0, 8)


def test_multi_lora_layer_serves_mixed_batches_like_separate_lora_layers(monkeypatch):
    """Through the kernels (asserted: on CUDA, and in the interpreter on a CPU), each row equals its own
    LoRA layer computed in plain PyTorch."""
    from reference_impls.kernels import punica
    from reference_impls.lora import LoRALinear

    launches = {name: spy(monkeypatch, punica, name) for name in ("bgmv_table", "sgmv_table")}
    base = torch.nn.Linear(24, 20).to(DEVICE)
    layer = MultiLoRALinear(base, adapters=3, r=4, alpha=8)
    with torch.no_grad():
        layer.B.normal_()
    for adapter_of_row in (
        torch.tensor([2, 0, -1, 1, 1, 2], device=DEVICE),  # decode: BGMV
        torch.tensor([1] * 20 + [0] * 12 + [-1] * 3, device=DEVICE),
    ):  # prefill: SGMV
        x = torch.randn(len(adapter_of_row), 24, device=DEVICE)
        got = layer(x, adapter_of_row)
        for row, adapter in enumerate(adapter_of_row.tolist()):
            if adapter < 0:
                expected = base(x[row])
            else:
                single = LoRALinear(base, r=4, alpha=8)
                single.use_kernels = False
                with torch.no_grad():
                    single.A.copy_(layer.A[adapter])
                    single.B.copy_(layer.B[adapter])
                expected = single(x[row : row + 1])[0]
            assert relative_error(got[row], expected) < 1e-4
    assert [len(calls) for calls in launches.values()] == [1, 1]  # decode through BGMV, prefill through SGMV


class Encoder(nn.Module):
    """Token vectors through two odd-width projections and a head that stays unadapted."""

    def __init__(self):
        super().__init__()
        self.q, self.o, self.head = nn.Linear(19, 27), nn.Linear(27, 19), nn.Linear(19, 3)

    def forward(self, x):  # x: (requests, tokens, 19)
        return self.head(x + self.o(torch.tanh(self.q(x))))


def test_a_served_model_gives_each_request_what_its_own_lora_model_gives():
    from reference_impls.lora import inject_lora

    torch.manual_seed(0)
    base = Encoder().to(DEVICE)
    trained = []
    for _ in range(3):  # three "trained" adapters: LoRA models with random non-zero B
        model = copy.deepcopy(base)
        inject_lora(model, ["q", "o"], r=3, alpha=5)
        with torch.no_grad():
            for name in ("q", "o"):
                model.get_submodule(name).B.normal_()
        trained.append(model)
    served = copy.deepcopy(base)
    assert inject_multi_lora(served, ["q", "o"], adapters=3, r=3, alpha=5) == ["q", "o"]
    assert not any(parameter.requires_grad for parameter in served.parameters())
    for index, model in enumerate(trained):
        load_lora(served, index, model)

    adapter_of_request = torch.tensor([1, -1, 0, 2, 1], device=DEVICE)
    x = torch.randn(5, 4, 19, device=DEVICE)  # 5 requests of 4 tokens: each token uses its request's adapter
    with torch.no_grad(), route(served, adapter_of_request):
        got = served(x)
    with torch.no_grad():
        for request, adapter in enumerate(adapter_of_request.tolist()):
            expected = (trained[adapter] if adapter >= 0 else base)(x[request : request + 1])[0]
            assert relative_error(got[request], expected) < 1e-4
    with pytest.raises(ValueError, match="route"):  # route() is over: the layers no longer know the adapters
        served(x)


def test_serving_refuses_what_does_not_fit():
    layer = MultiLoRALinear(nn.Linear(8, 6).to(DEVICE), adapters=2, r=4)
    with pytest.raises(ValueError, match="3 adapter indices for a batch of 5 rows"):
        layer(torch.randn(5, 8, device=DEVICE), torch.tensor([0, 1, 0], device=DEVICE))
    with pytest.raises(ValueError, match="does not fit"):
        layer.load_adapter(0, torch.zeros(2, 8), torch.zeros(6, 2))  # rank 2 into rank-4 slots
    from reference_impls.lora import inject_lora

    model, served = nn.Sequential(nn.Linear(8, 6)), nn.Sequential(nn.Linear(8, 6))
    inject_lora(model, ["0"], r=4, alpha=8)
    inject_multi_lora(served, ["0"], adapters=2, r=4, alpha=4)
    with pytest.raises(ValueError, match="scale"):
        load_lora(served, 0, model)


def test_demo_runs_and_serves_what_it_trained():
    output = run_demo("reference_impls.kernels.punica")
    losses = demo_losses(output)
    assert len(losses) == 3 and all(after < 0.1 * before for before, after in losses)
    difference = float(output.rsplit(" ", 1)[-1])
    assert difference < 1e-4
