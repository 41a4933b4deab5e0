"""LoRA+, Riemannian preconditioning and LoRA-FA against their definitions (B's learning rate λ
times A's; the r × r preconditioners; A frozen and B's projected gradient) and against HF PEFT's
create_loraplus_optimizer, create_riemannian_optimizer and create_lorafa_optimizer: the same steps
on the same gradients, for LoRA, LoRA with a bias on B and DoRA where PEFT allows them."""

import pytest
import torch
from peft import LoraConfig
from peft.optimizers import create_lorafa_optimizer as peft_lorafa
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from peft.optimizers import create_riemannian_optimizer as peft_riemannian
from test_lora import Tiny

from reference_impls.lora import inject_lora
from reference_impls.lora_optim import (
    create_lorafa_optimizer,
    create_loraplus_optimizer,
    create_riemannian_optimizer,
    loraplus_groups,
    precondition,
)

from helpers import demo_losses, peft_and_ours, relative_error, run_demo


def test_b_and_trained_vectors_get_lambda_times_the_learning_rate_and_biases_no_decay():
    model = Tiny()
    inject_lora(model, ["up", "down"], r=2, bias=True)
    groups = loraplus_groups(model, lr=1e-3, ratio=8.0, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    by_group = [sorted(names[id(p)] for p in group["params"]) for group in groups]
    assert by_group == [["down.A", "up.A"], ["down.B", "up.B"], ["down.B_bias", "up.B_bias"]]
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (8e-3, 0.1), (8e-3, 0.0)]


def test_one_step_moves_b_lambda_times_further_with_sgd():
    torch.manual_seed(0)
    model = Tiny()
    inject_lora(model, ["up"], r=2)
    with torch.no_grad():
        model.up.B.normal_()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, ratio=5.0)
    model(torch.randn(4, 13)).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    torch.testing.assert_close(model.up.A.detach(), before["up.A"] - 0.1 * grads["up.A"])
    torch.testing.assert_close(model.up.B.detach(), before["up.B"] - 0.5 * grads["up.B"])


CONFIGS = {
    "lora": LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"]),
    "lora_bias": LoraConfig(r=3, lora_alpha=6, lora_bias=True, target_modules=["up", "down"]),
    "dora": LoraConfig(r=3, lora_alpha=6, use_dora=True, target_modules=["up", "down"]),
}


def trained_alike(theirs, ours):
    """Ours comes back from the checkpoint frozen: train what PEFT trains."""
    theirs.train(), ours.train()
    for name, parameter in theirs.named_parameters():
        if parameter.requires_grad:
            path = name.removeprefix("base_model.model.").split(".lora_")[0]
            for own in ours.get_submodule(path).parameters(recurse=False):
                own.requires_grad_(True)


def steps_agree(theirs, ours, peft_optimizer, our_optimizer, steps=3, tolerance=1e-5):
    x, y = torch.randn(8, 13), torch.randn(8, 7)
    with torch.no_grad():
        start = ours(x)
    for _ in range(steps):
        for model, optimizer in ((theirs, peft_optimizer), (ours, our_optimizer)):
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            optimizer.step()
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= tolerance
        assert relative_error(ours(x), start) > 1e-3  # the steps moved the model


def test_the_preconditioners_are_the_inverse_gram_matrices_of_the_other_factor():
    torch.manual_seed(1)
    A, B = torch.nn.Parameter(torch.randn(3, 10)), torch.nn.Parameter(torch.randn(8, 3))
    A.grad, B.grad = torch.randn(3, 10), torch.randn(8, 3)
    expected_A = torch.linalg.inv(B.detach().T @ B.detach() + 0.1 * torch.eye(3)) @ A.grad
    expected_B = B.grad @ torch.linalg.inv(A.detach() @ A.detach().T + 0.1 * torch.eye(3))
    precondition([(A, B)], damping=0.1)
    torch.testing.assert_close(A.grad, expected_A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(B.grad, expected_B, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="has none"):
        create_riemannian_optimizer(Tiny())


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("case", ["lora", "dora"])
def test_riemannian_steps_equal_peft_s(case, optimizer_cls, tmp_path):
    theirs, ours = peft_and_ours(Tiny, CONFIGS[case], tmp_path)
    trained_alike(theirs, ours)
    lr = 0.05 if optimizer_cls is torch.optim.SGD else 1e-2
    mine = create_riemannian_optimizer(ours, optimizer_cls, lr=lr, damping=1e-2)
    peft = peft_riemannian(theirs, optimizer_cls, lr=lr, reg=1e-2)
    steps_agree(theirs, ours, peft, mine)


def test_lorafa_freezes_a_and_projects_b_s_gradient():
    torch.manual_seed(2)
    model = Tiny()
    inject_lora(model, ["up"], r=2, alpha=4)
    optimizer = create_lorafa_optimizer(model, lr=0.1)
    assert not model.up.A.requires_grad and model.up.B.requires_grad
    model(torch.randn(6, 13)).pow(2).sum().backward()
    A, grad = model.up.A.detach(), model.up.B.grad.clone()
    projected = grad @ torch.linalg.inv(A @ A.T + 1e-8 * torch.eye(2)) / 2.0**2
    B = model.up.B.detach().clone()
    optimizer.step()  # Adam's first step: lr · √(1−β₂) g / (√(1−β₂) |g| + ε), with g the projected gradient
    root = (1 - 0.999) ** 0.5
    expected = B - 0.1 * root * projected / (root * projected.abs() + 1e-6)
    torch.testing.assert_close(model.up.B.detach(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("peft_in_bf16", [False, True])
def test_lorafa_steps_equal_peft_s(peft_in_bf16, tmp_path, monkeypatch):
    """PEFT computes the projection under bfloat16 autocast wherever bfloat16 is available: with that
    turned off the steps agree to fp32 rounding, with it (PEFT's default on a CPU) to bfloat16's."""
    import peft.optimizers.lorafa as lorafa

    if not peft_in_bf16:
        monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    theirs, ours = peft_and_ours(Tiny, CONFIGS["lora"], tmp_path)
    trained_alike(theirs, ours)
    mine = create_lorafa_optimizer(ours, lr=1e-2, weight_decay=0.05)
    peft = peft_lorafa(theirs, r=3, lora_alpha=6, lr=1e-2, weight_decay=0.05)
    steps_agree(theirs, ours, peft, mine, tolerance=3e-2 if peft_in_bf16 else 1e-5)


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_steps_equal_peft_s_loraplus(config, tmp_path):
    theirs, ours = peft_and_ours(Tiny, config, tmp_path)
    trained_alike(theirs, ours)
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-2, ratio=16.0, weight_decay=0.05)
    peft = peft_loraplus(theirs, torch.optim.AdamW, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.05, lr=1e-2)
    steps_agree(theirs, ours, peft, mine)


def test_demo_shows_lora_plus_ahead_after_the_same_steps():
    (plain, plus, riemannian, lorafa) = demo_losses(run_demo("reference_impls.lora_optim"))
    assert plus[1] < plain[1] < plain[0] and riemannian[1] < riemannian[0] and lorafa[1] < lorafa[0]
