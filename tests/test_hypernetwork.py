"""HyperFormer++ against its equations and its parameter-count formula."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import count_parameters
from reference_impls.hypernetwork import (
    GeneratedAdapter,
    HyperAdapter,
    HyperNetwork,
    inject_hyperformer,
    inject_udapter,
    use_language,
    use_task,
)

from helpers import demo_losses

D = 13


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.ffn = nn.Linear(D, D), nn.Sequential(nn.Linear(D, 29), nn.GELU(), nn.Linear(29, D))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.ffn(x)


def model_of(layers=3):
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(layers)])


def randomise(hypernetwork):
    with torch.no_grad():
        for parameter in hypernetwork.parameters():
            parameter.normal_(0, 0.3)


def test_places_and_layers_come_from_the_target_names():
    model = model_of()
    inject_hyperformer(model, ["attn", "ffn"], tasks=2, m=3, t=4, hidden=6, t_projected=5)
    adapters = {
        name: (module.layer, module.place) for name, module in model.named_modules() if isinstance(module, HyperAdapter)
    }
    assert adapters == {f"{i}.{name}": (i, place) for i in range(3) for place, name in enumerate(["attn", "ffn"])}
    hypernetworks = {id(module) for module in model.modules() if isinstance(module, HyperNetwork)}
    assert len(hypernetworks) == 1  # one, shared by all six places


def test_parameter_count_is_the_papers_formula_and_does_not_grow_with_layers():
    T, t, k, tp, m = 3, 4, 6, 5, 3
    formula = (
        T * t
        + (3 + 2) * t
        + (3 * t * k + k)
        + (k * tp + tp)
        + 2 * tp
        + 2 * (tp * D * m + D * m)
        + (tp * m + m)
        + (tp * D + D)
        + 2 * (tp * D + D)
    )
    for layers in (3, 5):
        model = model_of(layers)
        inject_hyperformer(model, ["attn", "ffn"], tasks=T, m=m, t=t, hidden=k, t_projected=tp)
        assert count_parameters(model)[0] == formula + (2 * t if layers == 5 else 0)  # + a layer embedding each


def test_each_adapter_follows_the_equations():
    model = model_of()
    hypernetwork = inject_hyperformer(model, ["attn", "ffn"], tasks=2, m=3, t=4, hidden=6, t_projected=5)
    randomise(hypernetwork)
    adapter, x = model[2].ffn, torch.randn(2, 7, D)
    with torch.no_grad():
        project = hypernetwork.project
        joined = torch.cat([hypernetwork.tasks.weight[1], hypernetwork.layers.weight[2], hypernetwork.places.weight[1]])
        hidden = torch.relu(joined @ project[0].weight.T + project[0].bias)
        I = F.layer_norm(hidden @ project[2].weight.T + project[2].bias, (5,), project[3].weight, project[3].bias)

        def generated(linear, *shape):
            return (linear.weight @ I + linear.bias).view(*shape)

        D_, U_ = generated(hypernetwork.down, 3, D), generated(hypernetwork.up, D, 3)
        h = adapter.sublayer(x)
        a = torch.nn.functional.gelu(h @ D_.T + generated(hypernetwork.down_bias, 3)) @ U_.T + generated(
            hypernetwork.up_bias, D
        )
        mean, var = a.mean(-1, keepdim=True), a.var(-1, unbiased=False, keepdim=True)
        expected = (
            h
            + (a - mean) / torch.sqrt(var + 1e-5) * generated(hypernetwork.norm_weight, D)
            + generated(hypernetwork.norm_bias, D)
        )
        with use_task(model, 1):
            torch.testing.assert_close(adapter(x), expected)


def test_tasks_differ_only_the_hypernetwork_trains_and_a_task_must_be_named():
    model = model_of()
    hypernetwork = inject_hyperformer(model, ["attn", "ffn"], tasks=2, m=3, t=4, hidden=6, t_projected=5)
    randomise(hypernetwork)
    x = torch.randn(4, D)
    with use_task(model, 0):
        first = model(x)
    with use_task(model, 1):
        second = model(x)
    assert (first - second).abs().max() > 1e-3
    second.sum().backward()
    assert {name.split(".")[-2] for name, p in model.named_parameters() if p.grad is not None} >= {
        "down",
        "up",
        "tasks",
    }
    assert all(p.grad is None for name, p in model.named_parameters() if "sublayer" in name)
    with pytest.raises(ValueError, match="use_task"):
        model(x)  # outside the block, no task is set


def test_state_dict_round_trip():
    model = model_of()
    randomise(inject_hyperformer(model, ["attn", "ffn"], tasks=2, m=3, t=4, hidden=6, t_projected=5))
    fresh = model_of()
    inject_hyperformer(fresh, ["attn", "ffn"], tasks=2, m=3, t=4, hidden=6, t_projected=5)
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    x = torch.randn(3, D)
    with torch.no_grad(), use_task(model, 1), use_task(fresh, 1):
        torch.testing.assert_close(fresh(x), model(x))


def test_demo_runs_and_learns_both_tasks_and_the_unseen_language(capsys):
    from reference_impls.hypernetwork import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 4 and all(after < 0.8 * before for before, after in losses)


FEATURES = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.3, 0.3, 0.0]])  # 3 languages, 3 features


def test_udapter_generates_adapters_from_language_features():
    model = model_of()
    language = inject_udapter(model, ["ffn"], FEATURES, m=4, k=5, hidden=6)
    adapter = model[1].ffn
    assert isinstance(adapter, GeneratedAdapter)
    with torch.no_grad():
        for parameter in (adapter.down, adapter.down_bias, adapter.up, adapter.up_bias):
            parameter.normal_(0, 0.3)
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        project = language.project
        e = project[2](torch.relu(project[0](FEATURES[2])))
        down = sum(e[j] * adapter.down[j] for j in range(5))
        up = sum(e[j] * adapter.up[j] for j in range(5))
        h = adapter.sublayer(x)
        expected = h + F.gelu(h @ down.T + e @ adapter.down_bias) @ up.T + e @ adapter.up_bias
        with use_language(model, 2):
            torch.testing.assert_close(adapter(x), expected)
            third = model(x)
        with use_language(model, 0):
            assert (model(x) - third).abs().max() > 1e-3
    with pytest.raises(ValueError, match="use_language"):
        model(x)


def test_udapter_parameter_count_and_gradients():
    model = model_of()
    inject_udapter(model, ["attn", "ffn"], FEATURES, m=4, k=5, hidden=6)
    per_place = 5 * (4 * D + 4 + D * 4 + D)
    assert count_parameters(model)[0] == 6 * per_place + (3 * 6 + 6) + (6 * 5 + 5)  # 3 layers × 2 places + the MLP
    with use_language(model, 1):
        model(torch.randn(4, D)).sum().backward()
    assert all(p.grad is None for name, p in model.named_parameters() if "sublayer" in name)
    assert model[0].attn.language.project[0].weight.grad is not None


def test_udapter_in_bfloat16():
    model = model_of().to(torch.bfloat16)
    language = inject_udapter(model, ["ffn"], FEATURES, m=4, k=5, hidden=6)
    assert language.features.dtype == torch.bfloat16
    with use_language(model, 0):
        y = model(torch.randn(3, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_bfloat16_model_gets_a_bfloat16_hypernetwork():
    model = model_of().to(torch.bfloat16)
    hypernetwork = inject_hyperformer(model, ["attn", "ffn"], tasks=2, m=3, t=4, hidden=6, t_projected=5)
    assert {p.dtype for p in hypernetwork.parameters()} == {torch.bfloat16}
    with use_task(model, 1):
        y = model(torch.randn(3, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert hypernetwork.down.weight.grad is not None


# ---- MAD-G -------------------------------------------------------------------------------------------


def test_mad_g_generates_each_layers_adapter_from_features_and_layer():
    from reference_impls.bottleneck import SequentialAdapter
    from reference_impls.hypernetwork import GeneratedLanguageAdapter, inject_mad_g

    model = model_of()
    generator = inject_mad_g(model, ["ffn"], FEATURES, m=4, d_language=5, d_layer=3)
    randomise(generator)
    assert all(isinstance(model[i].ffn, SequentialAdapter) for i in range(3))
    assert {module.generator[0] for module in model.modules() if isinstance(module, GeneratedLanguageAdapter)} == {
        generator
    }  # one generator for every layer
    u = torch.randn(2, 4, D)
    with use_language(model, 1), torch.no_grad():
        adapter = model[2].ffn.adapter
        z = torch.cat([generator.language_projection.weight @ FEATURES[1], generator.layer_embeddings.weight[2]])
        theta = generator.generate.weight @ z + generator.generate.bias
        down, b_down = theta[: 4 * D].view(4, D), theta[4 * D : 4 * D + 4]
        up, b_up = theta[4 * D + 4 : 8 * D + 4].view(D, 4), theta[8 * D + 4 :]
        torch.testing.assert_close(adapter(u), F.relu(u @ down.T + b_down) @ up.T + b_up)
    with use_language(model, 1), torch.no_grad():
        assert (model[1].ffn.adapter(u) - model[2].ffn.adapter(u)).abs().max() > 1e-3  # the layer embedding
    with torch.no_grad():
        with use_language(model, 0):
            first = model[2].ffn.adapter(u)
        with use_language(model, 1):
            second = model[2].ffn.adapter(u)
    assert (first - second).abs().max() > 1e-3  # other features, other adapter
    with pytest.raises(ValueError, match="which language"):
        model(u)


def test_mad_g_parameters_and_gradients():
    from reference_impls.hypernetwork import inject_mad_g, mad_g_parameters

    model = model_of()
    inject_mad_g(model, ["ffn"], FEATURES, m=4, d_language=5, d_layer=3)
    trainable, _ = count_parameters(model)
    assert trainable == mad_g_parameters(features=3, layers=3, d=D, m=4, d_language=5, d_layer=3)
    with use_language(model, 2):
        model(torch.randn(3, D)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == ("shared_generator" in name), name
    assert "0.ffn.adapter.shared_generator.features" in model.state_dict()  # the table travels with the model


def test_mad_g_in_madx_place_on_a_bert():
    from reference_impls.bottleneck import AddNormAdapter
    from reference_impls.hypernetwork import inject_mad_g

    from helpers import tiny_bert

    model = tiny_bert()
    generator = inject_mad_g(model, [f"encoder.layer.{i}.output" for i in range(2)], FEATURES, m=4)
    layers = [name for name, module in model.named_modules() if isinstance(module, AddNormAdapter)]
    assert layers == ["encoder.layer.0.output", "encoder.layer.1.output"]
    randomise(generator)
    ids = torch.randint(0, 99, (2, 7))
    with use_language(model, 0), torch.no_grad():
        adapted = model(input_ids=ids).last_hidden_state
    assert (adapted - tiny_bert()(input_ids=ids).last_hidden_state).abs().max() > 1e-2
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with use_language(bf16, 0), torch.no_grad():
        assert bf16(input_ids=ids).last_hidden_state.dtype == torch.bfloat16
