"""VeLoRA and GaLore against their definitions (the sub-token projection and its reconstruction, the
gradient's rank-r subspace) and their oracles: PEFT's `VeloraConfig` (the same gradients on the same
batches, its checkpoints) and the `galore-torch` package's GaLoreAdamW (the same weights after the
same steps)."""

import copy

import pytest
import torch
from galore_torch import GaLoreAdamW as PackageGaLoreAdamW
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import VeloraConfig
from test_interop import save_with_nonzero_weights, tiny_llama
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import load_peft_adapter
from reference_impls.low_memory import (
    CompressedInputLinear,
    GaLoreAdamW,
    VeLoRALinear,
    galore_groups,
    inject_velora,
    optimiser_state_numbers,
    sub_tokens,
)

from helpers import demo_losses, relative_error, run_demo

# ---- VeLoRA -------------------------------------------------------------------------------------


def velora_pair(init, groups=4, scale=1.5, dtype=torch.float32):
    """PEFT's VeLoRA model and ours on the same Tiny model, with the same non-zero A and B."""
    torch.manual_seed(0)
    base = Tiny().to(dtype)
    ours = copy.deepcopy(base)
    config = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["up", "down"],
        velora_config=VeloraConfig(num_groups=groups, scale=scale, init_type=init),
    )
    theirs = get_peft_model(base, config)
    inject_velora(ours, ["up", "down"], r=3, alpha=6, groups=groups, rebuild_scale=scale, init=init)
    with torch.no_grad():
        for name in ("up", "down"):
            their, layer = theirs.base_model.model.get_submodule(name), ours.get_submodule(name)
            their.lora_B["default"].weight.normal_()
            layer.A.copy_(their.lora_A["default"].weight)
            layer.B.copy_(their.lora_B["default"].weight)
            if init == "random":  # PEFT draws it from the global generator
                layer.v.copy_(their.lora_velora_embed["default"])
    return ours.train(), theirs.train()


def gradients(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    model(x).pow(2).sum().backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {name.rsplit(".", 2)[-2] if "lora_" in name else name: g for name, g in named.items()}, x.grad


@pytest.mark.parametrize("init", ["batch_average_once", "batch_average", "random"])
def test_velora_s_gradients_are_peft_s_batch_after_batch(init):
    ours, theirs = velora_pair(init)
    for step in range(3):  # the projection is computed once, every batch, or never
        x = torch.randn(2, 5, 13) + step
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x))  # LoRA's forward
        ours_grads, ours_x = gradients(ours, x)
        their_grads, their_x = gradients(theirs, x)
        torch.testing.assert_close(ours_x, their_x)  # the gradient to earlier layers is exact
        for name in ("up", "down"):
            layer, their = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(layer.v, their.lora_velora_embed["default"])
            assert relative_error(layer.A.grad, their.lora_A["default"].weight.grad) <= 1e-5
            assert relative_error(layer.B.grad, their.lora_B["default"].weight.grad) <= 1e-5


def test_velora_in_bf16_is_peft_s():
    ours, theirs = velora_pair("batch_average", dtype=torch.bfloat16)
    x = torch.randn(4, 13, dtype=torch.bfloat16)
    gradients(ours, x), gradients(theirs, x)
    for name in ("up", "down"):
        layer, their = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert relative_error(layer.A.grad, their.lora_A["default"].weight.grad) <= 2e-2


def test_the_gradient_of_a_is_exact_when_the_sub_tokens_lie_on_the_projection():
    """x̂ = λ ⟨x_k, v⟩ v equals x_k when every sub-token is a multiple of v and λ = 1."""
    layer = VeLoRALinear(nn.Linear(12, 5), r=2, groups=3, init="batch_average_once").train()
    with torch.no_grad():
        layer.B.normal_()
    v = torch.randn(4)
    x = (torch.randn(6, 3, 1) * v).reshape(6, 12)  # each token: three multiples of one vector
    layer(x).sum().backward()
    exact = nn.functional.linear(x, layer.base.weight, layer.base.bias) + layer.scale * (x @ layer.A.T) @ layer.B.T
    expected_grad = torch.autograd.grad(exact.sum(), layer.A)[0]
    torch.testing.assert_close(layer.A.grad, expected_grad, rtol=1e-4, atol=1e-5)
    general = torch.randn(6, 12)  # otherwise it is an approximation
    layer.A.grad = None
    layer(general).sum().backward()
    true = torch.autograd.grad(
        (nn.functional.linear(general, layer.base.weight) + layer.scale * general @ layer.A.T @ layer.B.T).sum(),
        layer.A,
    )[0]
    assert not torch.allclose(layer.A.grad, true, atol=1e-3)


def test_velora_keeps_one_number_per_sub_token():
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    x, A, v = torch.randn(7, 13), torch.randn(3, 13, requires_grad=True), torch.ones(4) / 2
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CompressedInputLinear.apply(x, A, v, 4, 1.0)
    assert (7, 4) in saved and (7, 13) not in saved  # c (tokens × G), never x
    assert sub_tokens(x, 4).shape == (7, 4, 4)  # 13 features → 4 sub-tokens of 4, the last padded


def test_velora_counts_as_lora_and_evaluates_as_lora():
    model = Tiny()
    inject_velora(model, ["up", "down"], r=3, groups=4)
    assert count_parameters(model)[0] == 3 * (13 + 29) + 3 * (29 + 7)
    model(torch.randn(2, 13)).sum().backward()
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.grad is not None} == {"A", "B"}
    with pytest.raises(ValueError, match="VeLoRA needs init"):
        VeLoRALinear(nn.Linear(4, 4), init="sometimes")


def test_a_velora_checkpoint_loads_and_trains_on_as_peft(tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], velora_config=VeloraConfig(num_groups=8)
    )
    theirs, fresh = save_with_nonzero_weights(tiny_llama, config, tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5
    ours.train(), theirs.train()
    for name, parameter in ours.named_parameters():  # loaded for inference: train A and B again
        parameter.requires_grad_(name.endswith((".A", ".B")))
    ours(input_ids=ids, labels=ids).loss.backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    layer = ours.model.layers[0].self_attn.q_proj
    their = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, VeLoRALinear)
    assert relative_error(layer.A.grad, their.lora_A["default"].weight.grad) <= 1e-5


# ---- GaLore -------------------------------------------------------------------------------------


class Wide(nn.Module):
    """A wide (12 × 30), a tall (30 × 12) matrix and vectors: both projections and plain AdamW."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(30, 12), nn.Linear(12, 30)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_galore_steps_are_the_package_s(dtype):
    torch.manual_seed(1)
    ours = Wide().to(dtype)
    theirs = copy.deepcopy(ours)
    options = {"lr": 1e-2, "weight_decay": 0.1}
    mine = GaLoreAdamW(galore_groups(ours, rank=3, update_gap=2, scale=0.5), **options)
    groups = galore_groups(theirs, rank=3, update_gap=2, scale=0.5)
    groups[0] |= {"update_proj_gap": groups[0].pop("update_gap"), "proj_type": "std"}  # the package's names
    package = PackageGaLoreAdamW(groups, no_deprecation_warning=True, **options)
    for step in range(5):  # P refreshed at steps 0, 2 and 4
        x = torch.randn(8, 30, dtype=dtype) * (1 + step)
        for model, optimiser in ((ours, mine), (theirs, package)):
            optimiser.zero_grad()
            model(x).pow(2).mean().backward()
            optimiser.step()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert relative_error(p, q) <= tolerance, name


def test_galore_keeps_its_moments_in_the_rank_r_subspace():
    model = Wide()
    optimiser = GaLoreAdamW(galore_groups(model, rank=3), lr=1e-2)
    model(torch.randn(4, 30)).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser.step()
    # moments: 3 × 30 for the wide 12 × 30 (U_rᵀ G), 30 × 3 for the tall 30 × 12 (G V_r), biases in full
    assert optimiser_state_numbers(optimiser) == 2 * (3 * 30 + 30 * 3 + 12 + 30)
    step = model.first.weight.detach() - before["first.weight"]
    assert torch.linalg.matrix_rank(step) <= 3  # one step moves W within a rank-3 subspace
    assert torch.linalg.matrix_rank(model.first.bias.detach() - before["first.bias"][None]) <= 1


def test_demo_learns():
    output = run_demo("reference_impls.low_memory")
    losses = demo_losses(output)
    assert len(losses) == 4 and all(after < before / 10 for before, after in losses)
