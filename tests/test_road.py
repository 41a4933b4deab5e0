"""RoAd's three variants against the paper's 2 × 2 pair rotations and against HF PEFT, including a
batch whose rows use different adapters."""

import copy

import pytest
import torch
from peft import PeftModel, RoadConfig, get_peft_model
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters, setting
from reference_impls.interop import load_peft_adapter
from reference_impls.road import VARIANTS, RoAdLinear, inject_road, merge_road, rotate_half, unmerge_road

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo


def tiny():
    return Tiny(d_in=13, d_hidden=36, d_out=12)  # up: 13 → 36, down: 36 → 12


def randomise(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, RoAdLinear):
                layer.theta.normal_(0, 0.5)
                layer.alpha.uniform_(0.5, 1.5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(variant, dtype):
    plain = tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_road(model, ["up", "down"], variant=variant, group_size=6)
    x = torch.randn(2, 5, 13, dtype=dtype)
    assert torch.equal(model(x), plain(x))


def test_parameter_counts_follow_the_formulas():
    for variant, per_feature in VARIANTS.items():
        model = tiny()
        inject_road(model, ["up", "down"], variant=variant, group_size=4)
        assert count_parameters(model)[0] == per_feature * (36 + 12), variant
    model = tiny()
    inject_road(model, ["up"], variant="road_2", group_size=4, adapters=3)
    assert count_parameters(model)[0] == 3 * 2 * 36


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pair_is_turned_by_the_papers_two_by_two_matrix(variant):
    g = 6
    layer = RoAdLinear(nn.Linear(5, 12), variant=variant, group_size=g)
    randomise(layer)
    z = torch.randn(3, 12)
    got = layer.rotate(z)
    theta, alpha = layer.theta[0], layer.alpha[0]
    for group in range(2):
        for p in range(g // 2):
            i, j = group * g + p, group * g + p + g // 2
            if variant == "road_1":
                k = group * g // 2 + p  # one angle and scale per pair
                a, t = alpha[k], theta[k]
                M = a * torch.stack([torch.stack([t.cos(), -t.sin()]), torch.stack([t.sin(), t.cos()])])
            elif variant == "road_2":
                M = torch.stack(
                    [
                        torch.stack([alpha[i] * theta[i].cos(), -alpha[i] * theta[i].sin()]),
                        torch.stack([alpha[j] * theta[j].sin(), alpha[j] * theta[j].cos()]),
                    ]
                )
            else:
                c, s = alpha[0] * theta[0].cos(), alpha[1] * theta[1].sin()
                M = torch.stack([torch.stack([c[i], -s[i]]), torch.stack([s[j], c[j]])])
            torch.testing.assert_close(got[:, [i, j]], z[:, [i, j]] @ M.T)


def test_rotate_half_pairs_feature_i_with_i_plus_half_a_group():
    z = torch.arange(8.0)
    assert rotate_half(z, 4).tolist() == [-2, -3, 0, 1, -6, -7, 4, 5]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_only_theta_and_alpha(variant):
    model = tiny()
    inject_road(model, ["up", "down"], variant=variant, group_size=4)
    randomise(model)
    model(torch.randn(4, 13)).pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        is_adapter = name.endswith(("theta", "alpha"))
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_rotates_weight_and_bias_and_unmerges(variant):
    model = tiny()
    inject_road(model, ["up", "down"], variant=variant, group_size=4)
    randomise(model)
    assert_merge_round_trip(model, merge_road, unmerge_road, torch.randn(4, 13))


def test_several_adapters_refuse_to_merge_and_a_bad_group_size_is_named():
    layer = RoAdLinear(nn.Linear(5, 12), group_size=4, adapters=2)
    with pytest.raises(ValueError, match="several adapters cannot merge"):
        layer.merge()
    with pytest.raises(ValueError, match="divide d_out = 12"):
        RoAdLinear(nn.Linear(5, 12), group_size=8)


def peft_with_two_adapters(tmp_path, variant, g):
    """A PEFT model holding adapters "a" and "b" (random), each also saved; and the plain base."""
    base = tiny()
    plain = copy.deepcopy(base)
    config = RoadConfig(variant=variant, group_size=g, target_modules=["up", "down"], init_weights=False)
    peft_model = get_peft_model(base, config, adapter_name="a")
    peft_model.add_adapter("b", copy.deepcopy(config))
    peft_model.save_pretrained(tmp_path)  # writes tmp_path/a and tmp_path/b
    return peft_model.eval(), plain


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_mixed_batch_equals_peft_s_adapter_names(variant, dtype, tolerance, tmp_path):
    peft_model, plain = peft_with_two_adapters(tmp_path, variant, 6)
    ours = {
        name: load_peft_adapter(copy.deepcopy(plain), path)
        for name, path in (("a", tmp_path / "a"), ("b", tmp_path / "b"))
    }
    # One model holding both adapters: adapter 0 is "a", adapter 1 is "b".
    model = copy.deepcopy(plain)
    inject_road(model, ["up", "down"], variant=variant, group_size=6, adapters=2)
    with torch.no_grad():
        for layer_name in ("up", "down"):
            for index, name in enumerate(("a", "b")):
                for parameter in ("theta", "alpha"):
                    source = getattr(ours[name].get_submodule(layer_name), parameter)[0]
                    getattr(model.get_submodule(layer_name), parameter)[index] = source
    x, names = torch.randn(5, 4, 13), ["a", "b", "b", "a", "b"]
    index = torch.tensor([0 if name == "a" else 1 for name in names])
    with torch.no_grad():
        expected = peft_model(x, adapter_names=names)
        assert (expected - plain(x)).abs().max() > 1e-2
        with setting(model, RoAdLinear, "adapter_index", index):
            assert relative_error(model(x), expected) <= 1e-5
        for name in ("a", "b"):  # each checkpoint alone is PEFT's adapter alone
            peft_model.set_adapter(name)
            assert relative_error(ours[name](x), peft_model(x)) <= 1e-5
        model, peft_model = model.to(dtype), peft_model.to(dtype)
        with setting(model, RoAdLinear, "adapter_index", index):
            assert relative_error(model(x.to(dtype)), peft_model(x.to(dtype), adapter_names=names)) <= tolerance


def test_a_reloaded_peft_checkpoint_is_what_we_load(tmp_path):
    peft_model, plain = peft_with_two_adapters(tmp_path, "road_4", 4)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(plain), str(tmp_path / "b")).eval()
    x = torch.randn(3, 13)
    with torch.no_grad():
        assert relative_error(load_peft_adapter(copy.deepcopy(plain), tmp_path / "b")(x), reloaded(x)) <= 1e-5


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.road"))
    assert len(losses) == 4 and all(after < 0.6 * before for before, after in losses)
