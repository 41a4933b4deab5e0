"""DeLoRA against its equation, its norm bound and HF PEFT on the same weights."""

import copy

import pytest
import torch
from peft import DeloraConfig, get_peft_model
from test_lora import Tiny

from reference_impls._plumbing import count_parameters
from reference_impls.delora import DeLoRALinear, bound, inject_delora, merge_delora, unmerge_delora
from reference_impls.interop import load_peft_adapter

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo


def randomise(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DeLoRALinear):
                module.A.normal_(0, 0.5)
                module.B.normal_(0, 0.5)
                module.lambda_.uniform_(0.5, 3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(dtype):
    model = Tiny().to(dtype)
    reference = copy.deepcopy(model)
    inject_delora(model, ["up", "down"], r=4)
    x = torch.randn(2, 3, 13, dtype=dtype)
    assert torch.equal(model(x), reference(x))


def test_parameter_count_is_r_times_widths_plus_one():
    model = Tiny()  # up: 13 → 29, down: 29 → 7
    inject_delora(model, ["up", "down"], r=3)
    assert count_parameters(model)[0] == (3 * (13 + 29) + 1) + (3 * (29 + 7) + 1)


def test_update_is_the_equation_and_its_norm_is_bounded():
    base = torch.nn.Linear(13, 29)
    layer = DeLoRALinear(base, r=3)
    randomise(layer)
    A, B, lam = layer.A, layer.B, layer.lambda_
    xi = torch.diag(1 / (B.norm(dim=0) * A.norm(dim=1)))
    w = torch.linalg.norm(base.weight, dim=0)
    expected = (lam / 3) * B @ xi @ A @ torch.diag(w)
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(6, 13)
    torch.testing.assert_close(layer(x), base(x) + x @ expected.T)
    for scale in (1.0, 10.0, 1000.0):  # however large B and A grow, ‖ΔW‖ stays under λ · max_j w_j
        with torch.no_grad():
            layer.A.mul_(scale)
            layer.B.mul_(scale)
        assert torch.linalg.norm(layer.delta_weight()) <= bound(layer) * (1 + 1e-5)


def test_gradients_reach_only_a_b_and_lambda():
    model = Tiny()
    inject_delora(model, ["up", "down"], r=2)
    randomise(model)
    model(torch.randn(4, 13)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name.split(".")[-1] in ("A", "B", "lambda_")), name


def test_merge_unmerge_round_trip():
    model = Tiny()
    inject_delora(model, ["up", "down"], r=3)
    randomise(model)
    w = model.up.w.clone()
    assert_merge_round_trip(model, merge_delora, unmerge_delora, torch.randn(6, 13))
    assert torch.equal(model.up.w, w)  # w stays W₀'s, not the merged weight's


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft(dtype, tolerance, tmp_path):
    base = Tiny()
    fresh = copy.deepcopy(base)
    config = DeloraConfig(r=3, delora_lambda=4, target_modules=["up", "down"], rank_pattern={"down": 2})
    theirs = get_peft_model(base, config).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    theirs.save_pretrained(tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    assert (ours.up.r, ours.down.r) == (3, 2)
    x = torch.randn(3, 5, 13)
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        assert relative_error(ours(x.to(dtype)), theirs(x.to(dtype))) <= tolerance


def test_demo_learns_within_the_bound():
    output = run_demo("reference_impls.delora")
    (before, after), *_ = demo_losses(output)
    assert after < 0.1 * before
    assert output.count("≤ bound") == 3
