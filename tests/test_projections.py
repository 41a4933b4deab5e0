"""Uni-LoRA: the balanced projection (PEFT's draw), its isometry, and HF PEFT in both dtypes
(tiny-Llama checkpoints, with and without saved indices, are in test_interop.py)."""

import copy

import pytest
import torch
from peft import UniLoraConfig
from peft.tuners.unilora.model import UniLoraModel
from test_lora import Tiny

from reference_impls._plumbing import count_parameters
from reference_impls.projections import balanced_indices, inject_unilora, merge_unilora, unmerge_unilora

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
    assert_merge_round_trip(model, merge_unilora, unmerge_unilora, torch.randn(4, 13))


@pytest.mark.parametrize("save_indices", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(save_indices, dtype, tolerance, tmp_path):
    config = UniLoraConfig(r=3, theta_d_length=30, target_modules=["up", "down"], save_indices=save_indices)
    peft_model, ours = peft_and_ours(Tiny, config, tmp_path, std=1.0)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.projections"))
    assert len(losses) == 2 and all(after < 0.6 * before for before, after in losses)
