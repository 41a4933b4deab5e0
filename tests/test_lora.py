"""LoRA against its equations and against HF PEFT on the same weights (fresh random inputs each run)."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.lora import LoRALinear, inject_lora, merge_lora, unmerge_lora


class Tiny(nn.Module):
    """Odd widths on purpose: nothing may assume multiples of 8."""

    def __init__(self, d_in=13, d_hidden=29, d_out=7):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def randomise(module: LoRALinear) -> None:
    with torch.no_grad():
        module.B.normal_()  # B starts at zero; make the update non-zero to test anything


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(dtype):
    model = Tiny().to(dtype)
    reference = copy.deepcopy(model)
    inject_lora(model, ["up", "down"], r=3)
    x = torch.randn(2, 5, 13, dtype=dtype)
    assert torch.equal(model(x), reference(x))


def test_trainable_parameters_follow_the_formula():
    model = Tiny()
    inject_lora(model, ["up", "down"], r=3)
    # r (d_in + d_out) per adapted layer: up is 13 -> 29, down is 29 -> 7.
    assert count_parameters(model)[0] == 3 * (13 + 29) + 3 * (29 + 7)


def test_gradients_reach_only_the_adapter():
    model = Tiny()
    inject_lora(model, ["up", "down"], r=2)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            randomise(module)
    model(torch.randn(4, 13)).pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        is_adapter = name.endswith((".A", ".B"))
        assert parameter.requires_grad == is_adapter, name
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_unmerge_round_trip_and_equal_outputs(use_rslora):
    model = Tiny()
    inject_lora(model, ["up", "down"], r=4, alpha=6, use_rslora=use_rslora)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            randomise(module)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(3, 13)
    unmerged = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, weights[name], rtol=1e-6, atol=1e-6)


def test_scale_is_alpha_over_r_or_over_root_r():
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=32).scale == 2.0
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=32, use_rslora=True).scale == 8.0
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(4, 4), r=0)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_equals_peft_on_the_same_weights(use_rslora, dtype, tolerance):
    base = Tiny()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["up", "down"], r=3, alpha=5, use_rslora=use_rslora)
    theirs = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=5, target_modules=["up", "down"],
                                                use_rslora=use_rslora), copy.deepcopy(base))
    with torch.no_grad():
        for name in ("up", "down"):
            layer = getattr(theirs, name)
            layer.lora_A["default"].weight.normal_()
            layer.lora_B["default"].weight.normal_()
            getattr(ours, name).A.copy_(layer.lora_A["default"].weight)
            getattr(ours, name).B.copy_(layer.lora_B["default"].weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(2, 9, 13, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=tolerance, atol=tolerance)


def test_only_named_linear_layers_are_wrapped():
    model = Tiny()
    assert inject_lora(model, ["down"], r=2) == ["down"]
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, LoRALinear)
    with pytest.raises(ValueError, match="no Linear module"):
        inject_lora(Tiny(), ["nope"])


def test_demo_runs_and_learns(capsys):
    from reference_impls.lora import demo
    demo()
    out = capsys.readouterr().out
    before, after = (float(value) for value in out.split("loss on the new task: ")[1].split(" before, ")[0:1]
                     + [out.split(" before, ")[1].split(" after")[0]])
    assert after < before / 10
