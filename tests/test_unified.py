"""UniPELT against AdapterHub's UniPELTConfig; VL-PET's four granularities against their equations."""

import copy

import pytest
import torch

from reference_impls._plumbing import count_parameters
from reference_impls.unified import (
    GRANULARITIES,
    VL_PET_LARGE,
    VL_PET_MIDDLE_X,
    VL_PET_MIDDLE_Y,
    VL_PET_SMALL,
    GatedAdapter,
    GatedLoRALinear,
    GatedPrefixSelfAttention,
    VLPETBlock,
    inject_unipelt,
    inject_vl_pet,
    unipelt_parameters,
    vl_pet_parameters,
)

from helpers import copy_adapterhub_prefix, demo_losses, tiny_bert


def adapterhub_unipelt(base):
    import adapters
    from adapters import UniPELTConfig

    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("task", config=UniPELTConfig())
    theirs.set_active_adapters("task")
    return theirs


def copy_from_adapterhub(ours, theirs):
    """Random non-zero values in every AdapterHub UniPELT tensor, copied into ours."""
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if ".task." in name or name.endswith(".task.weight") or name.endswith(".task.bias"):
                parameter.normal_(0, 0.3)
        hub_prefix = theirs.encoder.layer[0].attention.self.prefix_tuning.pool.prefix_tunings["task"].self_prefix
        copy_adapterhub_prefix(ours.prefixes, hub_prefix)
        for mine, hub in zip(ours.encoder.layer, theirs.encoder.layer):
            for name in ("query", "value"):
                lora, hub_lora = (
                    getattr(mine.attention.self.attention, name),
                    getattr(hub.attention.self, name).loras["task"],
                )
                lora.A.copy_(hub_lora.lora_A)
                lora.B.copy_(hub_lora.lora_B)
                lora.gate.linear.load_state_dict(hub_lora.gate.state_dict())
            mine.attention.self.gate.linear.load_state_dict(
                hub.attention.self.prefix_tuning.prefix_gates["task"].state_dict()
            )
            hub_adapter, gated = hub.output.adapters["task"], mine.output.adapter
            gated.adapter.down.load_state_dict(hub_adapter.adapter_down[0].state_dict())
            gated.adapter.up.load_state_dict(hub_adapter.adapter_up.state_dict())
            gated.gate.linear.load_state_dict(hub_adapter.gate.state_dict())


def test_unipelt_equals_adapterhub_on_a_tiny_bert():
    base = tiny_bert()
    theirs = adapterhub_unipelt(base)
    ours = copy.deepcopy(base)
    inject_unipelt(ours, r=8, n=10, prefix_hidden=512, m=2)  # AdapterHub's defaults; m = 32 / 16
    copy_from_adapterhub(ours, theirs)
    ids = torch.randint(0, 99, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 5:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Every gate matters: a gate closed in ours alone changes the output.
    with torch.no_grad():
        ours.encoder.layer[1].output.adapter.gate.linear.bias.fill_(-30.0)
        assert (ours(input_ids=ids, attention_mask=mask).last_hidden_state - expected).abs().max() > 1e-3


def test_unipelt_parameter_count_and_gradients():
    model = tiny_bert()
    inject_unipelt(model, r=4, n=5, prefix_hidden=16, m=3)
    trainable, _ = count_parameters(model)
    assert trainable == unipelt_parameters(d=32, layers=2, r=4, n=5, k=16, m=3)
    ids = torch.randint(0, 99, (2, 7))
    model(input_ids=ids).last_hidden_state.sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
    trained = {
        type(module).__name__
        for module in model.modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
    assert {"Linear", "Parameter"} & trained or trained  # the gates' and adapters' linears
    assert not any(p.requires_grad for p in model.embeddings.parameters())
    assert all(isinstance(layer.attention.self, GatedPrefixSelfAttention) for layer in model.encoder.layer)
    assert all(isinstance(layer.attention.self.attention.query, GatedLoRALinear) for layer in model.encoder.layer)
    assert all(isinstance(layer.output.adapter, GatedAdapter) for layer in model.encoder.layer)


def test_a_gated_lora_layer_follows_its_equation():
    layer = GatedLoRALinear(torch.nn.Linear(13, 7), r=3)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 5, 13)
    gate = torch.sigmoid(layer.gate.linear(x)).mean(dim=1, keepdim=True)
    expected = layer.base(x) + gate * (x @ layer.A.T @ layer.B.T)
    torch.testing.assert_close(layer(x), expected)


# ---- VL-PET ---------------------------------------------------------------------------------------


def vl_pet_model(config, m=5):
    model = tiny_bert(hidden=32, intermediate=40)
    targets = inject_vl_pet(model, ["attention.output", "output"], m=m, **config)
    return model, targets


@pytest.mark.parametrize(
    "config",
    [VL_PET_LARGE, VL_PET_MIDDLE_X, VL_PET_MIDDLE_Y, VL_PET_SMALL],
    ids=["large", "middleX", "middleY", "small"],
)
def test_vl_pet_block_follows_its_equation(config):
    model, targets = vl_pet_model({**config, "gate_rank": 6} if "gate_rank" in config else config)
    assert len(targets) == 4
    block = model.encoder.layer[0].output
    assert isinstance(block, VLPETBlock)
    with torch.no_grad():
        for parameter in block.adapter.parameters():
            parameter.normal_(0, 0.2)
    hidden, residual = torch.randn(2, 6, 40), torch.randn(2, 6, 32)
    h = block.block.dense(hidden)
    u = h + block.adapter.up(torch.nn.functional.gelu(block.adapter.down(h), approximate="tanh"))
    gate = block.gate
    granularity = config["granularity"]
    if granularity == "large":
        G = torch.sigmoid(gate.up(torch.nn.functional.gelu(gate.down(residual), approximate="tanh")))
        shape = (2, 6, 32)
    elif granularity == "middle_x":
        G, shape = torch.sigmoid((residual + u) @ gate.score.weight.T + gate.score.bias), (2, 6, 1)
    elif granularity == "middle_y":
        G, shape = 1 + gate.g, (32,)
    else:
        G = torch.sigmoid(torch.cat([residual, u], -1) @ gate.score.weight.T + gate.score.bias).mean(1, keepdim=True)
        shape = (2, 1, 1)
    assert tuple(gate(residual, u).shape) == shape  # its granularity
    expected = block.block.LayerNorm(residual + G * u)
    torch.testing.assert_close(block(hidden, residual), expected)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_vl_pet_parameter_count_and_what_trains(granularity):
    model, targets = vl_pet_model({"granularity": granularity, "gate_rank": 6}, m=5)
    trainable, _ = count_parameters(model)
    assert trainable == len(targets) * vl_pet_parameters(32, 5, granularity, gate_rank=6)
    model(input_ids=torch.randint(0, 99, (2, 7))).last_hidden_state.sum().backward()
    layer_norm = model.encoder.layer[1].attention.output.block.LayerNorm
    assert layer_norm.weight.grad is not None  # the encoder's LayerNorms train too
    assert model.encoder.layer[1].attention.output.block.dense.weight.grad is None
    assert all(p.grad is None for p in model.embeddings.parameters())


def test_vl_pet_refuses_what_is_not_an_add_and_norm_block():
    with pytest.raises(ValueError, match="Add & Norm"):
        inject_vl_pet(tiny_bert(), ["intermediate"], m=4)
    with pytest.raises(ValueError, match="granularity"):
        inject_vl_pet(tiny_bert(), ["output"], m=4, granularity="medium")


def test_bf16_runs_close_to_fp32():
    model, _ = vl_pet_model(VL_PET_MIDDLE_X)
    unipelt = tiny_bert()
    inject_unipelt(unipelt, r=4, n=4, prefix_hidden=16, m=2)
    ids = torch.randint(0, 99, (2, 9))
    for network in (model, unipelt):
        with torch.no_grad():
            expected = network(input_ids=ids).last_hidden_state
            got = copy.deepcopy(network).to(torch.bfloat16)(input_ids=ids).last_hidden_state
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=0.1, atol=0.1)


def test_demo_runs_and_every_method_learns(capsys):
    from reference_impls.unified import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 5 and all(after < 0.5 * before for before, after in losses)
