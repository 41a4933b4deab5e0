"""OFT, BOFT and HRA against their equations and parameter formulas, and against HF PEFT (PEFT's
checkpoints on a tiny Llama are in test_interop.py; here the layers themselves, in both dtypes)."""

import copy

import pytest
import torch
from peft import BOFTConfig, HRAConfig, OFTConfig, get_peft_model
from peft.tuners.boft.layer import BOFTLayer
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.orthogonal import (
    BOFTLinear,
    HRALinear,
    OFTLinear,
    butterfly_permutation,
    cayley,
    inject_orthogonal,
    merge_orthogonal,
    orthogonality_penalty,
    skew_symmetric,
    unmerge_orthogonal,
)

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    relative_error,
    run_demo,
)

LAYERS = (OFTLinear, BOFTLinear, HRALinear)

# up: 12 → 36, down: 36 → 7; every option divides both input widths.
CASES = {
    "oft": ("oft", {"r": 3}),
    "oft_weight_centric": ("oft", {"r": 3, "input_centric": False}),
    "oft_neumann": ("oft", {"r": 6, "neumann_terms": 5}),
    "oft_shared": ("oft", {"r": 2, "block_share": True}),
    "oft_coft": ("oft", {"r": 3, "coft": True, "eps": 0.3}),
    "boft": ("boft", {"block_size": 2, "factors": 2}),
    "hra": ("hra", {"r": 4}),
    "hra_odd": ("hra", {"r": 3}),
    "hra_gram_schmidt": ("hra", {"r": 4, "gram_schmidt": True}),
}


def model_for(case, dtype=torch.float32):
    method, options = CASES[case]
    model = Tiny(d_in=12, d_hidden=36, d_out=7).to(dtype)
    inject_orthogonal(model, ["up", "down"], method, **options)
    return model


def randomise(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LAYERS):
                for parameter in layer.parameters(recurse=False):
                    parameter.normal_(1.0 if parameter is getattr(layer, "s", None) else 0.0, 0.3)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("hra_odd", "hra_gram_schmidt")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(case, dtype):
    plain = Tiny(d_in=12, d_hidden=36, d_out=7).to(dtype)
    model = copy.deepcopy(plain)
    inject_orthogonal(model, ["up", "down"], *[CASES[case][0]], **CASES[case][1])
    x = torch.randn(2, 5, 12, dtype=dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
    else:  # the product W₀ R is rounded to bf16 (R = I only up to rounding for HRA's cancelling pairs)
        torch.testing.assert_close(model(x), plain(x), rtol=1.6e-2, atol=1e-2)


def test_odd_r_hra_does_not_start_at_identity():
    """Pairs of equal vectors cancel; with an odd r one reflection is left (PEFT does the same)."""
    layer = HRALinear(nn.Linear(12, 5), r=3)
    assert not torch.allclose(layer.rotation(), torch.eye(12), atol=1e-3)


def test_parameter_counts_follow_the_formulas():
    d_in, d_hidden, d_out = 12, 36, 7
    b = lambda r, d: d // r  # noqa: E731
    expected = {
        "oft": 3 * b(3, d_in) * (b(3, d_in) - 1) // 2 + 3 * b(3, d_hidden) * (b(3, d_hidden) - 1) // 2,
        "oft_shared": 6 * 5 // 2 + 18 * 17 // 2,  # one block of d_in / 2 per layer
        "boft": 2 * (6 + 18) * 1 + d_hidden + d_out,  # m · n · b(b−1)/2 (b = 2: one entry a block) + s
        "hra": 4 * d_in + 4 * d_hidden,
    }
    for case, count in expected.items():
        assert count_parameters(model_for(case))[0] == count, case


def test_cayley_is_orthogonal_and_neumann_approaches_it():
    Q = skew_symmetric(torch.randn(5, 6 * 5 // 2, dtype=torch.float64) * 0.05, 6)
    R = cayley(Q)
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(6, dtype=torch.float64).expand_as(R))
    torch.testing.assert_close(R, (torch.eye(6) + Q) @ torch.linalg.inv(torch.eye(6) - Q))
    errors = [(cayley(Q, terms) - R).abs().max().item() for terms in (2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-8


def test_coft_keeps_every_block_in_its_ball():
    layer = OFTLinear(nn.Linear(12, 4), r=3, coft=True, eps=0.3)
    with torch.no_grad():
        layer.Q.normal_(0, 1.0)
        layer.Q[1] *= 1e-4  # this block is inside the ball and must not move
    inside = layer.Q[1].clone()
    layer(torch.randn(2, 12))
    norms = skew_symmetric(layer.Q, 4).flatten(1).norm(dim=1)
    radius = 0.3 / 3**0.5
    torch.testing.assert_close(norms[[0, 2]], torch.full((2,), radius))
    assert torch.equal(layer.Q[1], inside)


def test_input_and_weight_centric_agree():
    torch.manual_seed(3)
    layer = OFTLinear(nn.Linear(12, 9), r=4)
    randomise(layer)
    x = torch.randn(3, 2, 12)
    rotated = layer(x)
    layer.input_centric = False
    torch.testing.assert_close(layer(x), rotated)
    torch.testing.assert_close(rotated, x @ (layer.base.weight @ layer.rotation()).T + layer.base.bias)


@pytest.mark.parametrize("factors, block_size", [(2, 2), (3, 4), (2, 6)])
def test_butterfly_permutation_is_peft_s(factors, block_size):
    d = 48
    blocks = d // block_size
    for j in range(1, factors + 1):
        theirs = BOFTLayer.block_butterfly_perm(None, d, blocks // 2 ** (j - 1), block_size // 2, factors - 1)
        assert torch.equal(butterfly_permutation(d, block_size * 2 ** (j - 1), block_size // 2), theirs)


def test_butterfly_mixes_across_blocks():
    """One factor keeps features within their block; two reach across neighbouring blocks."""
    layer = BOFTLinear(nn.Linear(8, 3), block_size=2, factors=2)
    randomise(layer)
    R = layer.rotation().detach()
    assert R[0, 3].abs() > 1e-4 and R[0, 5].abs() < 1e-12  # 0 reaches 2–3 but not 4–7
    torch.testing.assert_close(R @ R.T, torch.eye(8))


def test_hra_is_a_chain_of_reflections_and_gram_schmidt_matches_orthonormal_vectors():
    torch.manual_seed(2)
    layer = HRALinear(nn.Linear(10, 4), r=3)
    randomise(layer)
    u = layer.u / layer.u.norm(dim=0)
    reflections = [torch.eye(10) - 2 * torch.outer(u[:, i], u[:, i]) for i in range(3)]
    torch.testing.assert_close(layer.rotation(), reflections[0] @ reflections[1] @ reflections[2])
    assert torch.linalg.matrix_rank((layer.base.weight @ layer.rotation() - layer.base.weight).detach()) <= 3

    orthonormal = HRALinear(nn.Linear(10, 4), r=3, gram_schmidt=True)
    with torch.no_grad():
        orthonormal.u.copy_(torch.linalg.qr(torch.randn(10, 3))[0] * torch.tensor([2.0, 0.5, 3.0]))
    as_chain = HRALinear(orthonormal.base, r=3)
    with torch.no_grad():
        as_chain.u.copy_(orthonormal.u)
    torch.testing.assert_close(orthonormal.rotation(), as_chain.rotation())
    assert orthogonality_penalty(nn.Sequential(as_chain)).item() < 1e-10


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_only_the_rotations(case):
    model = model_for(case)
    randomise(model)
    model(torch.randn(3, 12)).pow(2).sum().backward()
    for name, parameter in model.named_parameters():
        is_adapter = ".base." not in name
        assert (parameter.grad is not None and parameter.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_round_trip(case):
    model, x = model_for(case), torch.randn(4, 12)
    randomise(model)
    model(x)  # COFT projects Q on the first forward pass; later passes keep it
    assert_merge_round_trip(model, merge_orthogonal, unmerge_orthogonal, x)


CONFIGS = {
    "oft": OFTConfig(oft_block_size=4, target_modules=["up", "down"]),
    "oft_exact": OFTConfig(oft_block_size=6, use_cayley_neumann=False, target_modules=["up", "down"]),
    "boft": BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["up", "down"]),
    "hra": HRAConfig(r=4, target_modules=["up", "down"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_and_ours(
        lambda: Tiny(d_in=12, d_hidden=36, d_out=7), CONFIGS[case], tmp_path, positive=("boft_s",)
    )
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 12), dtype, tolerance)


def test_a_convolution_and_peft_s_three_term_series_are_refused(tmp_path):
    conv = nn.Sequential(nn.Conv2d(4, 6, 3))
    get_peft_model(conv, OFTConfig(r=2, oft_block_size=0, target_modules=["0"])).save_pretrained(tmp_path / "conv")
    with pytest.raises(UnsupportedAdapter, match="Conv2d"):
        load_peft_adapter(nn.Sequential(nn.Conv2d(4, 6, 3)), tmp_path / "conv")
    config = OFTConfig(oft_block_size=4, num_cayley_neumann_terms=3, target_modules=["up"])
    get_peft_model(Tiny(d_in=12), config).save_pretrained(tmp_path / "three")
    with pytest.raises(UnsupportedAdapter, match="num_cayley_neumann_terms = 3"):
        load_peft_adapter(Tiny(d_in=12), tmp_path / "three")


def test_peft_s_oft_module_dropout_is_never_applied_and_ours_matches_it_in_training(tmp_path):
    """PEFT 0.21 builds OFT's block dropout for module_dropout but its forward pass never calls it."""
    config = OFTConfig(oft_block_size=4, module_dropout=0.5, target_modules=["up", "down"], init_weights=False)
    base = Tiny(d_in=12, d_hidden=36, d_out=7)
    fresh = copy.deepcopy(base)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(tmp_path)
    ours = load_peft_adapter(fresh, tmp_path).train()
    peft_model.train()
    x = torch.randn(4, 12)
    with torch.no_grad():
        trained = peft_model(x)
        assert torch.equal(trained, peft_model(x))  # no randomness in training
        assert relative_error(ours(x), trained) <= 1e-5


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.orthogonal"))
    assert len(losses) == 4 and all(after < 0.6 * before for before, after in losses)
