"""Uni-LoRA: the balanced projection (PEFT's draw), its isometry; TinyLoRA: the truncated SVD, the
core R = Σ vᵢ Pᵢ, weight tying; both against HF PEFT in both dtypes (tiny-Llama checkpoints are in
test_interop.py)."""

import copy
import warnings

import pytest
import torch
from peft import TinyLoraConfig, UniLoraConfig, get_peft_model
from peft.tuners.unilora.model import UniLoraModel
from test_lora import Tiny

from reference_impls._plumbing import count_parameters
from reference_impls.projections import (
    SharedVector,
    TinyLoRALinear,
    balanced_indices,
    inject_tinylora,
    inject_unilora,
    merge_projections,
    tinylora_groups,
    unmerge_projections,
)

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    run_demo,
)


@pytest.mark.parametrize("count, d, seed", [(100, 7, 0), (64, 64, 3), (1000, 256, 42), (5, 9, 1)])
def test_the_draw_is_balanced_and_peft_s(count, d, seed):
    indices = balanced_indices(count, d, seed)
    uses = torch.bincount(indices, minlength=d)
    assert uses.max() - uses.min() <= 1 and uses.sum() == count
    assert torch.equal(indices, UniLoraModel.generate_index(count, d, seed))


def projection(model) -> torch.Tensor:
    """P (D × d) written out: row k of every A and B, in layer order, has 1/√c at its entry of θ_d."""
    rows = []
    for layer in (model.up, model.down):
        for index, scale in ((layer.index_A, layer.scale_A), (layer.index_B, layer.scale_B)):
            block = torch.zeros(index.numel(), layer.vector.theta.numel())
            block[torch.arange(index.numel()), index.flatten()] = scale.flatten()
            rows.append(block)
    return torch.cat(rows)


def test_the_projection_is_an_isometry_and_only_theta_is_trained():
    model = Tiny()  # up: 13 → 29, down: 29 → 7; r = 2: D = 2·(13 + 29) + 2·(29 + 7) = 156
    inject_unilora(model, ["up", "down"], r=2, d=40, seed=5)
    assert count_parameters(model)[0] == 40 and model.up.vector is model.down.vector
    P = projection(model)
    assert P.shape == (156, 40)
    torch.testing.assert_close(P.T @ P, torch.eye(40))  # orthonormal columns
    theta = model.up.vector.theta.detach()
    A, B = (t.detach() for t in model.up.factors())
    torch.testing.assert_close(torch.cat([A.flatten(), B.flatten()]), (P @ theta)[: A.numel() + B.numel()])
    torch.testing.assert_close((P @ theta).norm(), theta.norm())
    model(torch.randn(3, 13)).pow(2).sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is not None] == ["up.vector.theta"]


def test_the_start_is_small_but_not_zero():
    plain = Tiny()
    model = copy.deepcopy(plain)
    inject_unilora(model, ["up", "down"], r=2, d=40)
    x = torch.randn(3, 13)
    difference = (model(x) - plain(x)).abs().max().item()
    assert 0 < difference < 1e-2  # θ_d starts in ±0.02


def test_merge_unmerge_round_trip():
    model = Tiny()
    inject_unilora(model, ["up", "down"], r=2, d=40)
    with torch.no_grad():
        model.up.vector.theta.normal_()
    assert_merge_round_trip(model, merge_projections, unmerge_projections, torch.randn(4, 13))


@pytest.mark.parametrize("save_indices", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(save_indices, dtype, tolerance, tmp_path):
    config = UniLoraConfig(r=3, theta_d_length=30, target_modules=["up", "down"], save_indices=save_indices)
    peft_model, ours = peft_and_ours(Tiny, config, tmp_path, std=1.0)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)


def tinylora_model(dtype=torch.float32, **options):
    model = Tiny().to(dtype)
    inject_tinylora(model, ["up", "down"], **{"r": 2, "u": 5, **options})
    return model


def set_vectors(model, std=1.0):
    with torch.no_grad():
        for layer in (model.up, model.down):
            layer.vector.theta.normal_(0, std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tinylora_is_the_identity_at_initialisation(dtype):
    plain = Tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_tinylora(model, ["up", "down"], r=2, u=5)
    x = torch.randn(3, 13, dtype=dtype)
    assert torch.equal(model(x), plain(x))


def test_tinylora_factors_are_the_truncated_svd_and_the_core_mixes_the_random_matrices():
    torch.manual_seed(3)
    layer = TinyLoRALinear(torch.nn.Linear(13, 9), SharedVector(4, bound=0.0), r=3, seed=7)
    W0 = layer.base.weight.detach()
    U, S, Vh = torch.linalg.svd(W0)
    torch.testing.assert_close(layer.B @ layer.A, U[:, :3] * S[:3] @ Vh[:3])  # the best rank-3 approximation
    torch.testing.assert_close(layer.A @ layer.A.T, torch.diag(S[:3]))  # Σ split evenly: A Aᵀ = Σ = Bᵀ B
    torch.testing.assert_close(layer.B.T @ layer.B, torch.diag(S[:3]))
    with torch.no_grad():
        layer.vector.theta.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    R = sum(v * P for v, P in zip(layer.vector.theta.detach(), layer.P))
    torch.testing.assert_close(layer.delta_weight().detach(), layer.B @ R @ layer.A)
    x = torch.randn(6, 13)
    torch.testing.assert_close(layer(x).detach(), layer.base(x) + x @ (layer.B @ R @ layer.A).T)


@pytest.mark.parametrize("count, tying", [(5, 0.0), (5, 0.3), (5, 0.5), (5, 1.0), (7, 0.4), (2, 0.5), (1, 0.0)])
def test_tinylora_groups_are_peft_s(count, tying):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(count)])
    peft_model = get_peft_model(model, TinyLoraConfig(u=2, weight_tying=tying, target_modules=r"\d+"))
    theirs = [int(layer._tinylora_v_key["default"]) for layer in peft_model.base_model.model]
    assert tinylora_groups(count, tying) == theirs
    assert count_parameters(peft_model)[0] == 2 * (max(theirs) + 1)


@pytest.mark.parametrize("tying, vectors", [(0.0, 2), (1.0, 1)])
def test_tinylora_parameter_count_and_gradients(tying, vectors):
    model = tinylora_model(tying=tying)
    assert count_parameters(model)[0] == 5 * vectors  # u per group of layers
    assert (model.up.vector is model.down.vector) == (vectors == 1)
    set_vectors(model)
    model(torch.randn(3, 13)).pow(2).sum().backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained == (["up.vector.theta", "down.vector.theta"] if vectors == 2 else ["up.vector.theta"])


def test_tinylora_rank_is_capped_by_the_layer():
    model = tinylora_model(r=20)  # down is 29 → 7
    assert model.down.A.shape == (7, 29) and model.down.P.shape == (5, 7, 7) and model.up.A.shape == (13, 13)


def test_tinylora_merge_unmerge_round_trip():
    model = tinylora_model()
    set_vectors(model)
    assert_merge_round_trip(model, merge_projections, unmerge_projections, torch.randn(4, 13))


with warnings.catch_warnings():  # PEFT warns that without saved projections the seed must redraw them: tested here
    warnings.simplefilter("ignore", UserWarning)
    TINYLORA_CONFIGS = {
        "default": TinyLoraConfig(r=2, u=5, target_modules=["up", "down"]),
        "tied": TinyLoraConfig(r=3, u=4, weight_tying=1.0, target_modules=["up", "down"]),
        "redrawn_projections": TinyLoraConfig(
            r=2, u=6, projection_seed=9, save_projection=False, target_modules=["up"]
        ),
        "rank_above_the_layer": TinyLoraConfig(r=20, u=3, target_modules=["up", "down"]),
    }


@pytest.mark.parametrize("case", list(TINYLORA_CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_tinylora_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_and_ours(Tiny, TINYLORA_CONFIGS[case], tmp_path, std=1.0)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.projections"))
    assert len(losses) == 4 and all(after < 0.6 * before for before, after in losses)
