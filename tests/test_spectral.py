"""FourierFT, WaveFT and C3A against their equations (an explicit inverse DFT, Haar blocks, explicit
circulant blocks) and against HF PEFT in both dtypes (PEFT's checkpoints on a tiny Llama and GPT-2
are in test_interop.py)."""

import copy
import math

import pytest
import torch
from peft import C3AConfig, FourierFTConfig, WaveFTConfig, get_peft_model
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.spectral import (
    WAVELETS,
    C3ALinear,
    FourierFTLinear,
    WaveFTLinear,
    circular_correlation,
    inject_spectral,
    merge_spectral,
    spectral_positions,
    synthesis,
    unmerge_spectral,
)

from helpers import (
    assert_equal_in_both_dtypes,
    assert_merge_round_trip,
    demo_losses,
    peft_and_ours,
    run_demo,
)

CASES = {
    "fourierft": ("fourierft", {"n": 40, "alpha": 50.0}),
    "waveft": ("waveft", {"n": 40, "scale": 5.0, "wavelet": "db2"}),
    "c3a": ("c3a", {"block_size": 4}),
}


def tiny():
    return Tiny(d_in=12, d_hidden=36, d_out=8)  # every width a multiple of C3A's block of 4, none of 8


def model_for(case, dtype=torch.float32):
    model = tiny().to(dtype)
    inject_spectral(model, ["up", "down"], CASES[case][0], **CASES[case][1])
    return model


def randomise(model):
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (FourierFTLinear, WaveFTLinear, C3ALinear)):
                for parameter in layer.parameters(recurse=False):
                    parameter.normal_(0, 1.0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(case, dtype):
    plain = tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_spectral(model, ["up", "down"], CASES[case][0], **CASES[case][1])
    x = torch.randn(2, 3, 12, dtype=dtype)
    assert torch.equal(model(x), plain(x))


def test_parameter_counts_follow_the_formulas():
    assert count_parameters(model_for("fourierft"))[0] == 2 * 40  # n per layer
    assert count_parameters(model_for("waveft"))[0] == 2 * 40
    assert count_parameters(model_for("c3a"))[0] == 36 * 12 // 4 + 8 * 36 // 4  # d_out · d_in / b


def test_one_fourier_coefficient_is_a_cosine_wave():
    layer = FourierFTLinear(nn.Linear(10, 6), n=1, alpha=3.0, seed=1)
    with torch.no_grad():
        layer.c.fill_(2.0)
    p, q = layer.positions[:, 0].tolist()
    s, t = torch.meshgrid(torch.arange(6.0), torch.arange(10.0), indexing="ij")
    expected = 3.0 * 2.0 * torch.cos(2 * math.pi * (p * s / 6 + q * t / 10)) / 60
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_a_haar_coefficient_is_a_two_by_two_block():
    """db1: an approximation coefficient spreads c/2 over a 2 × 2 block; a horizontal detail (top-right
    quadrant) is high-pass along the rows, [[1, 1], [−1, −1]] · c/2."""
    layer = WaveFTLinear(nn.Linear(10, 6), n=1, scale=3.0, wavelet="db1")
    for position, block in [((1, 2), [[1.0, 1.0], [1.0, 1.0]]), ((2, 5 + 3), [[1.0, 1.0], [-1.0, -1.0]])]:
        with torch.no_grad():
            layer.positions.copy_(torch.tensor(position)[:, None])
            layer.c.fill_(2.0)
        i, j = position[0] % 3, position[1] % 5  # the coefficient's place in its quadrant
        expected = torch.zeros(6, 10)
        expected[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = 3.0 * 2.0 / 2 * torch.tensor(block)
        torch.testing.assert_close(layer.delta_weight(), expected)


@pytest.mark.parametrize("wavelet", list(WAVELETS))
def test_synthesis_of_every_wavelet_is_perfect_reconstruction(wavelet):
    """Low-pass and high-pass synthesis together, uncropped, is an orthogonal map (the wavelets are
    orthonormal), so WaveFT's coefficients are a change of basis of ΔW, away from the borders."""
    low = torch.tensor(WAVELETS[wavelet], dtype=torch.float64)
    high = low.flip(0) * (-1.0) ** torch.arange(len(low))
    n, L = 6, len(low)
    full = 2 * n + L - 2
    both = torch.cat([synthesis(low, n, full), synthesis(high, n, full)], dim=1)
    inner = both[L - 2 : full - (L - 2)]  # away from the borders every row is a full filter
    torch.testing.assert_close(both.T @ both, torch.eye(2 * n, dtype=torch.float64))
    torch.testing.assert_close(inner @ inner.T, torch.eye(inner.shape[0], dtype=torch.float64))


def test_waveft_without_the_inverse_transform_is_the_sparse_coefficients():
    layer = WaveFTLinear(nn.Linear(9, 7), n=5, scale=2.0, idwt=False, seed=3)
    with torch.no_grad():
        layer.c.normal_()
    expected = torch.zeros(7, 9)
    expected[layer.positions[0], layer.positions[1]] = 2.0 * layer.c.detach()
    torch.testing.assert_close(layer.delta_weight().detach(), expected)


def test_positions_are_peft_s_for_the_same_seed():
    peft_model = get_peft_model(tiny(), FourierFTConfig(n_frequency=30, random_loc_seed=11, target_modules=["up"]))
    theirs = peft_model.base_model.model.up.indices["default"]
    assert torch.equal(spectral_positions(36, 12, 30, 11), theirs)


def test_c3a_is_block_circulant_and_its_fft_product_is_the_matrix():
    torch.manual_seed(2)
    layer = C3ALinear(nn.Linear(12, 8), block_size=4)
    randomise(layer)
    delta = layer.delta_weight().detach()
    block = delta[4:8, 0:4]  # block (1, 0)
    for s in range(1, 4):  # every row is the previous one shifted right by one
        torch.testing.assert_close(block[s], block[s - 1].roll(1))
    torch.testing.assert_close(block[0], layer.w[1, 0].detach() / 12)
    x = torch.randn(5, 12)
    torch.testing.assert_close(circular_correlation(x, layer.w.detach()) / 12, x @ delta.T)
    assert torch.linalg.matrix_rank(delta) == 8  # full rank from 24 numbers


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_only_the_coefficients(case):
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
    assert_merge_round_trip(model, merge_spectral, unmerge_spectral, torch.randn(4, 12))


CONFIGS = {
    "fourierft": FourierFTConfig(n_frequency=40, scaling=200.0, target_modules=["up", "down"]),
    "waveft": WaveFTConfig(n_frequency=40, scaling=5.0, target_modules=["up", "down"]),
    "c3a": C3AConfig(block_size=4, target_modules=["up", "down"]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, ours = peft_and_ours(tiny, CONFIGS[case], tmp_path, std=1.0)
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 12), dtype, tolerance)


@pytest.mark.parametrize(
    "options",
    [
        {"wavelet_family": "db2"},
        {"wavelet_family": "sym2", "proportional_parameters": True},
        {"use_idwt": False, "n_frequency_pattern": {"down": 11}},
    ],
)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_waveft_options_on_odd_shapes_equal_peft(options, dtype, tolerance, tmp_path):
    config = WaveFTConfig(n_frequency=30, scaling=4.0, random_loc_seed=5, target_modules=["up", "down"], **options)
    peft_model, ours = peft_and_ours(Tiny, config, tmp_path, std=1.0)  # widths 13, 29, 7
    assert_equal_in_both_dtypes(ours, peft_model, torch.randn(3, 5, 13), dtype, tolerance)


def test_a_wavelet_we_do_not_implement_is_refused_by_name(tmp_path):
    peft_model = get_peft_model(Tiny(), WaveFTConfig(n_frequency=10, wavelet_family="db3", target_modules=["up"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedAdapter, match="wavelet_family 'db3'"):
        load_peft_adapter(Tiny(), tmp_path)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.spectral"))
    assert len(losses) == 3 and all(after < 0.6 * before for before, after in losses)
