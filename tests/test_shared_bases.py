"""PVeRA and VB-LoRA against their equations, and HF PEFT in both dtypes (tiny-Llama checkpoints,
training-mode sampling and VB-LoRA's top-k form are in test_interop.py)."""

import copy

import pytest
import torch
from peft import PveraConfig, RandLoraConfig, VBLoRAConfig
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.shared_bases import (
    PVeRALinear,
    RandLoRALinear,
    VBLoRALinear,
    inject_pvera,
    inject_randlora,
    inject_vblora,
    merge_shared,
    unmerge_shared,
)

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    run_demo,
)


def tiny():
    return Tiny(d_in=12, d_hidden=36, d_out=8)  # widths divisible by VB-LoRA's vectors of 4


def randomise(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (PVeRALinear, VBLoRALinear, RandLoRALinear)):
                for parameter in layer.parameters(recurse=False):
                    parameter.normal_(0, 0.5)


@pytest.mark.parametrize("method", ["pvera", "vblora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation_for_pvera_and_a_small_start_for_vblora(method, dtype):
    plain = tiny().to(dtype)
    model = copy.deepcopy(plain)
    if method == "pvera":
        inject_pvera(model, ["up", "down"], r=6)
        model.to(dtype)
        x = torch.randn(2, 3, 12, dtype=dtype)
        assert torch.equal(model.eval()(x), plain(x)) and torch.equal(model.train()(x), plain(x))  # Λ_b = 0
    else:
        inject_vblora(model, ["up", "down"], r=2, n=16, length=4)
        assert model.up.delta_weight().abs().max() < 0.05  # a bank drawn in ±0.02: small, not zero (as in PEFT)


def test_parameter_counts_follow_the_formulas():
    model = tiny()
    inject_pvera(model, ["up", "down"], r=6)
    assert count_parameters(model)[0] == (2 * 6 + 36) + (2 * 6 + 8)  # Λ_d (2r) and Λ_b (d_out) per layer
    model = tiny()
    inject_vblora(model, ["up", "down"], r=2, n=16, length=4)
    logits = 16 * (2 * 12 // 4 + 36 // 4 * 2) + 16 * (2 * 36 // 4 + 8 // 4 * 2)  # N per piece of A and of B
    assert count_parameters(model)[0] == 16 * 4 + logits  # one bank for the model
    assert model.up.bank is model.down.bank


def test_pvera_samples_in_training_and_uses_its_mean_in_evaluation():
    model = tiny()
    inject_pvera(model, ["up"], r=6)
    randomise(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        model.eval()
        mean = model(x)
        torch.testing.assert_close(mean, model.down(model.act(model.up.base(x) + x @ model.up.delta_weight().T)))
        model.train()
        first, second = model(x), model(x)
        assert not torch.allclose(first, second) and not torch.allclose(first, mean)
        model.eval()
        model.up.sample_at_inference = True
        assert not torch.allclose(model(x), mean)


def test_vblora_pieces_are_top_k_mixtures_of_the_bank():
    torch.manual_seed(3)
    model = tiny()
    inject_vblora(model, ["up"], r=2, n=16, length=4, k=3)
    layer = model.up
    A, B = (t.detach() for t in layer.factors())
    bank = layer.bank.vectors.detach()
    logits = layer.logits_A.detach()[1, 2]  # the third piece of A's second row
    top = logits.topk(3)
    expected = (top.values.softmax(0)[:, None] * bank[top.indices]).sum(0)
    torch.testing.assert_close(A[1, 8:12], expected)
    logits = layer.logits_B.detach()[5, 1]  # rows 20…23 of B's second column
    top = logits.topk(3)
    torch.testing.assert_close(B[20:24, 1], (top.values.softmax(0)[:, None] * bank[top.indices]).sum(0))


def inject(model, method):
    if method == "pvera":
        inject_pvera(model, ["up", "down"], r=6)
    elif method == "vblora":
        inject_vblora(model, ["up", "down"], r=2, n=16, length=4)
    else:
        inject_randlora(model, ["up", "down"], r=5, alpha=10.0)


@pytest.mark.parametrize("method", ["pvera", "vblora", "randlora"])
def test_gradients_reach_only_the_trained_tensors(method):
    model = tiny()
    inject(model, method)
    randomise(model)
    model.eval()(torch.randn(3, 12)).pow(2).sum().backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {name for name, p in model.named_parameters() if ".base." not in name}
    assert trained == expected


@pytest.mark.parametrize("method", ["pvera", "vblora", "randlora"])
def test_merge_unmerge_round_trip(method):
    model = tiny()
    inject(model, method)
    randomise(model)
    assert_merge_round_trip(model.eval(), merge_shared, unmerge_shared, torch.randn(4, 12))


def test_randlora_is_a_sum_of_scaled_random_bases_of_full_rank():
    torch.manual_seed(5)
    model = tiny()
    inject_randlora(model, ["up", "down"], r=5, alpha=10.0)
    randomise(model)
    up, down = model.up, model.down  # up: 12 → 36 (d_min = d_in), down: 36 → 8 (transposed)
    assert (up.n, down.n) == (3, 2) and not up.transposed and down.transposed
    assert count_parameters(model)[0] == 3 * (5 + 12) + 2 * (5 + 8)  # n (r + d_min) per layer
    for layer, d_min, d_max in ((up, 12, 36), (down, 8, 36)):
        A, B = layer.bases.A[:, :d_min], layer.bases.B[:, :d_max]
        expected = sum(B[j] @ torch.diag(layer.lambda_[j]) @ A @ torch.diag(layer.gamma[j]) for j in range(layer.n))
        expected = 2.0 * (expected.T if layer.transposed else expected)
        torch.testing.assert_close(layer.delta_weight(), expected)
        assert torch.linalg.matrix_rank(layer.delta_weight().detach()) == d_min  # full rank from few numbers
    assert up.bases is down.bases


CONFIGS = {
    "pvera": PveraConfig(r=4, target_modules=["up", "down"]),
    "vblora": VBLoRAConfig(r=2, num_vectors=16, vector_length=4, target_modules=["up", "down"]),
    "randlora": RandLoraConfig(r=5, randlora_alpha=10, target_modules=["up", "down"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_and_ours(tiny, CONFIGS[case], tmp_path, std=0.5)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 12), dtype, tolerance)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.shared_bases"))
    assert len(losses) == 3 and all(after < 0.6 * before for before, after in losses)


def test_a_bank_vector_length_that_does_not_divide_is_named():
    with pytest.raises(ValueError, match="vector length 5 must divide d_in = 12"):
        inject_vblora(nn.Sequential(nn.Linear(12, 10)), ["0"], n=4, length=5)
