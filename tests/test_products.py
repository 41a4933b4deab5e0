"""LoHa, LoKr and HiRA against their equations and parameter formulas, and against HF PEFT on
convolutions (the Linear layers of a tiny Llama are in test_interop.py)."""

import copy
import math

import pytest
import torch
from peft import HiraConfig, LoHaConfig, LoKrConfig, get_peft_model
from peft.tuners.lokr.layer import factorization
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.products import (
    HiRALayer,
    LoHaLayer,
    LoKrLayer,
    inject_products,
    kronecker_factors,
    merge_products,
    unmerge_products,
)

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo


class ConvNet(nn.Module):
    """Odd channel counts, a grouped strided conv, a 1×1 conv, a Conv1d and a Linear head."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # the same weights every time, the test's own random draws untouched
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 10, 3, padding=1)
            self.grouped = nn.Conv2d(10, 6, 3, stride=2, groups=2)
            self.point = nn.Conv2d(6, 9, 1)
            self.seq = nn.Conv1d(9, 12, 5, padding=2)
            self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        x = self.seq(self.point(x).flatten(2))
        return self.head(x.mean(-1))


def randomise(model: nn.Module) -> None:
    """Every factor non-zero, so that no term of the update hides behind a zero initialisation."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (LoHaLayer, LoKrLayer, HiRALayer)):
                for factor in module.parameters(recurse=False):
                    factor.normal_(0, 0.3)


METHODS = {
    "loha": {"r": 3, "alpha": 5},
    "loha_cp": {"r": 3, "alpha": 5, "effective_conv": True},
    "lokr": {"r": 2, "alpha": 3},
    "lokr_cp": {"r": 1, "alpha": 3, "effective_conv": True, "decompose_both": True},
}


def inject(model, case, targets=("conv", "grouped", "point", "seq", "head")):
    method = case.split("_")[0]
    return inject_products(model, list(targets), method, **METHODS[case])


@pytest.mark.parametrize("case", [*METHODS, "hira"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(case, dtype):
    if case == "hira":
        model, x = Tiny().to(dtype), torch.randn(2, 3, 13, dtype=dtype)
        reference = copy.deepcopy(model)
        inject_products(model, ["up", "down"], "hira", r=4)
    else:
        model, x = ConvNet().to(dtype), torch.randn(2, 3, 9, 9, dtype=dtype)
        reference = copy.deepcopy(model)
        inject(model, case)
    assert torch.equal(model(x), reference(x))


def test_parameter_counts_follow_the_formulas():
    r = 3
    model = Tiny()  # up: 13 → 29, down: 29 → 7
    inject_products(model, ["up", "down"], "loha", r=r)
    assert count_parameters(model)[0] == 2 * r * (13 + 29) + 2 * r * (29 + 7)

    model = ConvNet()
    inject(model, "loha_cp")  # conv 3 → 10 (3×3), grouped 5 → 6 per group (3×3), 1×1 and Conv1d(k=5)
    counts = {name: sum(p.numel() for p in layer.parameters(recurse=False)) for name, layer in _layers(model)}
    assert counts["conv"] == 2 * (r * 10 + r * 3 + r * r * 9)
    assert counts["grouped"] == 2 * (r * 6 + r * 5 + r * r * 9)
    assert counts["point"] == 2 * r * (6 + 9)  # 1×1: the flattened form, as in PEFT
    assert counts["seq"] == 2 * (r * 12 + r * 9 + r * r * 5)

    model = Tiny(d_in=12, d_hidden=30, d_out=8)
    inject_products(model, ["up", "down"], "lokr", r=2)
    # up: 12 = 3·4 in, 30 = 5·6 out: C 5×3, W₂ = B A with B 6×2, A 2×4 (r = 2 < 6/2);
    # down: 30 = 5·6 in, 8 = 2·4 out: C 2×5, W₂ full 4×6 (r = 2 ≥ 6/2 is false: B A, 4×2 and 2×6).
    assert (model.up.full_C, model.up.full_W2, model.down.full_W2) == (True, False, False)
    assert count_parameters(model)[0] == (5 * 3 + 2 * (6 + 4)) + (2 * 5 + 2 * (4 + 6))
    model = Tiny(d_in=12, d_hidden=30, d_out=8)
    inject_products(model, ["down"], "lokr", r=3)  # r = 3 ≥ 6/2: one full 4 × 6 matrix
    assert model.down.full_W2 and count_parameters(model)[0] == 2 * 5 + 4 * 6

    model = Tiny()
    inject_products(model, ["up", "down"], "hira", r=r)
    assert count_parameters(model)[0] == r * (13 + 29) + r * (29 + 7)


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoHaLayer, LoKrLayer, HiRALayer))]


def test_kronecker_factors_follow_peft_rule():
    for width in range(1, 400):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16, 64):
            assert kronecker_factors(width, factor) == factorization(width, factor), (width, factor)


def test_updates_are_the_papers_products():
    torch.manual_seed(1)
    loha = LoHaLayer(nn.Linear(13, 7), r=3, alpha=6)
    randomise(loha)
    expected = 2.0 * (loha.B1 @ loha.A1) * (loha.B2 @ loha.A2)
    torch.testing.assert_close(loha.delta_weight(), expected)
    assert torch.linalg.matrix_rank(loha.delta_weight()) > 3  # a Hadamard product exceeds rank r

    lokr = LoKrLayer(nn.Linear(12, 30), r=2, alpha=4)
    randomise(lokr)
    C, W2 = lokr.C, lokr.B @ lokr.A
    (a, c), (b, e) = C.shape, W2.shape
    delta = lokr.delta_weight()
    for i, j, p, q in [(0, 0, 0, 0), (a - 1, c - 1, b - 1, e - 1), (1, 2, 3, 1)]:
        torch.testing.assert_close(delta[i * b + p, j * e + q], 2.0 * C[i, j] * W2[p, q])

    conv = LoKrLayer(nn.Conv2d(6, 10, 3), r=1, alpha=1, effective_conv=True)
    randomise(conv)
    delta, core = conv.delta_weight(), torch.einsum("ijkl,pi,jq->pqkl", conv.T, conv.B, conv.A)
    for kh, kw in [(0, 0), (2, 1)]:  # every kernel tap is C ⊗ (that tap of W₂)
        torch.testing.assert_close(delta[:, :, kh, kw], torch.kron(conv.C, core[:, :, kh, kw]))

    base = nn.Linear(13, 7)
    hira = HiRALayer(base, r=2)
    randomise(hira)
    x = torch.randn(4, 13)
    expected = nn.functional.linear(x, base.weight + base.weight * (hira.B @ hira.A), base.bias)
    torch.testing.assert_close(hira(x), expected)


@pytest.mark.parametrize("case", [*METHODS, "hira"])
def test_gradients_reach_only_the_factors(case):
    model = Tiny() if case == "hira" else ConvNet()
    inject_products(model, ["up", "down"], "hira", r=2) if case == "hira" else inject(model, case)
    randomise(model)
    x = torch.randn(2, 13) if case == "hira" else torch.randn(2, 3, 9, 9)
    model(x).sum().backward()
    for name, parameter in model.named_parameters():
        is_factor = ".base." not in name
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == is_factor, name


@pytest.mark.parametrize("case", [*METHODS, "hira"])
def test_merge_unmerge_round_trip(case):
    if case == "hira":
        model, x = Tiny(), torch.randn(5, 13)
        inject_products(model, ["up", "down"], "hira", r=3)
    else:
        model, x = ConvNet(), torch.randn(2, 3, 9, 9)
        inject(model, case)
    randomise(model)
    assert_merge_round_trip(model, merge_products, unmerge_products, x)


def peft_pair(tmp_path, config, make_model=ConvNet):
    """A PEFT model with every adapter tensor random, saved; and ours loaded from its checkpoint."""
    base = make_model()
    fresh = copy.deepcopy(base)
    peft_model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path)
    return peft_model, load_peft_adapter(fresh, tmp_path)


CONV_CONFIGS = {
    "loha": LoHaConfig(r=3, alpha=5, target_modules=["conv", "grouped", "point", "seq", "head"]),
    "loha_cp": LoHaConfig(
        r=3, alpha=5, target_modules=["conv", "grouped", "point", "seq", "head"], use_effective_conv2d=True
    ),
    "lokr": LoKrConfig(r=2, alpha=3, target_modules=["conv", "grouped", "point", "head"]),
    # Not the Conv1d: PEFT 0.21's LoKr in CP form fails on one (torch.kron: "view size is not compatible").
    "lokr_cp": LoKrConfig(
        r=1,
        alpha=3,
        target_modules=["conv", "grouped", "point", "head"],
        use_effective_conv2d=True,
        decompose_both=True,
        rank_pattern={"head": 2},
    ),
}


@pytest.mark.parametrize("case", list(CONV_CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_on_convolutions(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_pair(tmp_path, CONV_CONFIGS[case])
    layers = dict(_layers(ours))
    if case.endswith("cp"):  # the CP form where the kernel is larger than 1
        assert layers["conv"].effective_conv and not getattr(layers.get("point"), "effective_conv", False)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected, plain = peft_model(x), ConvNet()(x)
        assert (expected - plain).abs().max() > 1e-2
        assert relative_error(ours(x), expected) <= 1e-5
        ours, peft_model = ours.to(dtype), peft_model.to(dtype)
        assert relative_error(ours(x.to(dtype)), peft_model(x.to(dtype))) <= tolerance


def test_lokr_on_conv1d_with_a_full_w2_is_refused(tmp_path):
    """torch.kron pairs PEFT's 2-D C with the last two axes of a 3-D W₂, so its Conv1d update is not
    C ⊗ W₂ over the channels; the loader says so rather than copy a different function."""
    config = LoKrConfig(r=8, alpha=8, target_modules=["seq"])  # r ≥ max(b, e)/2: a full W₂
    with pytest.raises(UnsupportedAdapter, match="Conv1d with a full W2"):
        peft_pair(tmp_path, config)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_hira_equals_peft_in_both_dtypes(dtype, tolerance, tmp_path):
    peft_model, ours = peft_pair(tmp_path, HiraConfig(r=3, target_modules=["up", "down"]), make_model=Tiny)
    x = torch.randn(3, 5, 13)
    with torch.no_grad():
        assert relative_error(ours(x), peft_model(x)) <= 1e-5
        ours, peft_model = ours.to(dtype), peft_model.to(dtype)
        assert relative_error(ours(x.to(dtype)), peft_model(x.to(dtype))) <= tolerance


def test_loaded_ranks_and_scales_are_the_layers_own(tmp_path):
    config = LoHaConfig(r=4, alpha=8, target_modules=["up", "down"], rank_pattern={"down": 2})
    _, ours = peft_pair(tmp_path, config, make_model=Tiny)
    assert (ours.up.r, ours.up.scale, ours.down.r, ours.down.scale) == (4, 2.0, 2, 4.0)
    assert math.isclose(ours.up.alpha, 8)


def test_hira_kept_weight_restores_exactly():
    model = Tiny()
    inject_products(model, ["up"], "hira", r=2)
    randomise(model)
    before = model.up.base.weight.clone()
    merge_products(model)
    assert not torch.equal(model.up.base.weight, before)
    unmerge_products(model)
    assert torch.equal(model.up.base.weight, before) and model.up.W0 is None


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.products"))
    assert len(losses) == 4 and all(after < 0.6 * before for before, after in losses)
