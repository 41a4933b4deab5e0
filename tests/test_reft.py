"""LoReFT against its equation and against AdapterHub `adapters` on a tiny BERT."""

import copy

import torch
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.reft import InterventionLayer, LoReFT, inject_loreft

from helpers import assert_same_encoding, demo_losses, tiny_bert


def test_intervention_follows_the_equation_and_keeps_R_orthonormal():
    unit = LoReFT(d=13, r=3)
    R = unit.R.weight
    torch.testing.assert_close(R @ R.T, torch.eye(3), rtol=1e-5, atol=1e-5)
    h = torch.randn(4, 13)
    W, b = unit.source.weight, unit.source.bias
    torch.testing.assert_close(unit(h), h + (h @ W.T + b - h @ R.T) @ R)
    # Inside the subspace, R Φ(h) = W h + b: the representation is moved exactly to the target.
    torch.testing.assert_close(unit(h) @ R.T, h @ W.T + b, rtol=1e-5, atol=1e-5)
    # Orthogonal to it, nothing changes.
    orthogonal_part = lambda x: x - (x @ R.T) @ R
    torch.testing.assert_close(orthogonal_part(unit(h)), orthogonal_part(h), rtol=1e-5, atol=1e-5)


def test_only_the_chosen_positions_change_and_parameters_count():
    layer = InterventionLayer(nn.Linear(13, 13), d=13, r=2, prefix=2, suffix=3)
    plain = layer.layer(x := torch.randn(2, 9, 13))
    out = layer(x)
    assert torch.equal(out[:, 2:-3], plain[:, 2:-3])
    assert not torch.allclose(out[:, :2], plain[:, :2]) and not torch.allclose(out[:, -3:], plain[:, -3:])
    model = nn.Sequential(nn.Linear(13, 13), nn.Linear(13, 13))
    inject_loreft(model, ["0", "1"], d=13, r=2, prefix=2, suffix=3)
    assert count_parameters(model)[0] == 2 * 2 * (2 * 2 * 13 + 2)  # layers · units · (2rd + r)
    tied = nn.Sequential(nn.Linear(13, 13))
    inject_loreft(tied, ["0"], d=13, r=2, prefix=2, suffix=3, tied=True)
    assert count_parameters(tied)[0] == 2 * 2 * 13 + 2


def test_gradients_reach_only_the_interventions():
    model = nn.Sequential(nn.Linear(13, 13), nn.GELU(), nn.Linear(13, 13))
    inject_loreft(model, ["0"], d=13, r=2, prefix=1, suffix=1)
    model(torch.randn(2, 5, 13)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == ("first" in name or "last" in name), name


def test_loreft_equals_adapterhub_on_a_tiny_bert():
    import adapters
    from adapters import LoReftConfig

    base = tiny_bert()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("task", config=LoReftConfig(r=2, prefix_positions=3, suffix_positions=2, dropout=0.0))
    theirs.set_active_adapters("task")
    inject_loreft(ours, [f"encoder.layer.{i}" for i in range(2)], d=32, r=2, prefix=3, suffix=2)
    hub_modules = [module for module in theirs.modules() if type(module).__name__ == "ReftModule"]
    assert len(hub_modules) == 2
    with torch.no_grad():
        for index, hub in enumerate(hub_modules):
            mine = ours.encoder.layer[index]
            for unit, destination in zip(hub.units, (mine.first, mine.last)):
                unit.learned_source.weight.normal_()
                unit.learned_source.bias.normal_()
                destination.source.load_state_dict(unit.learned_source.state_dict())
                destination.R.weight = unit.projection.weight  # through the orthogonal parametrisation
    assert_same_encoding(ours, theirs, base, length=10)


def test_demo_runs_and_learns(capsys):
    from reference_impls.reft import demo

    demo()
    [(before, after)] = demo_losses(capsys.readouterr().out)
    assert after < before * 0.9


def test_bf16_matches_fp32():
    model = nn.Sequential(nn.Linear(13, 13), nn.GELU(), nn.Linear(13, 13))
    inject_loreft(model, ["0"], d=13, r=3, prefix=2, suffix=2)
    x = torch.randn(2, 7, 13)
    expected = model(x)
    torch.testing.assert_close(
        copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float(), expected, rtol=5e-2, atol=5e-2
    )
