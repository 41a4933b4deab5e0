"""Compacter against the PHM equation (explicit Kronecker products) and against AdapterHub `adapters`."""

import copy

import pytest
import torch
from test_bottleneck import Net
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.phm import PHMLinear, inject_compacter

from helpers import assert_same_encoding, demo_losses, tiny_bert


def test_phm_weight_is_a_sum_of_kronecker_products():
    rules = nn.Parameter(torch.randn(4, 4, 4))
    layer = PHMLinear(12, 20, rules, rank=2)
    with torch.no_grad():
        layer.t.normal_()
    expected = sum(torch.kron(rules[i], layer.s[i] @ layer.t[i]) for i in range(4))
    torch.testing.assert_close(layer.weight(), expected)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), x @ expected + layer.b)
    with pytest.raises(ValueError, match="divisible"):
        PHMLinear(10, 20, rules)


def test_identity_at_start_shared_rules_and_parameter_count():
    model = Net()
    reference = copy.deepcopy(model)
    # d = 21 is odd on purpose; n = 3 divides it (21 / 3 = 7, 6 / 3 = 2).
    inject_compacter(model, ["ffn", "out"], m=6, n=3, rank=1)
    x = torch.randn(2, 5, 21)
    assert torch.equal(model(x), reference(x))
    assert model.ffn.adapter.down.rules is model.out.adapter.up.rules  # one set of slow weights
    n, r, d, m = 3, 1, 21, 6
    per_adapter = 2 * n * r * (d // n + m // n) + d + m
    assert count_parameters(model)[0] == n**3 + 2 * per_adapter


def test_gradients_reach_only_compacter_parameters():
    model = Net()
    inject_compacter(model, ["ffn"], m=6, n=3)
    with torch.no_grad():
        model.ffn.adapter.up.t.normal_()
    model(torch.randn(4, 21)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (".adapter." in name), name


def copy_compacters_from_adapterhub(ours, theirs, targets, hub_place):
    """Random values in AdapterHub's shared rule and every PHM layer at the targets, copied into ours."""
    with torch.no_grad():
        shared = theirs.base_model.shared_parameters["task"]["phm_rule"]
        shared.normal_()
        ours.get_submodule(targets[0]).adapter.down.rules.copy_(shared)
        for target in targets:
            hub = theirs.get_submodule(hub_place(target)).adapters["task"]
            mine = ours.get_submodule(target).adapter
            for source, destination in ((hub.adapter_down[0], mine.down), (hub.adapter_up, mine.up)):
                for name, parameter in (("W_left", destination.s), ("W_right", destination.t), ("b", destination.b)):
                    getattr(source, name).normal_()
                    parameter.copy_(getattr(source, name))


def test_compacter_equals_adapterhub_on_a_tiny_bert():
    import adapters
    from adapters import CompacterConfig

    base = tiny_bert(hidden=64, intermediate=72)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("task", config=CompacterConfig(reduction_factor=8, phm_dim=4))
    theirs.set_active_adapters("task")
    targets = [f"encoder.layer.{i}.{where}.dense" for i in range(2) for where in ("attention.output", "output")]
    inject_compacter(ours, targets, m=8, n=4, rank=1)
    copy_compacters_from_adapterhub(ours, theirs, targets, hub_place=lambda target: target.removesuffix(".dense"))
    assert_same_encoding(ours, theirs, base)


def test_compacter_plus_plus_equals_adapterhub_in_its_place():
    """Compacter++: one Compacter per layer, in Pfeiffer's place (the FFN's Add & Norm block, its
    LayerNorm applied again), as AdapterHub's CompacterPlusPlusConfig."""
    import adapters
    from adapters import CompacterPlusPlusConfig

    from reference_impls.phm import COMPACTER_PLUS_PLUS

    base = tiny_bert(hidden=64, intermediate=72)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("task", config=CompacterPlusPlusConfig(reduction_factor=8, phm_dim=4))
    theirs.set_active_adapters("task")
    targets = [f"encoder.layer.{i}.output" for i in range(2)]
    inject_compacter(ours, targets, m=8, n=4, rank=1, **COMPACTER_PLUS_PLUS)
    hub_places = [name for name, module in theirs.named_modules() if name.endswith("adapters.task")]
    assert hub_places == [f"encoder.layer.{i}.output.adapters.task" for i in range(2)]  # the FFN only
    copy_compacters_from_adapterhub(ours, theirs, targets, hub_place=lambda target: target)
    assert_same_encoding(ours, theirs, base)
    with pytest.raises(ValueError, match="Add & Norm block"):
        inject_compacter(copy.deepcopy(base), ["encoder.layer.0.output.dense"], **COMPACTER_PLUS_PLUS)


def test_demo_runs_and_learns(capsys):
    from reference_impls.phm import demo

    demo()
    [(before, after)] = demo_losses(capsys.readouterr().out)
    assert after < before * 0.8


def test_bf16_matches_fp32():
    model = Net()
    inject_compacter(model, ["ffn", "out"], m=6, n=3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PHMLinear):
                module.t.normal_()
    x = torch.randn(2, 5, 21)
    expected = model(x)
    torch.testing.assert_close(
        copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float(), expected, rtol=5e-2, atol=5e-2
    )
