"""MiSS and GraLoRA against their equations and parameter counts, and HF PEFT in both dtypes
(tiny-Llama checkpoints, training-mode dropout included, are in test_interop.py)."""

import copy

import pytest
import torch
from peft import GraloraConfig, MissConfig, PeanutConfig
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.structured import (
    GraLoRALinear,
    MiSSLinear,
    PEANuTLinear,
    inject_structured,
    merge_structured,
    unmerge_structured,
)

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    run_demo,
)

CASES = {  # Tiny(d_in=12, d_hidden=36, d_out=8)
    "miss": ("miss", {"r": 5}),  # 12 = 2·5 + 2 and 36 = 7·5 + 1: padded shards
    "miss_mini": ("miss", {"r": 4, "variant": "mini", "mini_r": 4}),
    "miss_bat": ("miss", {"r": 4, "variant": "bat"}),
    "gralora": ("gralora", {"r": 4, "alpha": 8.0, "k": 2}),
    "gralora_hybrid": ("gralora", {"r": 4, "alpha": 8.0, "k": 4, "hybrid_r": 3}),
    "peanut": ("peanut", {"r": 3, "depth": 2, "activation": "gelu", "scale": 0.5}),
}


def tiny():
    return Tiny(d_in=12, d_hidden=36, d_out=8)


def model_for(case):
    model = tiny()
    inject_structured(model, ["up", "down"], CASES[case][0], **CASES[case][1])
    return model


def randomise(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (MiSSLinear, GraLoRALinear, PEANuTLinear)):
                for name, parameter in layer.named_parameters():
                    if not name.startswith("base."):
                        parameter.normal_(0, 0.3)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(case, dtype):
    plain = tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_structured(model, ["up", "down"], CASES[case][0], **CASES[case][1])
    x = torch.randn(2, 3, 12, dtype=dtype)
    assert torch.equal(model(x), plain(x))


def test_parameter_counts_follow_the_formulas():
    counts = {case: count_parameters(model_for(case))[0] for case in CASES}
    assert counts["miss"] == 5 * 36 + 5 * 8  # r · d_out
    assert counts["miss_mini"] == 2 * 4 * 4  # r · m
    assert counts["miss_bat"] == 36 * 4 + 8 * 4  # d_out/r blocks of r × r
    assert counts["gralora"] == 4 * (12 + 36) + 4 * (36 + 8)  # LoRA's r (d_in + d_out)
    assert counts["gralora_hybrid"] == counts["gralora"] + 3 * (12 + 36) + 3 * (36 + 8)
    assert counts["peanut"] == (2 * 3 * 36 + 2 * 2 * 9) + (2 * 3 * 8 + 2 * 2 * 9)  # 2 r d_out + 2 L r²


def test_miss_shares_one_matrix_across_the_input_shards():
    layer = MiSSLinear(nn.Linear(12, 6), r=5)
    randomise(layer)
    delta = layer.delta_weight().detach()
    for j in range(12):
        torch.testing.assert_close(delta[:, j], layer.D[j % 5].detach())
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.T)


def test_miss_bat_depends_on_the_weight_block_by_block():
    layer = MiSSLinear(nn.Linear(8, 8), r=4, variant="bat")
    randomise(layer)
    W, D = layer.base.weight.detach(), layer.D.detach()
    delta = layer.delta_weight().detach()
    for i in range(2):
        for j in range(2):
            block = W[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            torch.testing.assert_close(delta[4 * i : 4 * i + 4, 4 * j : 4 * j + 4], block @ D[i] + D[i])


def test_gralora_blocks_are_independent_low_rank_updates():
    torch.manual_seed(1)
    layer = GraLoRALinear(nn.Linear(12, 8), r=4, alpha=8.0, k=2)
    randomise(layer)
    delta = layer.delta_weight().detach()
    for m in range(2):
        for n in range(2):
            block = 2.0 * layer.B[m, n].detach() @ layer.A[m, n].detach()
            torch.testing.assert_close(delta[4 * m : 4 * m + 4, 6 * n : 6 * n + 6], block)
            assert torch.linalg.matrix_rank(block) <= 2  # rank r/k
    assert torch.linalg.matrix_rank(delta) > 4 - 1  # up to k r overall
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.T)


def test_peanut_computes_its_update_from_the_frozen_weight():
    torch.manual_seed(2)
    layer = PEANuTLinear(nn.Linear(10, 6), r=3, depth=1, activation="relu", scale=2.0)
    randomise(layer)
    W0 = layer.base.weight.detach()
    A, B = layer.A.weight.detach(), layer.B.weight.detach()
    E, D = layer.encoders[0].weight.detach(), layer.decoders[0].weight.detach()
    z0 = torch.relu(W0.T @ A.T)
    z1 = torch.relu(z0 @ E.T)
    y0 = torch.relu(z1 @ D.T) + z0
    torch.testing.assert_close(layer.delta_weight().detach(), 2.0 * (y0 @ B.T).T)
    with torch.no_grad():
        layer.base.weight.mul_(2.0)
    assert not torch.allclose(layer.delta_weight().detach(), 2.0 * (y0 @ B.T).T)  # a function of W₀


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_only_the_method_s_parameters(case):
    model = model_for(case)
    randomise(model)
    model(torch.randn(3, 12)).pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        is_adapter = ".base." not in name
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_round_trip(case):
    model = model_for(case)
    randomise(model)
    assert_merge_round_trip(model, merge_structured, unmerge_structured, torch.randn(4, 12))


CONFIGS = {
    "miss": MissConfig(r=5, target_modules=["up", "down"]),
    "miss_bat": MissConfig(r=4, init_weights="bat", target_modules=["up", "down"]),
    "gralora_hybrid": GraloraConfig(r=4, alpha=8, gralora_k=4, hybrid_r=2, target_modules=["up", "down"]),
    "peanut": PeanutConfig(r=3, depth=1, target_modules=["up", "down"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_and_ours(tiny, CONFIGS[case], tmp_path)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 12), dtype, tolerance)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.structured"))
    assert len(losses) == 4 and all(after < 0.6 * before for before, after in losses)
