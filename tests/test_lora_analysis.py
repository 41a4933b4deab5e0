"""Intruder dimensions against their definition (a constructed update that brings in a new direction)
and the mitigation against HF PEFT's reduce_intruder_dimension."""

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.intruders import reduce_intruder_dimension
from test_lora import Tiny
from torch import nn

from reference_impls.lora import LoRALinear
from reference_impls.lora_analysis import intruder_dimensions, reduce_intruder_dimensions, reduce_intruders

from helpers import peft_and_ours, relative_error, run_demo


def test_a_new_strong_direction_is_an_intruder_and_a_faint_one_is_not():
    W0 = torch.diag(torch.arange(6.0, 0.0, -1.0))  # its singular vectors: the axes
    u = torch.ones(6) / 6**0.5  # |cos| with every axis: 0.41
    assert intruder_dimensions(W0, W0 + 20 * torch.outer(u, u)) == [0]  # the new top direction
    assert intruder_dimensions(W0, W0 + 0.01 * torch.outer(u, u)) == []
    assert intruder_dimensions(W0, W0 + 20 * torch.outer(u, u), epsilon=0.4) == []  # 0.41 is not below 0.4


def test_mitigation_scales_the_intruders_and_keeps_the_rank():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), r=2, alpha=2)
    with torch.no_grad():
        layer.A.normal_(0, 3), layer.B.normal_(0, 3)
    W0 = layer.base.weight.detach().clone()
    W = W0 + layer.delta_weight().detach()
    intruders = intruder_dimensions(W0, W)
    assert intruders and reduce_intruders(layer, lam=0.0) == len(intruders)
    U, S, Vh = torch.linalg.svd(W)
    removed = W - (U[:, intruders] * S[intruders]) @ Vh[intruders]  # λ = 0: the intruders gone
    expected = torch.linalg.svd(removed - W0)
    best = (expected.U[:, :2] * expected.S[:2]) @ expected.Vh[:2]
    torch.testing.assert_close(layer.delta_weight().detach(), best, rtol=1e-4, atol=1e-4)
    untouched = LoRALinear(nn.Linear(12, 10), r=2)  # B = 0: no update, no intruder
    assert reduce_intruders(untouched) == 0 and not untouched.B.any()


@pytest.mark.parametrize("lam", [0.75, 0.3])
def test_equals_peft_s_reduce_intruder_dimension(lam, tmp_path):
    config = LoraConfig(r=3, lora_alpha=3, target_modules=["up", "down"])
    theirs, ours = peft_and_ours(Tiny, config, tmp_path, std=2.0)  # large factors: intruders appear
    reduce_intruder_dimension(theirs, top_k=10, threshold_epsilon=0.5, mitigation_lambda=lam, logging_sink=None)
    found = reduce_intruder_dimensions(ours, top_k=10, epsilon=0.5, lam=lam)
    assert sum(found.values()) > 0
    for name in ("up", "down"):
        their = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(ours.get_submodule(name).B, their.lora_B["intruder_reduced"].weight)
        torch.testing.assert_close(ours.get_submodule(name).A, their.lora_A["intruder_reduced"].weight)
    x = torch.randn(4, 5, 13)
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= 1e-5


def test_demo_trades_the_task_for_less_drift():
    output = run_demo("reference_impls.lora_analysis")
    task, drift = output.split("new task loss ")[1].split(", change from the pre-trained outputs ")
    (task_before, task_after), (drift_before, drift_after) = (
        [float(v) for v in part.split(" → ")] for part in (task, drift.strip())
    )
    assert task_after > task_before and drift_after < drift_before
