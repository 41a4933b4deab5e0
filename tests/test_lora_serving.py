"""Activated LoRA against its definition (the update from the last invocation onwards; the base
model's logits, and so its cache, before it) and Block-diagonal LoRA against its (zeros off the
diagonal; shard by shard, the layer's output) and both against HF PEFT's LoRA with
alora_invocation_tokens and use_bdlora."""

import copy

import pytest
import torch
from peft import BdLoraConfig, LoraConfig
from test_interop import save_with_nonzero_weights, tiny_llama
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import load_peft_adapter
from reference_impls.lora import merge_lora, unmerge_lora
from reference_impls.lora_serving import (
    ActivatedLoRA,
    BlockDiagonalLoRALinear,
    inject_activated_lora,
    inject_block_diagonal_lora,
    invocation_starts,
    shard_outputs,
)

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo

INVOCATION = [5, 9, 5]


def test_the_last_invocation_is_found_in_each_row():
    ids = torch.tensor([[1, 5, 9, 5, 2, 5, 9, 5, 3], [5, 9, 2, 2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 5, 9, 5]])
    assert invocation_starts(ids, INVOCATION) == [5, None, 6]


def rows():
    ids = torch.randint(10, 97, (3, 12))
    ids[0, 4:7] = torch.tensor(INVOCATION)  # in the middle
    ids[2, 9:12] = torch.tensor(INVOCATION)  # at the very end; row 1 has none
    return ids


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_peft_alora_checkpoint_loads_and_before_the_invocation_it_is_the_base_model(dtype, tolerance, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]  # PEFT finds invocations for causal LMs only: say it is one
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, alora_invocation_tokens=INVOCATION, task_type="CAUSAL_LM"
    )
    theirs, fresh = save_with_nonzero_weights(tiny_llama, config, tmp_path)
    plain = copy.deepcopy(fresh)
    ours = load_peft_adapter(fresh, tmp_path)
    assert isinstance(ours, ActivatedLoRA)
    ids = rows()
    with torch.no_grad():
        expected, got, base = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, plain(input_ids=ids).logits
        assert relative_error(got, expected) <= 1e-5
        torch.testing.assert_close(got[0, :4], base[0, :4])  # before the invocation: the base model, exactly
        torch.testing.assert_close(got[1], base[1])  # no invocation: the base model throughout
        assert (got[0, 4:] - base[0, 4:]).abs().max() > 1e-2 and (got[2, 9:] - base[2, 9:]).abs().max() > 1e-2
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= tolerance


def test_counts_gradients_and_no_merge():
    model = tiny_llama()
    adapted = inject_activated_lora(model, ["q_proj"], invocation=INVOCATION, r=2)
    assert count_parameters(adapted)[0] == 2 * 2 * (32 + 32)  # two layers' q_proj, r (d_in + d_out)
    with torch.no_grad():
        for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj):
            layer.B.normal_()
    ids = rows()
    adapted(input_ids=ids).logits[1].sum().backward()  # row 1 has no invocation: nothing reaches A or B
    layer = model.model.layers[0].self_attn.q_proj
    assert not layer.A.grad.any() and not layer.B.grad.any()
    with pytest.raises(ValueError, match="does not merge"):
        layer.merge()


def test_demo_learns_and_leaves_the_prefix_alone():
    output = run_demo("reference_impls.lora_serving")
    (before, after), (bd_before, bd_after) = demo_losses(output)
    assert after < before and "by 0.0e+00" in output and bd_after < 0.1 * bd_before


# ---- Block-diagonal LoRA ----------------------------------------------------------------------------


@pytest.mark.parametrize("diagonal", ["A", "B"])
def test_one_factor_is_block_diagonal_and_the_shards_need_only_their_slices(diagonal):
    torch.manual_seed(0)
    layer = BlockDiagonalLoRALinear(nn.Linear(12, 8), r=4, alpha=8, blocks=2, diagonal=diagonal)
    with torch.no_grad():
        layer.B.normal_()
    A, B = layer.factors()
    blocky = A if diagonal == "A" else B
    rows, columns = blocky.shape[0] // 2, blocky.shape[1] // 2
    assert not blocky[:rows, columns:].any() and not blocky[rows:, :columns].any()  # zero off the diagonal
    torch.testing.assert_close(layer.delta_weight(), 2.0 * B @ A)
    x = torch.randn(5, 12)
    pieces = shard_outputs(layer, x)
    whole = torch.cat(pieces, dim=-1) if diagonal == "B" else sum(pieces)  # gathered as W x is, or summed
    torch.testing.assert_close(whole, layer(x))
    d_in, d_out = 12, 8
    expected = 4 * (d_in // 2) + d_out * 4 if diagonal == "A" else 4 * d_in + d_out * (4 // 2)
    assert sum(p.numel() for p in (layer.A, layer.B)) == expected
    with pytest.raises(ValueError, match="must divide"):
        BlockDiagonalLoRALinear(nn.Linear(12, 8), r=3, blocks=2)


def test_block_diagonal_lora_merges_and_trains_its_factors():
    model = Tiny(d_in=12, d_hidden=36, d_out=8)
    inject_block_diagonal_lora(model, column_parallel=["up"], row_parallel=["down"], r=4, blocks=2)
    with torch.no_grad():
        model.up.B.normal_(), model.down.B.normal_()
    assert_merge_round_trip(model, merge_lora, unmerge_lora, torch.randn(3, 12))
    model(torch.randn(3, 12)).pow(2).sum().backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == {"up.A", "up.B", "down.A", "down.B"}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_a_peft_bdlora_checkpoint_loads_and_gives_peft_s_logits(dtype, tolerance, tmp_path):
    bd = BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "up_proj"], nblocks=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"], use_bdlora=bd)
    theirs, fresh = save_with_nonzero_weights(tiny_llama, config, tmp_path)
    ours = load_peft_adapter(fresh, tmp_path)
    assert ours.model.layers[0].self_attn.o_proj.diagonal == "A" and ours.model.layers[0].mlp.up_proj.diagonal == "B"
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert relative_error(ours(input_ids=ids).logits, expected) <= 1e-5
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= tolerance
