"""PiSSA, OLoRA, MiCA and KaSA against their definitions (the truncated SVD, the QR factors, the
residual base, the minor singular directions, the dropped components) and against HF PEFT: the same
starting factors and residual as its `init_lora_weights`, KaSA's loss, and its checkpoints loading
onto the original base model as PEFT loads them."""

import copy
import json

import pytest
import torch
from peft import KasaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_interop import save_with_nonzero_weights, tiny_llama
from test_lora import Tiny
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter
from reference_impls.lora import LoRALinear, merge_lora, unmerge_lora
from reference_impls.lora_inits import (
    KaSALinear,
    inject_initialised_lora,
    inject_kasa,
    kasa_penalty,
    mica_init,
    olora_init,
    pissa_init,
)

from helpers import assert_merge_round_trip, demo_losses, peft_and_ours, relative_error, run_demo


def layer_with(init, r=3, alpha=6.0, shape=(13, 9), niter=None):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(*shape), r=r, alpha=alpha)
    W = layer.base.weight.detach().clone()
    pissa_init(layer, niter) if init == "pissa" else olora_init(layer)
    return layer, W


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("shape", [(13, 9), (7, 20)])
def test_the_residual_plus_the_update_is_the_weight(init, shape):
    layer, W = layer_with(init, shape=shape)
    torch.testing.assert_close(layer.base.weight + layer.delta_weight(), W)
    x = torch.randn(4, shape[0])
    torch.testing.assert_close(layer(x), nn.functional.linear(x, W, layer.base.bias))  # the start is W x + b


def test_pissa_takes_the_top_singular_triplets_whatever_the_scale():
    for alpha in (3.0, 6.0, 24.0):
        layer, W = layer_with("pissa", alpha=alpha)
        U, S, Vh = torch.linalg.svd(W)
        torch.testing.assert_close(layer.delta_weight(), U[:, :3] * S[:3] @ Vh[:3])  # s·BA = W's rank-3 part
        torch.testing.assert_close(torch.linalg.svdvals(layer.base.weight)[:3], S[3:6])  # the rest is left


def test_the_fast_pissa_is_close_to_the_exact_one_and_keeps_the_sum_exact():
    torch.manual_seed(3)
    low_rank = torch.randn(40, 3) @ torch.randn(3, 30) + 0.01 * torch.randn(40, 30)
    layer = LoRALinear(nn.Linear(30, 40), r=3)
    with torch.no_grad():
        layer.base.weight.copy_(low_rank)
    pissa_init(layer, niter=4)
    torch.testing.assert_close(layer.base.weight + layer.delta_weight(), low_rank)
    assert torch.linalg.matrix_norm(layer.base.weight) < 0.05 * torch.linalg.matrix_norm(low_rank)


def test_olora_starts_b_orthonormal():
    layer, W = layer_with("olora")
    torch.testing.assert_close(layer.B.T @ layer.B, torch.eye(3))
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(layer.B @ layer.A, Q[:, :3] @ R[:3])


def test_mica_writes_into_the_least_used_output_directions_and_trains_only_a():
    torch.manual_seed(2)
    layer = LoRALinear(nn.Linear(13, 9), r=3)
    W = layer.base.weight.detach().clone()
    mica_init(layer)
    U = torch.linalg.svd(W)[0]
    torch.testing.assert_close(layer.B, U[:, -3:])  # the 3 smallest singular values' directions
    assert not layer.A.any() and not layer.B.requires_grad and torch.equal(layer.base.weight, W)
    with pytest.raises(ValueError, match="MiCA needs r"):
        mica_init(LoRALinear(nn.Linear(13, 4), r=5))
    model = Tiny()
    inject_initialised_lora(model, ["up", "down"], "mica", r=3)
    assert count_parameters(model)[0] == 3 * 13 + 3 * 29  # r · d_in: A alone


@pytest.mark.parametrize("init", ["pissa", "olora", "mica"])
def test_the_starting_factors_and_residual_are_peft_s(init):
    torch.manual_seed(1)
    base = Tiny()
    ours = copy.deepcopy(base)
    theirs = get_peft_model(base, LoraConfig(r=3, lora_alpha=5, init_lora_weights=init, target_modules=["up", "down"]))
    inject_initialised_lora(ours, ["up", "down"], init, r=3, alpha=5)
    for name in ("up", "down"):
        layer, their = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.A, their.lora_A["default"].weight)
        torch.testing.assert_close(layer.B, their.lora_B["default"].weight)
        torch.testing.assert_close(layer.base.weight, their.base_layer.weight)
        assert layer.B.requires_grad == their.lora_B["default"].weight.requires_grad  # MiCA freezes B, as PEFT


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_the_start_counts_and_gradients(init, dtype):
    plain = Tiny().to(dtype)
    model = copy.deepcopy(plain)
    inject_initialised_lora(model, ["up", "down"], init, r=3, alpha=6)
    x = torch.randn(3, 13, dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(model(x), plain(x), rtol=tolerance, atol=tolerance)
    assert count_parameters(model)[0] == 3 * (13 + 29) + 3 * (29 + 7)  # LoRA's
    model.float()(x.float()).pow(2).sum().backward()
    assert {name.rsplit(".", 1)[1] for name, p in model.named_parameters() if p.grad is not None} == {"A", "B"}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merging_at_the_start_gives_back_the_weight(init):
    plain = Tiny()
    model = copy.deepcopy(plain)
    inject_initialised_lora(model, ["up", "down"], init, r=3, alpha=6)
    merge_lora(model)
    torch.testing.assert_close(model.up.base.weight, plain.up.weight)
    unmerge_lora(model)
    with torch.no_grad():
        model.up.B.normal_()
    assert_merge_round_trip(model, merge_lora, unmerge_lora, torch.randn(4, 13))


@pytest.mark.parametrize(
    "options",
    [
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "olora"},
        {"init_lora_weights": "pissa", "use_dora": True},
        {"init_lora_weights": "mica"},
        {"kasa_config": KasaConfig()},
        {},
    ],
    ids=["pissa", "olora", "pissa_dora", "mica", "kasa", "plain"],
)
def test_a_checkpoint_loads_onto_the_original_base_as_peft_loads_it(options, tmp_path):
    """PEFT's in-memory model, PEFT's reload onto a fresh base and ours give the same logits, in bf16
    too: the residual (or truncated) base is rebuilt from the original weights (without it, PiSSA
    and OLoRA were 5% and 11% off on this model)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], **options)
    theirs, fresh = save_with_nonzero_weights(tiny_llama, config, tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ours = load_peft_adapter(fresh, tmp_path)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert relative_error(reloaded(input_ids=ids).logits, expected) <= 1e-6
        assert relative_error(ours(input_ids=ids).logits, expected) <= 1e-5
        ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
        assert relative_error(ours(input_ids=ids).logits, theirs(input_ids=ids).logits) <= 3e-2


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "lora_ga"])
def test_initialisations_whose_base_the_checkpoint_cannot_rebuild_are_refused_by_name(init, tmp_path):
    save_with_nonzero_weights(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init}))
    with pytest.raises(UnsupportedAdapter, match=f"init_lora_weights = '{init}' is not supported"):
        load_peft_adapter(tiny_llama(), tmp_path)


def test_a_failed_pissa_load_leaves_every_weight_as_it_was(tmp_path):
    config = LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"])
    save_with_nonzero_weights(tiny_llama, config, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors.pop(next(k for k in sorted(tensors) if "layers.1" in k and "lora_B" in k))  # the last layers break
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    model = tiny_llama()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with pytest.raises(UnsupportedAdapter, match="the model was left unchanged"):
        load_peft_adapter(model, tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_demo_learns():
    losses = demo_losses(run_demo("reference_impls.lora_inits"))
    assert len(losses) == 5 and all(after < 0.1 * before for before, after in losses[:3] + losses[4:])
    assert losses[3][1] < 0.8 * losses[3][0]  # MiCA: the toy task's shift lies mostly outside its directions


# ---- KaSA -------------------------------------------------------------------------------------------


def test_kasa_drops_the_smallest_singular_components_and_learns_singular_values():
    torch.manual_seed(4)
    base = nn.Linear(13, 9)
    W = base.weight.detach().clone()
    layer = KaSALinear(base, r=3, alpha=6)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(layer.base.weight, (U[:, :6] * S[:6]) @ Vh[:6])  # k − r = 9 − 3 kept
    with torch.no_grad():
        layer.B.normal_()
    expected = 2.0 * layer.B @ torch.diag(layer.diag) @ layer.A  # s = 6 / 3
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.randn(4, 13)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.T)
    with pytest.raises(ValueError, match="r must be below 9"):
        KaSALinear(nn.Linear(13, 9), r=9)


def test_kasa_counts_trains_a_b_and_the_diagonal_and_merges():
    model = Tiny()
    inject_kasa(model, ["up", "down"], r=3, alpha=6)
    assert count_parameters(model)[0] == 3 * (13 + 29 + 1) + 3 * (29 + 7 + 1)
    with torch.no_grad():
        model.up.B.normal_()
    (model(torch.randn(4, 13)).pow(2).sum() + kasa_penalty(model)).backward()
    trained = {name.rsplit(".", 1)[1] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {"A", "B", "diag"}
    assert_merge_round_trip(model, merge_lora, unmerge_lora, torch.randn(4, 13))


def test_kasa_penalty_is_peft_s_kasa_loss(tmp_path):
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], kasa_config=KasaConfig(beta=0.01, gamma=0.1))
    theirs, ours = peft_and_ours(Tiny, config, tmp_path)
    torch.testing.assert_close(kasa_penalty(ours, beta=0.01, gamma=0.1), theirs.base_model._get_kasa_loss())
