"""BitFit, Diff pruning (hard-concrete L0) and LT-SFT against their papers' definitions."""

import copy
import math

import pytest
import torch
from test_bottleneck import Net
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.sparse import (
    BETA,
    GAMMA,
    ZETA,
    DiffLinear,
    bitfit,
    compose,
    inject_diff_pruning,
    l0_penalty,
    lottery_ticket_masks,
    restrict_training,
    sparse_difference,
)

from helpers import demo_losses


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
    assert len(losses) == 3 and all(after < before for before, after in losses)


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
