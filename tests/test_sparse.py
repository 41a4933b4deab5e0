"""BitFit, Diff pruning (hard-concrete L0), LT-SFT and Super-Tuning against their papers' definitions,
and Super-Tuning against HF PEFT in both dtypes (a tiny-Llama checkpoint is in test_interop.py)."""

import copy
import math
import warnings

import pytest
import torch
from peft import SupertuningConfig
from test_bottleneck import Net
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.sparse import (
    BETA,
    GAMMA,
    ZETA,
    DiffLinear,
    SuperTuningLinear,
    bitfit,
    compose,
    inject_diff_pruning,
    inject_supertuning,
    input_norms,
    l0_penalty,
    lottery_ticket_masks,
    merge_supertuning,
    restrict_training,
    sparse_difference,
    unmerge_supertuning,
)

from helpers import assert_equal_in_both_dtypes, assert_merge_round_trip, demo_losses, peft_and_ours


def test_bitfit_trains_exactly_the_biases_or_the_chosen_subset():
    model = Net()
    names = bitfit(model)
    assert names == ["ffn.0.bias", "ffn.2.bias", "out.bias"]
    assert count_parameters(model)[0] == 37 + 21 + 21
    model(torch.randn(3, 21)).sum().backward()
    assert all((p.grad is not None) == n.endswith("bias") for n, p in model.named_parameters())
    assert bitfit(Net(), only=("ffn.2",)) == ["ffn.2.bias"]  # like the paper's b_m2 (second FFN layer)
    with pytest.raises(ValueError, match="no bias"):
        bitfit(nn.Sequential(nn.Linear(3, 3, bias=False)))


def test_diff_pruning_starts_as_the_base_model_and_trains_only_w_and_alpha():
    model = Net()
    reference = copy.deepcopy(model)
    inject_diff_pruning(model, ["0", "2"])
    x = torch.randn(4, 21)
    torch.testing.assert_close(model(x), reference(x))  # w = 0, whatever the mask samples
    assert count_parameters(model)[0] == 2 * (21 * 37 + 37 * 21)  # w and log α per adapted weight
    with torch.no_grad():
        model.ffn[0].w.normal_()
    model(x).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == name.endswith(("w", "log_alpha")), name


def test_hard_concrete_mask_and_expected_l0():
    layer = DiffLinear(nn.Linear(50, 40))
    with torch.no_grad():
        layer.log_alpha.normal_(0, 2)
    layer.train()
    z = layer.mask()
    assert z.min() >= 0 and z.max() <= 1 and (z == 0).any() and (z == 1).any()  # exact zeros and ones occur
    expected = torch.sigmoid(layer.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()
    torch.testing.assert_close(layer.expected_l0(), expected)
    # The expectation is the mean number of non-zeros of the sampled masks.
    samples = torch.stack([layer.mask() for _ in range(400)])
    assert abs((samples > 0).float().sum(dim=(1, 2)).mean() - expected) / expected < 0.02
    layer.eval()
    assert torch.equal(layer.mask(), layer.mask())  # deterministic at test time


def test_l0_penalty_pushes_masks_closed_and_projection_keeps_k_entries():
    model = Net()
    inject_diff_pruning(model, ["0", "2"])
    penalty = l0_penalty(model)
    penalty.backward()
    assert all((module.log_alpha.grad > 0).all() for module in model.modules() if isinstance(module, DiffLinear))
    layer = model.ffn[0]
    with torch.no_grad():
        layer.w.normal_()
    layer.project(keep=25)
    assert int((layer.delta() != 0).sum()) == 25
    x = torch.randn(3, 21)
    torch.testing.assert_close(layer(x), x @ (layer.base.weight + layer.w).T + layer.base.bias)


def test_lottery_ticket_masks_pick_the_k_largest_moves():
    before = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    after = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    masks = lottery_ticket_masks(before, after, k=6)
    assert sum(int(mask.sum()) for mask in masks.values()) == 6
    moved = torch.cat([after[n].abs().flatten() for n in before])
    chosen = torch.cat([after[n].abs().flatten()[masks[n].flatten()] for n in before])
    assert chosen.min() >= moved.topk(6).values.min()
    tied = lottery_ticket_masks({"a": torch.zeros(10)}, {"a": torch.ones(10)}, k=4)
    assert int(tied["a"].sum()) == 4  # ties still give exactly k


def test_restricted_training_changes_only_the_ticket_and_differences_compose():
    model = Net()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: torch.rand_like(p) < 0.1 for n, p in model.named_parameters()}
    hooks = restrict_training(model, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum or decay: untouched entries stay put
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 21)).pow(2).mean().backward()
        optimizer.step()
    for hook in hooks:
        hook.remove()
    for name, parameter in model.named_parameters():
        changed = parameter.detach() != theta0[name]
        assert not (changed & ~masks[name]).any(), name
    phi_task = sparse_difference(model, theta0)
    phi_language = {name: (torch.randn_like(theta0[name]) * masks[name]).to_sparse() for name in theta0}
    fresh = Net()
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            parameter.copy_(theta0[name])
    compose(fresh, phi_language, phi_task)
    for name, parameter in fresh.named_parameters():
        expected = (
            theta0[name] + phi_language[name].to_dense() + phi_task.get(name, torch.zeros(1).to_sparse()).to_dense()
        )
        torch.testing.assert_close(parameter.detach(), expected)


def test_demo_runs(capsys):
    from reference_impls.sparse import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 6 and all(after < before for before, after in losses)
    assert all(after < 0.8 * before for before, after in losses[3:])  # Super-Tuning's three


def test_diff_pruning_in_bf16_matches_fp32():
    model = Net()
    inject_diff_pruning(model, ["0", "2"])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DiffLinear):
                module.w.normal_(0, 0.1)
    model.eval()
    x = torch.randn(3, 21)
    expected = model(x)
    torch.testing.assert_close(
        copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float(), expected, rtol=5e-2, atol=5e-2
    )


# ---- Super-Tuning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top", [True, False])
def test_supertuning_trains_the_entries_of_largest_or_smallest_magnitude(top):
    torch.manual_seed(0)
    layer = SuperTuningLinear(nn.Linear(13, 9), sparsity=0.9, top=top)
    W0 = layer.base.weight.detach()
    k = int(13 * 9 * 0.1)
    chosen = torch.zeros(9 * 13, dtype=torch.bool)
    chosen[layer.positions] = True
    assert layer.s.numel() == k == chosen.sum()
    magnitude = W0.abs().flatten()
    inside, outside = magnitude[chosen], magnitude[~chosen]
    assert (inside.min() >= outside.max()) if top else (inside.max() <= outside.min())


def test_wanda_scores_weigh_magnitudes_by_the_input_norms():
    torch.manual_seed(1)
    model = Tiny()
    x = torch.randn(40, 13) * torch.linspace(0.1, 5.0, 13)  # features of very different scales
    norms = input_norms(model, ["up"], x)["up"]
    torch.testing.assert_close(norms, x.norm(dim=0))
    inject_supertuning(model, ["up"], sparsity=0.8, calibration=x)
    scores = (model.up.base.weight.detach().abs() * x.norm(dim=0)).flatten()
    expected = torch.topk(scores, int(29 * 13 * 0.2)).indices
    assert set(model.up.positions.tolist()) == set(expected.tolist())
    magnitude_only = torch.topk(model.up.base.weight.detach().abs().flatten(), expected.numel()).indices
    assert set(expected.tolist()) != set(magnitude_only.tolist())  # the activations change the choice


@pytest.mark.parametrize("supra", [{}, {"r": 2, "alpha": 3.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supertuning_starts_as_the_identity_and_trains_only_its_parts(supra, dtype):
    plain = Tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_supertuning(model, ["up", "down"], sparsity=0.9, **supra)
    x = torch.randn(3, 13, dtype=dtype)
    assert torch.equal(model(x), plain(x))
    k = int(29 * 13 * 0.1) + int(7 * 29 * 0.1)
    lora = 2 * (13 + 29) + 2 * (29 + 7) if supra else 0
    assert count_parameters(model)[0] == k + lora
    with torch.no_grad():
        for layer in (model.up, model.down):
            layer.s.normal_()
            if supra:
                layer.B.normal_()
    model(x).float().pow(2).sum().backward()
    trained = {name.split(".", 1)[1] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == ({"s", "A", "B"} if supra else {"s"})
    assert model.up.sparse_delta().count_nonzero() == int(29 * 13 * 0.1)  # S lives on the support alone


def test_the_sparse_update_touches_only_the_support_and_supra_adds_its_lora():
    torch.manual_seed(2)
    layer = SuperTuningLinear(nn.Linear(11, 6), sparsity=0.7, r=2, alpha=6.0)
    with torch.no_grad():
        layer.s.normal_()
        layer.B.normal_()
    sparse = torch.zeros(66)
    sparse[layer.positions] = layer.s.detach()
    expected = sparse.view(6, 11) + 3.0 * layer.B.detach() @ layer.A.detach()
    torch.testing.assert_close(layer.delta_weight().detach(), expected)
    x = torch.randn(4, 11)
    torch.testing.assert_close(layer(x).detach(), layer.base(x) + x @ expected.T)


@pytest.mark.parametrize("supra", [{}, {"r": 3}])
def test_supertuning_merge_unmerge_round_trip(supra):
    model = Tiny()
    inject_supertuning(model, ["up", "down"], sparsity=0.85, **supra)
    with torch.no_grad():
        for layer in (model.up, model.down):
            for parameter in layer.parameters(recurse=False):
                parameter.normal_()
    assert_merge_round_trip(model, merge_supertuning, unmerge_supertuning, torch.randn(4, 13), rtol=1e-4, atol=1e-4)


def test_supertuning_refuses_a_sparsity_that_leaves_nothing():
    with pytest.raises(ValueError, match="leaves no trained entry"):
        SuperTuningLinear(nn.Linear(4, 3), sparsity=0.95)


with warnings.catch_warnings():  # PEFT warns that unsaved indices are scored again from the weight: tested here
    warnings.simplefilter("ignore", UserWarning)
    SUPERTUNING_CONFIGS = {
        "magnitude_top": SupertuningConfig(sparsity=0.9, target_modules=["up", "down"]),
        "magnitude_bottom": SupertuningConfig(sparsity=0.8, select_top=False, target_modules=["up", "down"]),
        "supra": SupertuningConfig(sparsity=0.9, r=3, lora_alpha=5.0, target_modules=["up", "down"]),
        "indices_scored_again": SupertuningConfig(
            sparsity=0.9, save_precomputed_indices=False, target_modules=["up", "down"]
        ),
    }


@pytest.mark.parametrize("case", list(SUPERTUNING_CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_supertuning_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_and_ours(Tiny, SUPERTUNING_CONFIGS[case], tmp_path, std=0.3)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)
