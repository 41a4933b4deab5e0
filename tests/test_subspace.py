"""OSF, PSOFT and DEFT against their equations, and against HF PEFT in both dtypes and, for OSF's
projected gradients, in one training step (PEFT's checkpoints on a tiny Llama are in test_interop.py)."""

import copy

import pytest
import torch
from peft import DeftConfig, OSFConfig, PsoftConfig, get_peft_model
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.subspace import (
    DEFTLinear,
    OSFLinear,
    PSOFTLinear,
    inject_subspace,
    merge_subspace,
    unmerge_subspace,
)

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    relative_error,
    run_demo,
)

LAYERS = (OSFLinear, PSOFTLinear, DEFTLinear)

CASES = {  # Tiny(): up 13 → 29, down 29 → 7
    "osf": ("osf", {"k": 3}),
    "psoft": ("psoft", {"r": 5}),
    "psoft_neumann_pissa": ("psoft", {"r": 4, "neumann_terms": 6, "neumann_eps": 0.5, "split": "pissa"}),
    "psoft_free": ("psoft", {"r": 4, "orthogonal": False, "scale_in": False}),
    "deft": ("deft", {"r": 3}),
    "deft_qr": ("deft", {"r": 3, "projector": "qr", "alpha": 6.0}),
    "para": ("deft", {"r": 2, "para": True}),
}


def model_for(case, dtype=torch.float32):
    method, options = CASES[case]
    model = Tiny().to(dtype)
    inject_subspace(model, ["up", "down"], method, **options)
    return model


def randomise(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LAYERS):
                for name, parameter in layer.named_parameters(recurse=False):
                    if name in ("alpha", "beta", "S_low"):
                        parameter.uniform_(0.5, 1.5)
                    else:
                        parameter.add_(torch.randn_like(parameter) * 0.3)


@pytest.mark.parametrize("case", [c for c in CASES if c != "para"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(case, dtype):
    plain = Tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_subspace(model, ["up", "down"], CASES[case][0], **CASES[case][1])
    x = torch.randn(2, 5, 13, dtype=dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(model(x), plain(x), **tolerance)


def test_parameter_counts_follow_the_formulas():
    counts = {case: count_parameters(model_for(case))[0] for case in CASES}
    n_up, n_down = 13, 7  # min(d_out, d_in) of up and down
    assert counts["osf"] == (n_up - 3) * (29 + 13 + 1) + (n_down - 3) * (7 + 29 + 1)
    assert counts["psoft"] == 2 * (5 * 4 // 2 + 2 * 5)  # r(r−1)/2 angles and two scalings of r
    assert counts["psoft_free"] == 2 * (4 * 4 + 4)  # a free r × r matrix and one scaling
    assert counts["deft"] == 3 * (29 + 13) + 3 * (7 + 29)  # P (d_out × r) and R (r × d_in)
    assert counts["para"] == 2 * 29 + 2 * 7  # P only


def test_osf_gradients_are_orthogonal_to_the_frozen_directions_and_sgd_keeps_them_untouched():
    torch.manual_seed(0)
    model = model_for("osf")
    randomise(model)
    x = torch.randn(6, 13)
    model(x).pow(2).sum().backward()
    # Zero up to fp32 rounding: over 200 seeds the worst ratio was 2e-6 (unprojected it is of order 1).
    for layer in (model.up, model.down):
        assert (layer.U_high.T @ layer.U_low.grad).abs().max() < 1e-5 * layer.U_low.grad.abs().max()
        assert (layer.V_low.grad @ layer.V_high.T).abs().max() < 1e-5 * layer.V_low.grad.abs().max()
    before = {layer: layer.U_low.detach().clone() for layer in (model.up, model.down)}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    for layer, U_low in before.items():  # the step moved U_l only within the complement of U_h
        step = layer.U_low.detach() - U_low
        assert step.abs().max() > 0 and (layer.U_high.T @ step).abs().max() < 1e-5 * step.abs().max()


def test_psoft_rotates_only_the_principal_subspace():
    torch.manual_seed(4)
    layer = PSOFTLinear(nn.Linear(13, 9), r=4, scale_in=False, scale_out=False)
    with torch.no_grad():
        layer.Q.normal_(0, 0.5)
    W0 = layer.base.weight.detach()
    U, S, Vh = torch.linalg.svd(W0)
    delta = layer.delta_weight().detach()
    torch.testing.assert_close(delta, U[:, :4] * S[:4] @ (layer.rotation().detach() - torch.eye(4)) @ Vh[:4])
    outside = torch.eye(9) - U[:, :4] @ U[:, :4].T
    assert (outside @ delta).abs().max() < 1e-5  # nothing outside the top-r directions changes
    torch.testing.assert_close(torch.linalg.svdvals(W0 + delta), S, rtol=1e-5, atol=1e-5)  # a rotation keeps them


def test_deft_equation_and_its_orthogonal_projector():
    torch.manual_seed(5)
    for projector in ("relu", "qr"):
        layer = DEFTLinear(nn.Linear(11, 9), r=3, projector=projector, alpha=6.0)
        randomise(layer)
        P_tilde, T = (t.detach() for t in layer.projection())
        W0 = layer.base.weight.detach()
        expected = (torch.eye(9) - P_tilde @ T.T) @ W0 + 2.0 * P_tilde @ layer.R.detach()
        torch.testing.assert_close(W0 + layer.delta_weight().detach(), expected)
    projection = P_tilde @ T.T  # qr: an orthogonal projection
    torch.testing.assert_close(projection @ projection, projection)
    torch.testing.assert_close(projection, projection.T)


def test_para_reduces_the_rank():
    layer = DEFTLinear(nn.Linear(11, 9), r=2, projector="qr", para=True)
    W = (layer.base.weight + layer.delta_weight()).detach()
    assert torch.linalg.matrix_rank(W) == 9 - 2


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_only_the_method_s_parameters(case):
    model = model_for(case)
    randomise(model)
    model(torch.randn(3, 13)).pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        is_adapter = ".base." not in name
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_round_trip(case):
    model = model_for(case)
    randomise(model)
    assert_merge_round_trip(model, merge_subspace, unmerge_subspace, torch.randn(4, 13), rtol=1e-4, atol=1e-5)


CONFIGS = {
    "osf": OSFConfig(effective_rank=3, target_modules=["up", "down"]),
    "psoft": PsoftConfig(r=4, target_modules=["up", "down"]),
    "deft_qr": DeftConfig(r=3, decomposition_method="qr", target_modules=["up", "down"]),
}


def peft_pair(config, tmp_path):
    return peft_and_ours(Tiny, config, tmp_path, positive=("vector", "S_low"))


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_pair(CONFIGS[case], tmp_path)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)


def test_one_osf_training_step_equals_peft_s(tmp_path):
    """PEFT projects OSF's gradients with hooks as we do: one SGD step moves both models alike."""
    peft_model, ours = peft_pair(CONFIGS["osf"], tmp_path)
    for parameter in ours.parameters():
        parameter.requires_grad_(False)
    for layer in (ours.up, ours.down):
        for parameter in layer.parameters(recurse=False):
            parameter.requires_grad_(True)
    x = torch.randn(8, 13)
    for model in (peft_model, ours):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(x).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        assert relative_error(ours(x), peft_model(x)) <= 1e-5
        theirs = peft_model.base_model.model.up.osf_svd_params["default"]["U_low"]
        assert relative_error(ours.up.U_low, theirs) <= 1e-5


def test_a_randomised_svd_is_refused(tmp_path):
    config = PsoftConfig(r=4, psoft_svd="lowrank", target_modules=["up"])
    get_peft_model(Tiny(), config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedAdapter, match="psoft_svd = 'lowrank'"):
        load_peft_adapter(Tiny(), tmp_path)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.subspace"))
    assert len(losses) == 3 and all(after < 0.6 * before for before, after in losses)
