"""(IA)³ against its equations and against HF PEFT on the same weights."""

import copy

import pytest
import torch
from peft import IA3Config, inject_adapter_in_model
from test_lora import Tiny

from reference_impls._plumbing import count_parameters
from reference_impls.ia3 import IA3Linear, inject_ia3, merge_ia3, unmerge_ia3

from helpers import assert_merge_round_trip, demo_losses


def randomise(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, IA3Linear):
                module.l.uniform_(0.3, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(dtype):
    model = Tiny().to(dtype)
    reference = copy.deepcopy(model)
    inject_ia3(model, ["up", "down"], feedforward_names=["down"])
    x = torch.randn(2, 3, 13, dtype=dtype)
    assert torch.equal(model(x), reference(x))


def test_parameter_count_is_one_per_scaled_activation():
    model = Tiny()
    inject_ia3(model, ["up", "down"], feedforward_names=["down"])
    # "up" scales its 29 outputs (like l_k, l_v); "down" scales its 29 inputs (like l_ff over d_ff).
    assert count_parameters(model)[0] == 29 + 29
    assert model.up.l.shape == (29,) and model.down.l.shape == (29,) and model.down.scale_input


def test_gradients_reach_only_the_vectors():
    model = Tiny()
    inject_ia3(model, ["up", "down"], feedforward_names=["down"])
    randomise(model)
    model(torch.randn(4, 13)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == name.endswith(".l"), name


def test_merge_unmerge_round_trip():
    model = Tiny()
    inject_ia3(model, ["up", "down"], feedforward_names=["down"])
    randomise(model)
    assert_merge_round_trip(model, merge_ia3, unmerge_ia3, torch.randn(6, 13))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_equals_peft(dtype, tolerance):
    base = Tiny()
    ours = copy.deepcopy(base)
    inject_ia3(ours, ["up", "down"], feedforward_names=["down"])
    theirs = inject_adapter_in_model(
        IA3Config(target_modules=["up", "down"], feedforward_modules=["down"]), copy.deepcopy(base)
    )
    with torch.no_grad():
        for name in ("up", "down"):
            vector = getattr(theirs, name).ia3_l["default"]
            vector.uniform_(0.3, 2.0)
            getattr(ours, name).l.copy_(vector.flatten())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(3, 5, 13, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=tolerance, atol=tolerance)


def test_demo_recovers_the_scales(capsys):
    from reference_impls.ia3 import demo

    demo()
    [(before, after)] = demo_losses(capsys.readouterr().out)
    assert after < before / 100
