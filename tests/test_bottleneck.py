"""Bottleneck adapters against the papers' formulas and, for Houlsby, Pfeiffer and (scaled) parallel, against
AdapterHub `adapters`."""

import copy

import pytest
import torch
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.bottleneck import (
    ADAPTER_PLUS,
    BAPNA_FIRAT,
    HOULSBY,
    PARALLEL,
    PFEIFFER,
    SCALED_PARALLEL,
    Adapter,
    drop_adapters,
    inject_adapters,
    orthogonality_penalty,
)

from helpers import assert_same_encoding, demo_losses, tiny_bert


def block(d=21, d_ff=37):
    """A sublayer like a Transformer FFN, with odd widths."""
    return nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = block()
        self.out = nn.Linear(21, 21)

    def forward(self, x):
        return self.out(self.ffn(x))


def randomise(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Adapter):
                for parameter in module.parameters():
                    parameter.normal_(0, 0.5)


@pytest.mark.parametrize("config", [HOULSBY, SCALED_PARALLEL, BAPNA_FIRAT])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_initialisation(config, dtype):
    model = Net().to(dtype)
    reference = copy.deepcopy(model)
    inject_adapters(model, ["ffn"], m=5, **config)
    x = torch.randn(2, 7, 21, dtype=dtype)
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("config, extra", [(HOULSBY, 0), (BAPNA_FIRAT, 2 * 21)])
def test_parameter_count(config, extra):
    model = Net()
    inject_adapters(model, ["ffn", "out"], m=5, **config)
    assert count_parameters(model)[0] == 2 * (2 * 21 * 5 + 21 + 5 + extra)  # 2·d·m + d + m (+ 2d) per adapter


def test_sequential_and_parallel_follow_their_equations():
    x = torch.randn(4, 21)
    for config in (HOULSBY, SCALED_PARALLEL, BAPNA_FIRAT):
        model = Net()
        sublayer = copy.deepcopy(model.ffn)
        inject_adapters(model, ["ffn"], m=6, **config)
        randomise(model)
        a = model.ffn.adapter
        f = {"swish": nn.functional.silu, "relu": nn.functional.relu}[config["activation"]]
        norm = (
            (lambda h: nn.functional.layer_norm(h, (21,), a.norm.weight, a.norm.bias))
            if config.get("layer_norm")
            else (lambda h: h)
        )
        adapter = lambda h: a.scale * (f(norm(h) @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
        h = sublayer(x)
        expected = h + adapter(h) if config["placement"] == "sequential" else h + adapter(x)
        torch.testing.assert_close(model.ffn(x), expected)
    assert SCALED_PARALLEL["scale"] == 4.0


def test_gradients_reach_only_the_adapters():
    model = Net()
    inject_adapters(model, ["ffn", "out"], m=4, **HOULSBY)
    randomise(model)
    model(torch.randn(3, 21)).sum().backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (".adapter." in name), name


def test_orthogonality_penalty():
    model = Net()
    inject_adapters(model, ["ffn"], m=4, track=True, **HOULSBY)
    with pytest.raises(ValueError, match="track=True"):
        orthogonality_penalty(Net())
    model(torch.randn(5, 21))
    assert orthogonality_penalty(model).item() == 0  # the adapter adds nothing yet
    randomise(model)
    h = model.ffn.sublayer(x := torch.randn(5, 21))
    model(x)
    a = model.ffn.adapter(h)
    penalty = orthogonality_penalty(model)
    torch.testing.assert_close(penalty, ((a.T @ h) ** 2).sum())
    penalty.backward()
    assert model.ffn.adapter.up.weight.grad is not None and model.ffn.sublayer[0].weight.grad is None


def test_bad_placements_are_refused():
    with pytest.raises(ValueError, match="equal input and output widths"):
        inject_adapters(nn.Sequential(nn.Linear(4, 6)), ["0"], m=2, placement="parallel")
    with pytest.raises(ValueError, match="placement"):
        inject_adapters(Net(), ["ffn"], placement="diagonal")


def hub_config(name: str):
    from adapters import DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

    return {
        "houlsby": DoubleSeqBnConfig(reduction_factor=4),
        "pfeiffer": SeqBnConfig(reduction_factor=4),
        "parallel": ParBnConfig(reduction_factor=4, scaling=1.0),
        "scaled parallel": ParBnConfig(reduction_factor=4),
    }[name]  # ParBn's default scaling is 4


@pytest.mark.parametrize(
    "hub, config, places, suffix",
    [
        ("houlsby", HOULSBY, ("attention.output", "output"), ".dense"),  # around the dense layer
        ("houlsby", HOULSBY, ("attention.output", "output"), ""),  # around the Add & Norm block: the same
        ("pfeiffer", PFEIFFER, ("output",), ""),
        ("parallel", PARALLEL, ("output",), ""),
        ("scaled parallel", SCALED_PARALLEL, ("output",), ""),
        ("parallel", PARALLEL, ("attention.output", "output"), ""),  # beside attention too (ParBn with mh_adapter)
    ],
)
def test_placements_equal_adapterhub_on_a_tiny_bert(hub, config, places, suffix):
    """Each paper's configuration computes what the authors' library computes with the same weights."""
    import adapters

    base = tiny_bert()
    ours = copy.deepcopy(base)
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    their_config = hub_config(hub)
    if places == ("attention.output", "output") and hub != "houlsby":
        their_config = their_config.replace(mh_adapter=True)
    theirs.add_adapter("task", config=their_config)
    theirs.set_active_adapters("task")
    targets = [f"encoder.layer.{i}.{where}{suffix}" for i in range(2) for where in places]
    inject_adapters(ours, targets, m=8, **config)
    assert count_parameters(ours)[0] == len(targets) * (2 * 32 * 8 + 32 + 8)
    with torch.no_grad():
        for target in targets:
            hub_adapter = theirs.get_submodule(target.removesuffix(suffix)).adapters["task"]
            mine = ours.get_submodule(target).adapter
            for source, destination in ((hub_adapter.adapter_down[0], mine.down), (hub_adapter.adapter_up, mine.up)):
                source.weight.normal_(0, 0.2)
                source.bias.normal_(0, 0.2)
                destination.weight.copy_(source.weight)
                destination.bias.copy_(source.bias)
    assert_same_encoding(ours, theirs, base)


def test_after_norm_needs_an_add_and_norm_block():
    with pytest.raises(ValueError, match="after_norm.*needs a post-norm output block"):
        inject_adapters(Net(), ["out"], m=2, **PFEIFFER)


def test_add_norm_adapters_drop_and_track():
    base = tiny_bert()
    model = copy.deepcopy(base)
    targets = ["encoder.layer.0.output", "encoder.layer.1.output"]  # "output" alone would match attention.output too
    inject_adapters(model, targets, m=4, track=True, **PFEIFFER)
    assert [name for name, module in model.named_modules() if hasattr(module, "placement")] == targets
    randomise(model)
    ids = torch.randint(0, 99, (2, 7))
    model(input_ids=ids).last_hidden_state.sum().backward()
    assert orthogonality_penalty(model) > 0
    drop_adapters(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state)


def test_demo_runs_and_learns(capsys):
    from reference_impls.bottleneck import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 3 and all(after < before for before, after in losses)


def test_adapter_drop_switches_off_the_lowest_adapters():
    from reference_impls.bottleneck import drop_adapters

    model = Net()
    inject_adapters(model, ["ffn", "out"], m=4, **HOULSBY)
    randomise(model)
    x = torch.randn(3, 21)
    full = model(x)
    assert drop_adapters(model, 1) == ["ffn"]
    assert model.ffn.dropped and not model.out.dropped
    torch.testing.assert_close(model(x), model.out(model.ffn.sublayer(x)))  # the lowest adapter is gone
    drop_adapters(model, 0)
    torch.testing.assert_close(model(x), full)


# ---- Adapter+ -----------------------------------------------------------------------------------


def test_adapter_plus_equals_adapterhub_on_a_tiny_bert():
    """AdapterHub's AdapterPlusConfig after each FFN Add & Norm: the same encodings, channel scales included
    (its stochastic depth off: it needs torchvision, see below)."""
    import adapters
    from adapters import AdapterPlusConfig

    base = tiny_bert()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("task", config=AdapterPlusConfig(reduction_factor=4, stochastic_depth=0.0))
    theirs.set_active_adapters("task")
    targets = [f"encoder.layer.{i}.output" for i in range(2)]
    inject_adapters(ours, targets, m=8, **{**ADAPTER_PLUS, "drop_path": 0.0})
    assert count_parameters(ours)[0] == len(targets) * (2 * 32 * 8 + 8 + 2 * 32)  # 2dm + m + 2d
    with torch.no_grad():
        for target in targets:
            hub, mine = theirs.get_submodule(target).adapters["task"], ours.get_submodule(target).adapter
            for source, destination in ((hub.adapter_down[0], mine.down), (hub.adapter_up, mine.up)):
                source.weight.normal_(0, 0.2), source.bias.normal_(0, 0.2)
                destination.weight.copy_(source.weight), destination.bias.copy_(source.bias)
            hub.scaling.uniform_(0.5, 1.5)
            mine.channel_scale.copy_(hub.scaling)
    assert_same_encoding(ours, theirs, base)


def test_adapterhub_s_stochastic_depth_needs_torchvision():
    import importlib.util

    import adapters
    from adapters import AdapterPlusConfig

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    model = tiny_bert()
    adapters.init(model)
    with pytest.raises(ImportError, match="torchvision"):
        model.add_adapter("task", config=AdapterPlusConfig(reduction_factor=4))


def test_adapter_plus_starts_near_the_identity_with_houlsby_s_initialisation():
    torch.manual_seed(0)
    adapter = Adapter(64, 8, "gelu", scale="channel", init="houlsby").eval()
    for linear in (adapter.down, adapter.up):
        assert linear.weight.abs().max() <= 2e-2 and linear.weight.std().item() == pytest.approx(1e-2, rel=0.3)
        assert not linear.bias.any()
    with torch.no_grad():
        assert 0 < adapter(torch.randn(16, 64)).abs().max() < 1e-2  # near, not exactly, zero (inputs of size 1)
    assert torch.equal(adapter.channel_scale, torch.ones(64))


def test_stochastic_depth_drops_whole_samples_and_keeps_the_mean():
    adapter = Adapter(6, 3, "gelu", init="houlsby", drop_path=0.25)
    with torch.no_grad():
        adapter.up.bias.fill_(1.0)  # a constant branch output: 1 everywhere
        adapter.up.weight.zero_()
    h = torch.randn(4000, 5, 6)
    with torch.no_grad():
        out = adapter.train()(h)
    per_sample = out.reshape(4000, -1)
    kept = per_sample[:, 0] != 0
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))  # all or nothing
    assert not per_sample[~kept].any()
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)  # E[ξ / (1 − p)] = 1
    with torch.no_grad():
        assert torch.equal(adapter.eval()(h), torch.ones_like(h))  # no dropping at inference
    with pytest.raises(ValueError, match="drop_path"):
        Adapter(6, 3, drop_path=1.0)


def test_adapter_plus_on_a_pre_norm_sublayer_is_sequential():
    """Outside an Add & Norm block it reads and corrects the sublayer's output: F(x) + A⁺(F(x))."""
    model = Net()
    plain = copy.deepcopy(model)
    inject_adapters(model, ["ffn"], m=4, **{**ADAPTER_PLUS, "drop_path": 0.0})
    adapter = model.ffn.adapter
    with torch.no_grad():
        adapter.channel_scale.normal_()
    x = torch.randn(3, 5, 21)
    h = plain.ffn(x)
    expected = plain.out(h + adapter.channel_scale * adapter.up(adapter.f(adapter.down(h))))
    torch.testing.assert_close(model(x), expected)
