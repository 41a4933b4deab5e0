"""LN tuning, BEFT, SHiRA and trainable tokens: what they train, their counts, merging, and HF PEFT in
bf16 (fp32 checkpoints on a tiny Llama and GPT-2 are in test_interop.py)."""

import copy

import pytest
import torch
from peft import BeftConfig, LNTuningConfig, ShiraConfig, TrainableTokensConfig
from peft.tuners.shira.mask_functions import random_mask
from test_interop import save_with_nonzero_weights, tiny_llama
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.selective import (
    BiasTunedLinear,
    SHiRALinear,
    inject_beft,
    inject_ln_tuning,
    inject_shira,
    inject_trainable_tokens,
    merge_selective,
    random_mask_positions,
    unmerge_selective,
)

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo


def normed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 29), nn.LayerNorm(29), nn.GELU(), nn.Linear(29, 7), nn.RMSNorm(7))


def test_ln_tuning_trains_only_the_norms_and_starts_as_the_base():
    plain = normed()
    model = copy.deepcopy(plain)
    inject_ln_tuning(model, ["1", "4"])
    assert count_parameters(model)[0] == 2 * 29 + 7  # γ and β of the LayerNorm, γ of the RMSNorm
    x = torch.randn(3, 13)
    assert torch.equal(model(x), plain(x))
    with torch.no_grad():
        model[1].tuned.weight.mul_(2.0)
    assert torch.equal(model[1].base.weight, plain[1].weight)  # the frozen norm is kept, untouched
    model(x).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        "1.tuned.weight",
        "1.tuned.bias",
        "4.tuned.weight",
    }
    with pytest.raises(ValueError, match="no normalisation layer"):
        inject_ln_tuning(normed(), ["0"])


def test_beft_trains_a_bias_and_merges_it_even_where_there_was_none():
    model = Tiny()
    model.down = nn.Linear(29, 7, bias=False)
    inject_beft(model, ["up", "down"])
    assert count_parameters(model)[0] == 29 + 7
    x = torch.randn(4, 13)
    plain = model(x)
    with torch.no_grad():
        for layer in (model.up, model.down):
            layer.beta.normal_()
    assert not torch.allclose(model(x), plain)
    assert_merge_round_trip(model, merge_selective, unmerge_selective, x)
    merge_selective(model)
    assert model.down.base.bias is not None
    unmerge_selective(model)
    assert model.down.base.bias is None  # the bias BEFT created is gone again


@pytest.mark.parametrize("seed", [0, 7])
def test_shira_mask_is_peft_s_random_mask_for_the_same_seed(seed):
    theirs = torch.stack(torch.where(random_mask(nn.Linear(13, 29), r=3, random_seed=seed)))
    assert torch.equal(random_mask_positions(29, 13, 3, seed), theirs)


def test_shira_trains_a_sparse_high_rank_update_only_at_its_mask():
    model = Tiny()
    inject_shira(model, ["up", "down"], r=2, seed=1)
    assert count_parameters(model)[0] == 2 * (13 + 29) + 2 * (29 + 7)  # LoRA's count for r = 2
    x = torch.randn(5, 13)
    before = copy.deepcopy(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    delta = (model.up.delta_weight()).detach()
    changed = delta != 0
    mask = torch.zeros_like(changed)
    mask[tuple(model.up.positions)] = True
    assert bool((changed <= mask).all()) and changed.sum() > 0
    assert torch.linalg.matrix_rank(delta) > 2  # higher than the rank-2 LoRA of the same count
    assert torch.equal(model.up.base.weight, before.up.base.weight)
    assert_merge_round_trip(model, merge_selective, unmerge_selective, x)


def test_trainable_tokens_change_only_their_rows():
    lm = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50))
    plain = copy.deepcopy(lm)
    layer = inject_trainable_tokens(lm, "0", [3, 40])
    assert count_parameters(lm)[0] == 2 * 8
    ids = torch.tensor([[1, 3, 40, 49]])
    assert torch.equal(lm(ids), plain(ids))
    with torch.no_grad():
        layer.rows.add_(1.0)
    embedded, base = lm[0](ids), plain[0](ids)
    assert torch.equal(embedded[0, [0, 3]], base[0, [0, 3]]) and not torch.allclose(embedded[0, 1], base[0, 1])
    lm(ids).sum().backward()
    assert [n for n, p in lm.named_parameters() if p.grad is not None] == ["0.rows"]


def test_trainable_tokens_refuse_tied_weights_and_bad_ids():
    tied = nn.Sequential(nn.Embedding(20, 4), nn.Linear(4, 20, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied to '1.weight'"):
        inject_trainable_tokens(tied, "0", [1])
    with pytest.raises(ValueError, match="distinct and below 20"):
        inject_trainable_tokens(nn.Sequential(nn.Embedding(20, 4)), "0", [1, 1])


def test_a_tied_model_s_trainable_tokens_are_refused_by_the_loader(tmp_path):
    from test_interop import tiny_gpt2  # GPT-2 ties its output head to the token embedding

    peft_model, fresh = save_with_nonzero_weights(tiny_gpt2, TrainableTokensConfig(token_indices=[4]), tmp_path)
    with pytest.raises(UnsupportedAdapter, match="tied models are not supported"):
        load_peft_adapter(fresh, tmp_path)


CONFIGS = {
    "ln_tuning": LNTuningConfig(target_modules=["input_layernorm", "norm"]),
    "beft": BeftConfig(),
    "shira": ShiraConfig(r=2, random_seed=4, target_modules=["q_proj", "o_proj"]),
    "trainable_tokens": TrainableTokensConfig(token_indices=[2, 9]),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_equals_peft_in_both_dtypes(case, dtype, tolerance, tmp_path):
    peft_model, fresh = save_with_nonzero_weights(tiny_llama, CONFIGS[case], tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    ids = torch.tensor([[2, 9, 4, 11, 2, 50]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert relative_error(ours(input_ids=ids).logits, expected) <= 1e-5
        ours, peft_model = ours.to(dtype), peft_model.to(dtype)
        assert relative_error(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits) <= tolerance


def test_layers_are_what_the_loader_builds(tmp_path):
    _, fresh = save_with_nonzero_weights(tiny_llama, CONFIGS["shira"], tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    assert isinstance(ours.model.layers[0].self_attn.q_proj, SHiRALinear)
    _, fresh = save_with_nonzero_weights(tiny_llama, CONFIGS["beft"], tmp_path / "beft")
    assert isinstance(load_peft_adapter(fresh, tmp_path / "beft").model.layers[1].self_attn.v_proj, BiasTunedLinear)


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.selective"))
    assert len(losses) == 4 and all(after < 0.6 * before for before, after in losses)
