"""Lily: what its layers share, its routed update and its counts, and HF PEFT in both dtypes (the
tiny-Llama checkpoint is in test_interop.py)."""

import copy
from collections import OrderedDict

import pytest
import torch
from peft import LilyConfig
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.lily import LilyLinear, inject_lily

from helpers import assert_equal_in_both_dtypes, demo_losses, peft_and_ours, run_demo


def stack(blocks=4):
    """Blocks with a 12 → 10 `proj` and a 10 → 12 `back`, so that two roles of different shapes exist."""
    torch.manual_seed(0)
    block = lambda: nn.Sequential(OrderedDict(proj=nn.Linear(12, 10), act=nn.Tanh(), back=nn.Linear(10, 12)))  # noqa: E731
    return nn.Sequential(*[block() for _ in range(blocks)])


def randomise(model):
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)


def test_sharing_follows_roles_and_strides():
    model = stack()
    inject_lily(model, ["proj", "back"], r=3, stride=2, experts=2)
    proj = [model[i].proj for i in range(4)]
    assert proj[0].down is proj[1].down and proj[2].down is proj[3].down and proj[1].down is not proj[2].down
    assert all(layer.experts is proj[0].experts for layer in proj)
    assert model[0].back.experts is not proj[0].experts  # another role
    assert len({id(layer.router) for layer in proj}) == 4  # a router per layer
    # Per role: (L / stride) r d_in + E r d_out + L E r.
    expected = (2 * 3 * 12 + 2 * 3 * 10 + 4 * 2 * 3) + (2 * 3 * 10 + 2 * 3 * 12 + 4 * 2 * 3)
    assert count_parameters(model)[0] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(dtype):
    plain = stack().to(dtype)
    model = copy.deepcopy(plain)
    inject_lily(model, ["proj", "back"], r=3, stride=2, experts=2)
    model.to(dtype)
    x = torch.randn(2, 5, 12, dtype=dtype)
    assert torch.equal(model(x), plain(x))


def test_the_update_mixes_the_experts_with_batch_averaged_weights():
    torch.manual_seed(1)
    model = stack(blocks=1)
    inject_lily(model, ["proj"], r=3, experts=3, scale=0.5)
    randomise(model)
    layer: LilyLinear = model[0].proj
    x = torch.randn(4, 6, 12)
    z = x @ layer.down.A.detach().T
    p = torch.softmax(z @ layer.router.detach().T, -1).reshape(-1, 3).mean(0)
    B = sum(p[e] * layer.experts.B.detach()[e] for e in range(3))
    torch.testing.assert_close(layer(x), layer.base(x) + 0.5 * z @ B)
    assert not torch.allclose(layer(x)[:1], layer(x[:1]))  # a row's output depends on its batch


def test_gradients_reach_the_shared_and_own_parts_only():
    model = stack()
    inject_lily(model, ["proj"], r=3, stride=2, experts=2)
    randomise(model)
    model(torch.randn(3, 12)).pow(2).sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained == {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".base." not in name for name in trained)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(dtype, tolerance, tmp_path):
    config = LilyConfig(r=3, num_B=2, stride_A=2, target_modules=["proj", "back"])
    peft_model, ours = peft_and_ours(stack, config, tmp_path, std=0.5)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 12), dtype, tolerance)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.lily"))
    assert len(losses) == 1 and losses[0][1] < 0.6 * losses[0][0]
