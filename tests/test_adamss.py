"""AdaMSS against its equations (the truncated SVD basis, one update per cluster of output neurons),
its clustering against scikit-learn's k-means, and everything against HF PEFT: the clusters, the
ranks, the starting subspaces, the logits in both dtypes, and ASA's freezing during training (tiny-
Llama checkpoints are in test_interop.py)."""

import copy

import numpy as np
import pytest
import torch
from peft import AdamssConfig, get_peft_model
from sklearn.cluster import KMeans
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.adamss import (
    AdaMSSLinear,
    SubspaceAllocator,
    inject_adamss,
    kmeans,
    merge_adamss,
    truncated_svd,
    unmerge_adamss,
)
from reference_impls.interop import load_peft_adapter

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    relative_error,
    run_demo,
)


@pytest.mark.parametrize("seed", range(40))
def test_kmeans_gives_scikit_learn_s_labels(seed):
    generator = torch.Generator().manual_seed(seed)
    n, d, k = (int(torch.randint(low, high, (1,), generator=generator)) for low, high in ((3, 150), (1, 30), (1, 9)))
    points = torch.randn(n, d, generator=generator) * torch.rand(d, generator=generator)  # uneven spreads
    expected = KMeans(n_clusters=min(k, n), init="random", n_init=1, max_iter=10, random_state=123456789)
    assert np.array_equal(kmeans(points, min(k, n)).numpy(), expected.fit_predict(points.numpy()))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # fewer distinct points than k
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_kmeans_fills_an_empty_cluster_as_scikit_learn_does(k):
    points = torch.tensor([[0.0], [0.0], [0.0], [10.0], [10.1], [50.0]])  # duplicates: a start can go empty
    expected = KMeans(n_clusters=k, init="random", n_init=1, max_iter=10, random_state=123456789)
    assert np.array_equal(kmeans(points, k).numpy(), expected.fit_predict(points.numpy()))


def adamss_pair(config, make=Tiny):
    """PEFT's AdaMSS model and ours injected with the same settings on the same weights."""
    base = make()
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, copy.deepcopy(config))
    options = {"dynamic_rank": config.use_dynamic_rank, "threshold": config.svd_threshold, "seed": config.random_seed}
    inject_adamss(ours, ["up", "down"], R=config.r, K=config.num_subspaces, r=config.subspace_rank, **options)
    return peft_model, ours


CONFIGS = {
    "fixed_rank": AdamssConfig(r=8, num_subspaces=3, subspace_rank=2, target_modules=["up", "down"]),
    "defaults": AdamssConfig(target_modules=["up", "down"]),  # R = 100 above both layers' ranks
    "dynamic_rank": AdamssConfig(
        r=12, num_subspaces=4, subspace_rank=3, use_dynamic_rank=True, svd_threshold=0.2, target_modules=["up", "down"]
    ),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_clusters_basis_and_ranks_are_peft_s_and_each_start_is_the_cluster_s_top_directions(case):
    peft_model, ours = adamss_pair(CONFIGS[case])
    for name in ("up", "down"):
        theirs, layer = peft_model.base_model.model.get_submodule(name), ours.get_submodule(name)
        order = torch.argsort(layer.inverse)  # our rows, cluster by cluster
        torch.testing.assert_close(order, theirs.scatter_index["default"])
        torch.testing.assert_close(layer.Vt, theirs.adamss_newB["default"])
        weight = torch.cat([layer.base.weight, layer.base.bias[:, None]], dim=1).detach()
        U, _ = truncated_svd(weight, layer.Vt.shape[0], CONFIGS[case].random_seed)
        clusters = order.split([len(B) for B in layer.B])
        for rows, A, B, their_A, their_B in zip(
            clusters, layer.A, layer.B, theirs.adamss_A["default"], theirs.adamss_B["default"]
        ):
            assert A.shape == their_A.shape and B.shape == their_B.shape and not B.any()
            top = torch.linalg.svd(U[rows], full_matrices=False)[2][: A.shape[0]]
            torch.testing.assert_close(A.T @ A, top.T @ top, rtol=1e-4, atol=1e-5)  # the exact top subspace


def test_the_update_of_each_cluster_lives_on_its_rows_in_the_frozen_basis():
    torch.manual_seed(1)
    layer = AdaMSSLinear(nn.Linear(11, 9), R=6, K=3, r=2)
    with torch.no_grad():
        for B in layer.B:
            B.normal_()
    W_with_bias = torch.cat([layer.base.weight, layer.base.bias[:, None]], dim=1).detach()
    U, Vt = truncated_svd(W_with_bias, 6)
    torch.testing.assert_close(layer.Vt, Vt)
    delta = layer.delta().detach()
    rows = torch.argsort(layer.inverse).split([len(B) for B in layer.B])
    for cluster, A, B in zip(rows, layer.A, layer.B):
        torch.testing.assert_close(delta[cluster], (B @ A @ Vt).detach())
    x = torch.randn(5, 11)
    expected = layer.base(x) + torch.cat([x, torch.ones(5, 1)], dim=1) @ delta.T
    torch.testing.assert_close(layer(x).detach(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(dtype):
    plain = Tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_adamss(model, ["up", "down"], R=8, K=3, r=2)
    x = torch.randn(3, 13, dtype=dtype)
    assert torch.equal(model(x), plain(x))


def test_parameter_count_follows_the_formula_and_only_a_and_b_train():
    model = Tiny()  # up 13 → 29, down 29 → 7
    inject_adamss(model, ["up", "down"], R=8, K=3, r=2)
    expected = sum(
        len(B) * B.shape[1] + A.numel() for layer in (model.up, model.down) for A, B in zip(layer.A, layer.B)
    )
    assert count_parameters(model)[0] == expected
    sizes = [len(B) for B in model.up.B]
    assert expected - sum(A.numel() + B.numel() for A, B in zip(model.down.A, model.down.B)) == sum(
        min(2, n) * (8 + n) for n in sizes
    )  # Σ r_k (R + |I_k|)
    on_meta = Tiny().to("meta")
    inject_adamss(on_meta, ["up", "down"], R=8, K=3, r=2)
    assert count_parameters(on_meta)[0] == (3 * 2 * 8 + 2 * 29) + (3 * 2 * 7 + 2 * 7)  # K r R + r d_out, R ≤ d_out
    with torch.no_grad():
        for B in model.up.B:
            B.normal_()
    model(torch.randn(4, 13)).pow(2).sum().backward()
    trained = {name.split(".")[1] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {"A", "B"}


@pytest.mark.parametrize("bias", [True, False])
def test_merge_unmerge_round_trip_moves_the_bias_too(bias):
    model = nn.Sequential(nn.Linear(13, 10, bias=bias), nn.Tanh(), nn.Linear(10, 6, bias=bias))
    inject_adamss(model, ["0", "2"], R=5, K=2, r=2)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    biases = [layer.base.bias.detach().clone() if bias else None for layer in (model[0], model[2])]
    merge_adamss(model)
    if bias:
        assert not torch.equal(model[0].base.bias, biases[0])
    unmerge_adamss(model)
    assert_merge_round_trip(model, merge_adamss, unmerge_adamss, torch.randn(4, 13), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_equals_peft(case, tmp_path):
    peft_model, ours = peft_and_ours(Tiny, CONFIGS[case], tmp_path, std=0.5)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), torch.float32, 1e-5)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_equals_peft_in_bf16(case, tmp_path):
    """PEFT's AdaMSS layer keeps the dtype it was built in (a model cast afterwards fails in its
    forward), so both models are built in bf16 here."""
    peft_model, ours = peft_and_ours(lambda: Tiny().to(torch.bfloat16), CONFIGS[case], tmp_path, std=0.5)
    x = torch.randn(3, 5, 13, dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(ours(x), peft_model(x)) <= 3e-2


def test_asa_freezes_the_clusters_peft_freezes_and_training_stays_equal(tmp_path):
    config = AdamssConfig(
        r=8, num_subspaces=4, subspace_rank=2, target_modules=["up", "down"], use_asa=True, asa_target_subspaces=3,
        init_warmup=2, final_warmup=12, mask_interval=3,
    )  # fmt: skip
    peft_model, ours = peft_and_ours(Tiny, config, tmp_path, std=0.3)
    for parameter in ours.parameters():  # the loaded model is frozen: train A and B, as PEFT does
        parameter.requires_grad_(False)
    for layer in (ours.up, ours.down):
        layer.A.requires_grad_(True), layer.B.requires_grad_(True)
    allocator = SubspaceAllocator(ours, target=3, init_warmup=2, final_warmup=12, interval=3)
    trainable = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
    x, y = torch.randn(16, 13), torch.randn(16, 7)
    ours_opt, their_opt = torch.optim.SGD(trainable(ours), lr=0.05), torch.optim.SGD(trainable(peft_model), lr=0.05)
    history = []
    for step in range(16):
        for model, optimizer in ((peft_model, their_opt), (ours, ours_opt)):
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        allocator.step(step)
        theirs = [
            p.requires_grad
            for name in ("up", "down")
            for p in peft_model.base_model.model.get_submodule(name).adamss_A["default"]
        ]
        mine = [layer.A[k].requires_grad for layer, k in allocator.clusters]
        assert mine == theirs, f"step {step}"
        history.append(sum(mine))
    assert history[0] == 8 and history[-1] < 8  # it pruned (PEFT keeps those strictly above the 3rd best: 2)
    with torch.no_grad():
        assert relative_error(ours(x), peft_model(x)) <= 1e-5


def test_loading_refuses_a_checkpoint_whose_clusters_differ(tmp_path):
    peft_model, _ = peft_and_ours(Tiny, CONFIGS["fixed_rank"], tmp_path)
    other = Tiny()
    with torch.no_grad():
        other.up.weight.copy_(torch.randn_like(other.up.weight))  # other weights cluster otherwise
    from reference_impls.interop import UnsupportedAdapter

    with pytest.raises(UnsupportedAdapter, match="does not fit this model"):
        load_peft_adapter(other, tmp_path)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.adamss"))
    assert len(losses) == 2 and all(after < 0.6 * before for before, after in losses)
