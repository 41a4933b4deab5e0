"""FRoD against its equations and HF PEFT: the joint basis, the decomposition W₀ = U Λ₀ Vᵀ, full-rank
updates from few numbers, and PEFT's outputs in both dtypes."""

import copy

import pytest
import torch
from peft import FrodConfig, get_peft_model
from peft.tuners.frod.model import _projection_from_weights
from test_interop import tiny_llama
from test_lora import Tiny

from reference_impls._plumbing import count_parameters
from reference_impls.frod import FRoDLinear, inject_frod, joint_basis, layer_role, merge_frod, unmerge_frod
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    relative_error,
    run_demo,
)


def randomise(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, FRoDLinear):
                layer.lambda_.mul_(torch.empty_like(layer.lambda_).uniform_(0.5, 1.5))
                layer.s.normal_(0, 0.3)


def test_roles_group_the_same_layer_of_every_block():
    assert layer_role("model.layers.3.self_attn.q_proj") == "self_attn_q_proj"
    assert layer_role("encoder.layer.0.attention.output.dense") == "attention_output"
    assert layer_role("encoder.layer.0.output.dense") == "output_dense"
    assert layer_role("transformer.h.1.attn.c_attn") == "attn_c_attn"
    assert layer_role("layers.2.5") == "5" and layer_role("up") == "up"


@pytest.mark.parametrize("shapes", [[(7, 13), (5, 13)], [(20, 9), (31, 9), (9, 9)]], ids=["wide", "tall"])
def test_joint_basis_is_peft_s(shapes):
    weights = [torch.randn(*shape) for shape in shapes]
    torch.testing.assert_close(joint_basis(weights, 1e-3), _projection_from_weights(weights, 1e-3))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_frozen_weight_is_u_lambda_v_and_the_model_starts_as_the_base(dtype, tolerance):
    plain = Tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_frod(model, ["up", "down"], sparse_rate=0.05)
    for layer in (model.up, model.down):
        assert relative_error(layer.weight(), layer.base.weight) <= tolerance
        torch.testing.assert_close(layer.U.float().norm(dim=0), torch.ones(layer.U.shape[1]), rtol=tolerance, atol=0)
    x = torch.randn(3, 4, 13, dtype=dtype)
    with torch.no_grad():
        assert relative_error(model(x), plain(x)) <= tolerance


def test_parameter_count_and_positions():
    model = Tiny()  # up: d_in 13, down: d_in 29
    inject_frod(model, ["up", "down"], sparse_rate=0.03)
    nnz = {"up": int(13 * 13 * 0.03), "down": int(29 * 29 * 0.03)}
    assert count_parameters(model)[0] == 13 + nnz["up"] + 29 + nnz["down"]
    for name, layer in (("up", model.up), ("down", model.down)):
        rows, cols = layer.positions
        assert layer.positions.shape[1] == nnz[name] and bool((rows != cols).all())
        assert len(set(zip(rows.tolist(), cols.tolist()))) == nnz[name]
    tiny = Tiny()
    inject_frod(tiny, ["up"], sparse_rate=0.001)
    assert tiny.up.s.numel() == 1  # at least one rotational degree


def test_a_role_shares_one_basis_and_one_set_of_positions():
    model = tiny_llama()
    inject_frod(model, ["q_proj", "down_proj"], sparse_rate=0.02)
    first, second = (model.model.layers[i].self_attn.q_proj for i in (0, 1))
    assert torch.equal(first.V, second.V) and torch.equal(first.positions, second.positions)
    assert not torch.equal(first.U, second.U)  # each layer its own U and λ
    assert model.model.layers[0].mlp.down_proj.V.shape == (44, 44)


def test_few_numbers_give_a_full_rank_update():
    model = Tiny(d_in=40, d_hidden=48)
    inject_frod(model, ["up"], sparse_rate=0.02)
    randomise(model)
    update = (model.up.weight() - model.up.base.weight).detach()
    assert torch.linalg.matrix_rank(update) == min(update.shape)
    assert model.up.s.numel() + model.up.lambda_.numel() < update.numel() / 20


def test_gradients_reach_only_lambda_and_s():
    model = Tiny()
    inject_frod(model, ["up", "down"], sparse_rate=0.05)
    randomise(model)
    model(torch.randn(3, 13)).pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        is_adapter = name.endswith(("lambda_", ".s"))
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == is_adapter, name


def test_merge_unmerge_round_trip():
    model = Tiny()
    inject_frod(model, ["up", "down"], sparse_rate=0.05)
    randomise(model)
    assert_merge_round_trip(model, merge_frod, unmerge_frod, torch.randn(4, 13), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes_with_peft_s_basis(dtype, tolerance, tmp_path):
    base = Tiny()
    fresh, ours_injected = copy.deepcopy(base), copy.deepcopy(base)
    peft_model = get_peft_model(base, FrodConfig(sparse_rate=0.05, target_modules=["up", "down"], progressbar=False))
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    inject_frod(ours_injected, ["up", "down"])  # our own basis for the same weights is PEFT's
    torch.testing.assert_close(ours_injected.up.V, peft_model.base_model.frod_V["up"]["default"])
    ours = load_peft_adapter(fresh, tmp_path)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)


def test_a_checkpoint_without_its_bases_is_refused(tmp_path):
    config = FrodConfig(target_modules=["up"], save_projection=False, progressbar=False)
    get_peft_model(Tiny(), config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedAdapter, match="save_projection=False"):
        load_peft_adapter(Tiny(), tmp_path)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.frod"))
    assert len(losses) == 2 and all(after < 0.7 * before for before, after in losses)
