"""LoftQ and QA-LoRA against their definitions (the alternation of quantisation and SVD, the
group-pooled update that merges into the offsets) and against their oracles: bitsandbytes' NF4 and
int8 round trips, PEFT's `loftq_init` (run on the CPU: PEFT computes it on "cuda" or "xpu" only)
and its LoftQ checkpoints, PEFT's QA-LoRA forward (its GPTQ variant, applied to our layer's tensors)."""

import copy
import types

import bitsandbytes as bnb
import pytest
import torch
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.variants import QALoraLinearVariant
from peft.utils import loftq_utils
from test_interop import tiny_llama
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import load_peft_adapter
from reference_impls.kernels.nf4 import round_trip_nf4
from reference_impls.lora import LoRALinear
from reference_impls.lora_quant import (
    QALoRALinear,
    inject_loftq,
    inject_qalora,
    loftq,
    loftq_init,
    merge_qalora,
    quantise_groupwise,
    round_trip_int8,
    unmerge_qalora,
)

from helpers import assert_merge_round_trip, demo_losses, relative_error, run_demo


def peft_loftq_on_the_cpu():
    """PEFT's own `loftq_init`, its compute device "cuda" replaced by "cpu" (nothing else changed)."""
    function = loftq_utils.loftq_init.__wrapped__  # under torch.no_grad()
    code = function.__code__
    code = code.replace(co_consts=tuple("cpu" if c == "cuda" else c for c in code.co_consts))
    moved = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__)
    return torch.no_grad()(moved)


# ---- LoftQ --------------------------------------------------------------------------------------


# bitsandbytes 0.50's CPU round trip of some 2-D shapes (32 × 32, 48 × 32, 96 × 16, …) does not give
# NF4's values (on 32 × 32, 884 of 1024 differ), while the same weights flattened do; PEFT's LoftQ
# hands it the 2-D weight, so the comparisons with PEFT below use shapes it gets right (24 × 130, and
# the tiny Llama's down_proj, 32 × 86).


@pytest.mark.parametrize("shape", [(24, 130), (7, 64), (33, 5), (32, 32)])
def test_the_round_trips_are_bitsandbytes(shape):
    W = torch.randn(*shape) * torch.rand(shape[0], 1) * 3
    q, state = bnb.functional.quantize_4bit(W.flatten(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(round_trip_nf4(W), bnb.functional.dequantize_4bit(q, state).reshape(shape))
    int8 = bnb.nn.Int8Params(W.clone(), requires_grad=False).to("cpu")
    expected = bnb.functional.int8_vectorwise_dequant(int8.data, int8.SCB)
    torch.testing.assert_close(round_trip_int8(W), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_is_peft_s(bits, iterations):
    W = torch.randn(24, 130)
    Q, B, A = loftq(W, r=3, bits=bits, iterations=iterations)
    their_Q, their_A, their_B = peft_loftq_on_the_cpu()(W, num_bits=bits, reduced_rank=3, num_iter=iterations)
    assert relative_error(Q, their_Q) <= 1e-6
    assert relative_error(B @ A, their_B @ their_A) <= 1e-5
    assert relative_error(A, their_A) <= 1e-4 and relative_error(B, their_B) <= 1e-4  # the same SVD


def test_loftq_starts_closer_to_w_than_quantisation_alone():
    W = torch.randn(48, 64) + torch.randn(48, 4) @ torch.randn(4, 64)  # a few strong directions
    alone = (W - round_trip_nf4(W)).norm()
    errors = [(W - Q - B @ A).norm() for Q, B, A in (loftq(W, r=8, iterations=t) for t in (1, 2, 5))]
    assert errors[0] < 0.9 * alone and errors[2] <= errors[0] * 1.001


@pytest.mark.parametrize("alpha", [4.0, 16.0])
def test_the_model_starts_at_q_plus_ba_whatever_alpha(alpha):
    layer = LoRALinear(nn.Linear(64, 24), r=4, alpha=alpha)
    W = layer.base.weight.detach().clone()
    loftq_init(layer)
    Q, B, A = loftq(W, r=4)
    torch.testing.assert_close(layer.base.weight, Q)
    torch.testing.assert_close(layer.delta_weight(), B @ A)  # s · (B / s) A: the paper's start


def test_a_loftq_model_and_checkpoint_are_peft_s(monkeypatch, tmp_path):
    """With α = r the paper's start and PEFT's agree: the same base, factors and logits; PEFT's
    checkpoint loads (the quantised base rebuilt from the original weights, as PEFT reloads it)."""
    monkeypatch.setattr("peft.tuners.lora.layer.loftq_init", peft_loftq_on_the_cpu())
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["down_proj"],
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2),
    )
    base = tiny_llama()
    ours, fresh = copy.deepcopy(base), copy.deepcopy(base)
    theirs = get_peft_model(base, config).eval()
    inject_loftq(ours, ["down_proj"], bits=4, iterations=2, r=4, alpha=4)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 1e-5
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))  # "training"
        theirs.save_pretrained(tmp_path)
        expected = theirs(input_ids=ids).logits
        loaded = load_peft_adapter(fresh, tmp_path)
        assert relative_error(loaded(input_ids=ids).logits, expected) <= 1e-5
        reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert relative_error(reloaded(input_ids=ids).logits, expected) <= 1e-6


def test_loftq_counts_trains_the_factors_and_refuses_other_bits():
    model = Tiny()
    inject_loftq(model, ["up", "down"], r=3, alpha=6)
    assert count_parameters(model)[0] == 3 * (13 + 29) + 3 * (29 + 7)  # LoRA's
    model(torch.randn(2, 13)).sum().backward()
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.grad is not None} == {"A", "B"}
    with pytest.raises(ValueError, match="bits 4 .* or 8"):
        loftq(torch.randn(4, 4), r=1, bits=2)


# ---- QA-LoRA ------------------------------------------------------------------------------------


def peft_qalora_update(layer: QALoRALinear, x: torch.Tensor) -> torch.Tensor:
    """PEFT's QA-LoRA forward (the variant its GPTQ layers use) on our layer's A and B, result 0."""
    module = types.SimpleNamespace(
        lora_A={"default": types.SimpleNamespace(weight=layer.A)},
        lora_B={"default": types.SimpleNamespace(weight=layer.B)},
        lora_dropout={"default": nn.Identity()},
        scaling={"default": layer.scale},
        qalora_group_size={"default": layer.group_size},
        in_features=layer.groups * layer.group_size,
        training=False,
    )
    return QALoraLinearVariant.forward(module, "default", x, torch.zeros(()))


def randomised_qalora(d_in=24, d_out=7, group_size=4, dtype=torch.float32):
    layer = QALoRALinear(nn.Linear(d_in, d_out).to(dtype), r=3, alpha=5, group_size=group_size)
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("shape", [(2, 24), (3, 5, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qalora_s_update_is_peft_s(shape, dtype):
    layer = randomised_qalora(dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        ours = layer(x) - nn.functional.linear(x, layer.weight(), layer.bias.to(dtype))
        theirs = peft_qalora_update(layer, x)
    assert relative_error(ours, theirs) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_qalora_s_a_is_as_wide_as_the_groups_and_the_count_is_the_formula():
    model = nn.Sequential(nn.Linear(24, 12), nn.GELU(), nn.Linear(12, 5))
    inject_qalora(model, ["0", "2"], r=3, group_size=4)
    layer = model[0]
    shell = types.SimpleNamespace(
        in_features=24,
        other_param_names=(),
        lora_A={"default": nn.Linear(24, 3, bias=False)},
    )
    QALoraLinearVariant.init(shell, "default", types.SimpleNamespace(qalora_group_size=4))
    assert layer.A.shape == shell.lora_A["default"].weight.shape == (3, 6)
    assert count_parameters(model)[0] == 3 * (24 // 4 + 12) + 3 * (12 // 4 + 5)  # r (d_in / group + d_out)
    model(torch.randn(2, 24)).sum().backward()
    assert {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.grad is not None} == {"A", "B"}


def test_the_base_is_the_groupwise_quantisation_and_the_start_is_it():
    base = nn.Linear(24, 7)
    layer = QALoRALinear(base, r=3, group_size=4, bits=4)
    codes, scales, offsets = quantise_groupwise(base.weight, 4)
    assert codes.max() <= 15 and torch.equal(layer.codes, codes)
    groups = base.weight.detach().reshape(7, 6, 4)
    error = (layer.weight().reshape(7, 6, 4) - groups).abs()
    assert torch.all(error <= scales[..., None] / 2 + 1e-6)  # each value within half a step of its group's grid
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight(), base.bias))  # B = 0


def test_merging_moves_only_the_offsets_and_keeps_the_output():
    model = nn.Sequential(nn.Linear(24, 12), nn.GELU(), nn.Linear(12, 5))
    inject_qalora(model, ["0", "2"], r=3, group_size=4)
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.B.normal_()
    codes, scales = model[0].codes.clone(), model[0].scales.clone()
    assert_merge_round_trip(model, merge_qalora, unmerge_qalora, torch.randn(4, 24))
    merge_qalora(model)
    assert torch.equal(model[0].codes, codes) and torch.equal(model[0].scales, scales)  # still the 4-bit grid
    assert not torch.equal(model[0].offsets, model[0].original_offsets)


def test_a_group_size_that_does_not_divide_the_inputs_is_refused():
    with pytest.raises(ValueError, match="group_size 5 must divide the layer's 24 inputs"):
        QALoRALinear(nn.Linear(24, 7), group_size=5)


def test_demo_learns():
    output = run_demo("reference_impls.lora_quant")
    losses = demo_losses(output)
    assert len(losses) == 3 and all(after < before / 10 for before, after in losses)
    assert "the 4-bit codes are unchanged: True" in output
