"""GLoRA against its equations and counts, and against HF PEFT in both dtypes."""

import copy

import pytest
import torch
from peft import GloraConfig
from test_lora import Tiny

from reference_impls._plumbing import count_parameters
from reference_impls.glora import inject_glora, merge_glora, unmerge_glora

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    run_demo,
)

SUPPORTS = {
    "default": {},
    "vectors": {"weight_supports": "vector", "prompt": "vector", "bias_supports": "vector"},
    "constants": {"weight_supports": "constant", "prompt": "none", "bias_supports": "constant"},
}


def randomise(model):
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)


@pytest.mark.parametrize("case", list(SUPPORTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(case, dtype):
    plain = Tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_glora(model, ["up", "down"], r=3, **SUPPORTS[case])
    x = torch.randn(2, 4, 13, dtype=dtype)
    assert torch.equal(model(x), plain(x))


def test_parameter_counts_and_the_equations():
    model = Tiny()  # up: 13 → 29, down: 29 → 7, both with a bias
    inject_glora(model, ["up", "down"], r=3)
    per_layer = lambda d_in, d_out: 2 * 3 * (d_in + d_out) + 3 * (d_in + 1) + 2  # noqa: E731
    assert count_parameters(model)[0] == per_layer(13, 29) + per_layer(29, 7)
    randomise(model)
    layer = model.up
    W0, b = layer.base.weight.detach(), layer.base.bias.detach()
    A, B, C = (s.down.detach() @ s.up.detach() for s in (layer.A, layer.B, layer.C))
    D, E = layer.D.value.detach()[0], layer.E.value.detach()[0]
    x = torch.randn(5, 13)
    expected = x @ (W0 + W0 * A + B).T + (b + b * D + E + (W0 @ C).squeeze(-1))
    torch.testing.assert_close(layer(x), expected)
    model(x).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("case", list(SUPPORTS))
def test_merge_unmerge_round_trip(case):
    model = Tiny()
    inject_glora(model, ["up", "down"], r=3, **SUPPORTS[case])
    randomise(model)
    assert_merge_round_trip(model, merge_glora, unmerge_glora, torch.randn(4, 13))


CONFIGS = {
    "default": GloraConfig(r=3, target_modules=["up", "down"]),
    "vectors": GloraConfig(r=3, config_A_B="vector", config_C="vector", config_D_E="vector", target_modules=["up"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_and_ours(Tiny, CONFIGS[case], tmp_path)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.glora"))
    assert len(losses) == 2 and all(after < 0.6 * before for before, after in losses)
