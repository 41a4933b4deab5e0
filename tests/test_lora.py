"""LoRA against its equations and against HF PEFT on the same weights (fresh random inputs each run)."""

import copy

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model, inject_adapter_in_model
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.lora import (
    DoRALinear,
    LoRALinear,
    RankAllocator,
    SVDLinear,
    inject_adalora,
    inject_lora,
    inject_vera,
    merge_lora,
    orthogonal_penalty,
    unmerge_lora,
)

from helpers import assert_equal_in_both_dtypes, assert_merge_round_trip, demo_losses, peft_and_ours, relative_error


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
    assert_merge_round_trip(model, merge_lora, unmerge_lora, torch.randn(3, 13))


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
    theirs = inject_adapter_in_model(
        LoraConfig(r=3, lora_alpha=5, target_modules=["up", "down"], use_rslora=use_rslora), copy.deepcopy(base)
    )
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


def lora_with_bias(**options):
    model = Tiny()
    inject_lora(model, ["up", "down"], r=3, alpha=6, bias=True, **options)
    with torch.no_grad():
        for layer in (model.up, model.down):
            layer.B.normal_(), layer.B_bias.normal_()
    return model


def test_a_bias_on_b_adds_s_beta_trains_counts_and_merges_into_the_layer_s_bias():
    model = lora_with_bias()
    assert count_parameters(model)[0] == 3 * (13 + 29) + 29 + 3 * (29 + 7) + 7  # r (d_in + d_out) + d_out
    x = torch.randn(5, 13)
    layer = model.up
    expected = layer.base(x) + 2.0 * (x @ layer.A.T @ layer.B.T + layer.B_bias)  # s = 6 / 3
    torch.testing.assert_close(layer(x), expected)
    model(x).pow(2).sum().backward()
    assert model.up.B_bias.grad is not None and model.up.base.bias.grad is None
    assert_merge_round_trip(model, merge_lora, unmerge_lora, x)
    bare = LoRALinear(nn.Linear(4, 3, bias=False), r=2, bias=True)
    with pytest.raises(ValueError, match="has none"):
        bare.merge()
    with pytest.raises(ValueError, match="DoRA"):
        inject_lora(Tiny(), ["up"], use_dora=True, bias=True)


def seeded_tiny():
    torch.manual_seed(5)
    return Tiny()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_peft_lora_bias_checkpoint_loads_and_ours_saves_one_peft_loads(dtype, tolerance, tmp_path):
    from peft import PeftModel

    from reference_impls.interop import save_peft_adapter

    config = LoraConfig(r=3, lora_alpha=6, lora_bias=True, target_modules=["up", "down"])
    theirs, ours = peft_and_ours(seeded_tiny, config, tmp_path / "peft")
    assert torch.equal(ours.up.B_bias, theirs.base_model.model.up.lora_B["default"].bias)
    save_peft_adapter(ours, tmp_path / "ours")  # and back: PEFT reads our bias
    reloaded = PeftModel.from_pretrained(seeded_tiny(), tmp_path / "ours")
    x = torch.randn(3, 5, 13)
    with torch.no_grad():
        assert relative_error(reloaded(x), ours(x)) <= 1e-6
    assert_equal_in_both_dtypes(ours, theirs, x, dtype, tolerance)


def test_only_named_linear_layers_are_wrapped():
    model = Tiny()
    assert inject_lora(model, ["down"], r=2) == ["down"]
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, LoRALinear)
    with pytest.raises(ValueError, match="no Linear module"):
        inject_lora(Tiny(), ["nope"])


def test_demo_runs_and_every_method_learns(capsys):
    from reference_impls.lora import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 4
    assert all(after < before / 4 for before, after in losses), losses


# ---- DoRA, VeRA, AdaLoRA -------------------------------------------------------------------------


def randomise_all(model: nn.Module) -> None:
    """Non-zero values for every trainable tensor, so that comparisons test something."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_()


@pytest.mark.parametrize("method", ["dora", "vera", "adalora"])
def test_variants_are_identity_at_initialisation_and_count_parameters(method):
    model = Tiny()
    reference = copy.deepcopy(model)
    if method == "dora":
        inject_lora(model, ["up", "down"], r=3, use_dora=True)
        expected = 3 * (13 + 29) + 29 + 3 * (29 + 7) + 7  # r (d_in + d_out) + d_out per layer
    elif method == "vera":
        inject_vera(model, ["up", "down"], r=5)
        expected = (5 + 29) + (5 + 7)  # r + d_out per layer
    else:
        inject_adalora(model, ["up", "down"], r=3)
        expected = 3 * (13 + 29 + 1) + 3 * (29 + 7 + 1)  # r (d_in + d_out + 1) per layer
    x = torch.randn(4, 13)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-6, atol=1e-6)
    assert count_parameters(model)[0] == expected


@pytest.mark.parametrize("method", ["dora", "vera", "adalora"])
def test_variants_merge_unmerge_round_trip(method):
    model = Tiny()
    {
        "dora": lambda: inject_lora(model, ["up", "down"], r=3, use_dora=True),
        "vera": lambda: inject_vera(model, ["up", "down"], r=5),
        "adalora": lambda: inject_adalora(model, ["up", "down"], r=3),
    }[method]()
    randomise_all(model)
    if method == "dora":
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, DoRALinear):
                    module.m.abs_().add_(0.5)  # magnitudes are positive
    assert_merge_round_trip(
        model, merge_lora, unmerge_lora, torch.randn(3, 13), rtol=1e-4, atol=1e-4, weight_rtol=1e-4, weight_atol=1e-5
    )


def test_dora_gradients_skip_the_norm_and_reach_m_A_B():
    model = Tiny()
    inject_lora(model, ["up"], r=2, use_dora=True)
    randomise_all(model)
    model(torch.randn(5, 13)).sum().backward()
    assert all(p.grad is not None for p in (model.up.A, model.up.B, model.up.m))
    assert model.up.base.weight.grad is None and model.down.weight.grad is None


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_dora_equals_peft(dtype, tolerance):
    base = Tiny()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["up", "down"], r=3, alpha=5, use_dora=True)
    theirs = inject_adapter_in_model(
        LoraConfig(r=3, lora_alpha=5, target_modules=["up", "down"], use_dora=True), copy.deepcopy(base)
    )
    with torch.no_grad():
        for name in ("up", "down"):
            layer, mine = getattr(theirs, name), getattr(ours, name)
            layer.lora_A["default"].weight.normal_()
            layer.lora_B["default"].weight.normal_()
            layer.lora_magnitude_vector["default"].weight.uniform_(0.5, 2.0)
            mine.A.copy_(layer.lora_A["default"].weight)
            mine.B.copy_(layer.lora_B["default"].weight)
            mine.m.copy_(layer.lora_magnitude_vector["default"].weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(2, 9, 13, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=tolerance, atol=tolerance)


def test_vera_equals_peft_including_the_seeded_projections():
    base = Tiny()
    ours = copy.deepcopy(base)
    inject_vera(ours, ["up", "down"], r=6, seed=1234)
    # PEFT keeps VeRA's shared projections on its tuner, so it needs get_peft_model, not inject_adapter_in_model.
    peft_model = get_peft_model(
        copy.deepcopy(base), VeraConfig(r=6, target_modules=["up", "down"], projection_prng_key=1234)
    )
    theirs = peft_model.base_model.model
    # Same seed, same generator: the shared projections agree without copying them.
    torch.testing.assert_close(ours.up.shared[0].A, theirs.up.vera_A["default"])
    torch.testing.assert_close(ours.up.shared[0].B, theirs.up.vera_B["default"])
    with torch.no_grad():
        for name in ("up", "down"):
            layer, mine = getattr(theirs, name), getattr(ours, name)
            layer.vera_lambda_b["default"].normal_()
            layer.vera_lambda_d["default"].normal_()
            mine.lambda_b.copy_(layer.vera_lambda_b["default"])
            mine.lambda_d.copy_(layer.vera_lambda_d["default"])
    x = torch.randn(3, 4, 13)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_adalora_equals_peft():
    base = Tiny()
    ours = copy.deepcopy(base)
    inject_adalora(ours, ["up", "down"], r=4, alpha=8)
    theirs = inject_adapter_in_model(
        AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=100, target_modules=["up", "down"]),
        copy.deepcopy(base),
    )
    with torch.no_grad():
        for name in ("up", "down"):
            layer, mine = getattr(theirs, name), getattr(ours, name)
            for tensor in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]):
                tensor.normal_()
            mine.Q.copy_(layer.lora_A["default"])
            mine.P.copy_(layer.lora_B["default"])
            mine.lambda_.copy_(layer.lora_E["default"])
    x = torch.randn(5, 13)
    # PEFT divides by r + 1e-5 where the paper divides by r: a relative difference of 1e-5 / r.
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_adalora_budget_schedule_and_masking():
    model = Tiny()
    inject_adalora(model, ["up", "down"], r=6)
    allocator = RankAllocator(model, target_r=2, total_steps=100, warmup_steps=10, final_steps=20, mask_every=5)
    assert allocator.budget(5) == (12, False)
    assert allocator.budget(95) == (4, True)
    budgets = [allocator.budget(step)[0] for step in range(11, 81)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] <= 12 and budgets[-1] >= 4
    randomise_all(model)
    for step in (1, 2, 95):
        model.zero_grad()
        (model(torch.randn(16, 13)) ** 2).mean().backward()
        kept = allocator.step(step)
    alive = sum(int((layer.lambda_ != 0).sum()) for layer in model.modules() if isinstance(layer, SVDLinear))
    assert kept == 4 and alive == 4  # the 8 least important triplets of 12 were zeroed
    penalty = orthogonal_penalty(model)
    assert penalty.item() > 0 and penalty.requires_grad
