"""Fusion and stacking against their equations and against AdapterHub `adapters`; arithmetic on
trained modules against the definitions of Zhang et al."""

import copy
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.bottleneck import PFEIFFER, Adapter, inject_adapters
from reference_impls.composition import (
    ComposedAdapters,
    Fusion,
    InvertibleAdapter,
    add_modules,
    fusion_penalty,
    inject_composition,
    inject_invertible,
    load_adapter,
    negate,
)
from reference_impls.ia3 import inject_ia3
from reference_impls.lora import inject_lora

from helpers import assert_same_encoding, demo_losses, tiny_bert


def ffn(d=21, d_ff=37):
    return nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))


def net(*head):
    """A model whose FFN is the module named "ffn" (a name no inner layer shares)."""
    return nn.Sequential(OrderedDict(ffn=ffn(), **{f"head{i}": layer for i, layer in enumerate(head)}))


def randomise(model, std=0.5):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (Adapter, Fusion)):
                for parameter in module.parameters():
                    parameter.add_(torch.randn_like(parameter) * std)


def share_random_adapters(hub_place, our_place, names):
    """Give AdapterHub's adapters `names` at one place random weights, and ours (slots 0, 1, ...) the same."""
    for index, name in enumerate(names):
        for source, target in (
            (hub_place.adapters[name].adapter_down[0], our_place.adapters[index].down),
            (hub_place.adapters[name].adapter_up, our_place.adapters[index].up),
        ):
            source.weight.normal_(0, 0.2)
            source.bias.normal_(0, 0.2)
            target.load_state_dict(source.state_dict())


@pytest.mark.parametrize("mode", ["fuse", "stack"])
def test_composition_equals_adapterhub_on_a_tiny_bert(mode):
    """Pfeiffer adapters "a" and "b" after every FFN, fused (dynamic fusion: Q, K, V) or stacked."""
    import adapters
    from adapters import Fuse, SeqBnConfig, Stack

    base = tiny_bert()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    adapters.init(theirs)
    for name in ("a", "b"):
        theirs.add_adapter(name, config=SeqBnConfig(reduction_factor=4))
    if mode == "fuse":
        theirs.add_adapter_fusion(Fuse("a", "b"))
        theirs.set_active_adapters(Fuse("a", "b"))
    else:
        theirs.set_active_adapters(Stack("a", "b"))
    places = [f"encoder.layer.{i}.output" for i in range(2)]
    inject_composition(ours, places, adapters=2, m=8, mode=mode)
    with torch.no_grad():
        for place in places:
            hub, mine = theirs.get_submodule(place), ours.get_submodule(place)
            share_random_adapters(hub, mine, ("a", "b"))
            if mode == "fuse":
                fusion = hub.adapter_fusion_layer["a,b"]
                for layer in ("query", "key", "value"):
                    getattr(fusion, layer).weight.normal_(0, 0.3)
                    getattr(mine.fusion, layer).load_state_dict(getattr(fusion, layer).state_dict())
    assert_same_encoding(ours, theirs, base)


def test_fusion_follows_its_equation_and_trains_alone():
    torch.manual_seed(0)
    model = net(nn.Linear(21, 5))
    inject_composition(model, ["ffn"], adapters=3, m=4, mode="fuse")
    composed = model.ffn
    assert count_parameters(model)[0] == 3 * 21 * 21 + 2 * 21  # 3d² + 2d
    randomise(model)
    x = torch.randn(4, 6, 21)
    with torch.no_grad():
        y = composed.sublayer(x)
        z = torch.stack([adapter(y) for adapter in composed.adapters], dim=-2)  # (4, 6, 3, 21)
        fusion = composed.fusion
        q = y @ fusion.query.weight.T + fusion.query.bias
        k = z @ fusion.key.weight.T + fusion.key.bias
        s = torch.einsum("btd,btnd->btn", q, k).softmax(-1)
        expected = y + torch.einsum("btn,btnd->btd", s, z @ fusion.value.weight.T)
        torch.testing.assert_close(composed(x), expected)
    model(x).sum().backward()
    assert {name for name, p in model.named_parameters() if p.grad is not None} == {
        "ffn.fusion.query.weight",
        "ffn.fusion.query.bias",
        "ffn.fusion.key.weight",
        "ffn.fusion.key.bias",
        "ffn.fusion.value.weight",
    }


def test_fusion_starts_from_the_adapters_own_outputs():
    """V = I at the start, and the penalty ‖I − V‖² is zero there; with equal scores, the mean of the adapters."""
    model = net()
    inject_composition(model, ["ffn"], adapters=2, m=4, mode="fuse")
    assert fusion_penalty(model).item() == 0
    randomise(model)
    composed = model.ffn
    with torch.no_grad():
        composed.fusion.value.weight.copy_(torch.eye(21))
        composed.fusion.query.weight.zero_()
        composed.fusion.query.bias.zero_()  # every score 0: equal weights
        x = torch.randn(5, 21)
        y = composed.sublayer(x)
        mean = (composed.adapters[0](y) + composed.adapters[1](y)) / 2
        torch.testing.assert_close(composed(x), y + mean)
        composed.fusion.value.weight.add_(0.5)
    assert fusion_penalty(model).item() == pytest.approx(0.25 * 21 * 21)


def test_stacking_feeds_each_adapter_the_previous_output_and_trains_the_top():
    model = net()
    inject_composition(model, ["ffn"], adapters=2, m=4, mode="stack")
    randomise(model)
    composed, x = model.ffn, torch.randn(5, 21)
    with torch.no_grad():
        y0 = composed.sublayer(x)
        y1 = y0 + composed.adapters[0](y0)
        torch.testing.assert_close(composed(x), y1 + composed.adapters[1](y1))
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        "ffn.adapters.1.down.weight",
        "ffn.adapters.1.down.bias",
        "ffn.adapters.1.up.weight",
        "ffn.adapters.1.up.bias",
    ]


def test_load_adapter_copies_trained_adapters_place_by_place():
    base = tiny_bert()
    places = [f"encoder.layer.{i}.output" for i in range(2)]
    trained = copy.deepcopy(base)
    inject_adapters(trained, places, m=8, **PFEIFFER)
    randomise(trained)
    composed = copy.deepcopy(base)
    inject_composition(composed, places, adapters=2, m=8, mode="stack")
    load_adapter(composed, 1, trained)
    for place in places:
        for name, value in trained.get_submodule(place).adapter.state_dict().items():
            torch.testing.assert_close(composed.get_submodule(place).adapters[1].state_dict()[name], value)
    with pytest.raises(ValueError, match="mode"):
        inject_composition(copy.deepcopy(base), places, adapters=2, m=8, mode="average")


def lora_model(seed):
    model = nn.Sequential(nn.Linear(13, 17), nn.Tanh(), nn.Linear(17, 7))
    torch.manual_seed(seed)
    inject_lora(model, ["0", "2"], r=3, alpha=6)
    with torch.no_grad():
        for _name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_()
    return model


def test_addition_is_a_weighted_sum_of_the_method_parameters_only():
    models = [lora_model(seed) for seed in (1, 2, 3)]
    combined = add_modules(models, [0.5, 0.3, 0.2])
    for name, parameter in combined.named_parameters():
        if parameter.requires_grad:  # A and B, each summed on its own
            expected = sum(w * dict(m.named_parameters())[name] for w, m in zip([0.5, 0.3, 0.2], models))
            torch.testing.assert_close(parameter, expected)
        else:  # the frozen base is the first model's, untouched
            torch.testing.assert_close(parameter, dict(models[0].named_parameters())[name])
    soup = add_modules(models[:2])  # AdapterSoup: the uniform average
    torch.testing.assert_close(soup[0].A, (models[0][0].A + models[1][0].A) / 2)
    with pytest.raises(ValueError, match="sum to 1"):
        add_modules(models[:2], [0.5, 0.6])


def test_negation_reverses_the_update():
    model = lora_model(4)
    negated = negate(model)
    torch.testing.assert_close(negated[0].delta_weight(), -model[0].delta_weight())
    torch.testing.assert_close(negated[0].A, model[0].A)  # only B changes sign

    ia3 = nn.Sequential(nn.Linear(9, 11))
    inject_ia3(ia3, ["0"])
    with torch.no_grad():
        ia3[0].l.normal_(1, 0.3)
    x = torch.randn(4, 9)
    base = ia3[0].base(x)
    # (2 − l) h = h − (l − 1) h: the base output minus the module's update.
    torch.testing.assert_close(negate(ia3)(x), base - (ia3(x) - base))

    adapter_model = net()
    inject_adapters(adapter_model, ["ffn"], m=4)
    with pytest.raises(ValueError, match="negation is defined for LoRA and"):
        negate(adapter_model)


def test_composed_places_accept_both_kinds_of_sublayer():
    base = tiny_bert()
    model = copy.deepcopy(base)
    inject_composition(model, ["encoder.layer.0.output", "encoder.layer.1.attention.output.dense"], adapters=2, m=4)
    assert sum(isinstance(module, ComposedAdapters) for module in model.modules()) == 2
    ids = torch.randint(0, 99, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state)


def test_demo_runs_and_learns(capsys):
    from reference_impls.composition import demo

    demo()
    output = capsys.readouterr().out
    ((before, after),) = demo_losses(output)
    assert after < 0.5 * before
    assert "their average (no training)" in output and "unlearning" in output
    entropy = re.search(r"prediction entropy ([\d.]+) → ([\d.]+)", output)
    assert entropy and float(entropy.group(2)) < float(entropy.group(1))  # EMEA lowered it, without labels


def test_mad_x_equals_adapterhub_on_a_tiny_masked_lm():
    """Language adapter (Pfeiffer, with its invertible adapter) stacked under a task adapter, on a BERT
    masked LM: the invertible adapter after the embeddings, its inverse before the output embeddings.
    AdapterHub applies the inverse in its own heads only, so its side is a BertAdapterModel with a
    masked-LM head, given the same weights as our transformers BertForMaskedLM."""
    from adapters import BertAdapterModel, SeqBnConfig, SeqBnInvConfig, Stack
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
    )
    torch.manual_seed(0)
    theirs = BertAdapterModel(config).eval()
    theirs.add_masked_lm_head("lm")
    ours = BertForMaskedLM(config).eval()
    ours.bert.load_state_dict(theirs.bert.state_dict(), strict=False)  # no pooler in a masked LM
    head, predictions = theirs.heads["lm"], ours.cls.predictions
    with torch.no_grad():
        predictions.transform.dense.load_state_dict(head[0].state_dict())
        predictions.transform.LayerNorm.load_state_dict(head[2].state_dict())
        predictions.bias.copy_(head[3].bias)
    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        plain = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, plain)  # the same model before adapters

    theirs.add_adapter("lang", config=SeqBnInvConfig(reduction_factor=4))
    theirs.add_adapter("task", config=SeqBnConfig(reduction_factor=4))
    theirs.set_active_adapters(Stack("lang", "task"))
    places = [f"encoder.layer.{i}.output" for i in range(2)]
    inject_composition(ours, [f"bert.{place}" for place in places], adapters=2, m=8, mode="stack")
    invertible = inject_invertible(ours, "bert.embeddings", "cls.predictions.decoder", trainable=False)
    with torch.no_grad():
        for place in places:
            share_random_adapters(theirs.bert.get_submodule(place), ours.bert.get_submodule(place), ("lang", "task"))
        hub_invertible = theirs.bert.invertible_adapters["lang"]
        for net in ("F", "G"):
            for layer in (0, 2):
                source, target = getattr(hub_invertible, net)[layer], getattr(invertible, net)[layer]
                source.weight.normal_(0, 0.3)
                source.bias.normal_(0, 0.3)
                target.load_state_dict(source.state_dict())
        expected, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [name for name, p in ours.named_parameters() if p.requires_grad][0].endswith("adapters.1.down.weight")


def test_invertible_adapter_inverts_and_starts_as_the_identity():
    invertible = InvertibleAdapter(15)  # odd width: halves of 7 and 8
    e = torch.randn(3, 4, 15, dtype=torch.float64)
    invertible.double()
    torch.testing.assert_close(invertible(e), e)
    with torch.no_grad():
        for parameter in invertible.parameters():
            parameter.normal_()
    o = invertible(e)
    assert (o - e).abs().max() > 1e-1
    torch.testing.assert_close(invertible.inverse(o), e)
    torch.testing.assert_close(invertible(invertible.inverse(e)), e)
    assert sum(p.numel() for p in invertible.parameters()) == (8 * 4 + 4 + 4 * 7 + 7) + (7 * 3 + 3 + 3 * 8 + 8)


@pytest.mark.parametrize("mode", ["fuse", "stack"])
def test_bfloat16_compositions(mode):
    model = net().to(torch.bfloat16)
    inject_composition(model, ["ffn"], adapters=2, m=4, mode=mode)
    randomise(model, std=0.1)
    y = model(torch.randn(3, 21, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    if mode == "fuse":
        assert fusion_penalty(model).dtype == torch.bfloat16
    invertible = InvertibleAdapter(21).to(torch.bfloat16)
    e = torch.randn(3, 21, dtype=torch.bfloat16)
    torch.testing.assert_close(invertible.inverse(invertible(e)), e)


# ---- EMEA ---------------------------------------------------------------------------------------------


def adapterhub_two_adapters(base):
    import adapters
    from adapters import SeqBnConfig

    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    for name in ("a", "b"):
        theirs.add_adapter(name, config=SeqBnConfig(reduction_factor=8))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if ".adapters." in name:
                parameter.normal_(0, 0.3)
    ours = copy.deepcopy(base)
    inject_composition(ours, [f"encoder.layer.{i}.output" for i in range(2)], adapters=2, m=4, mode="ensemble")
    with torch.no_grad():
        for i in range(2):
            for slot, name in enumerate("ab"):
                hub, mine = theirs.encoder.layer[i].output.adapters[name], ours.encoder.layer[i].output.adapters[slot]
                mine.down.load_state_dict(hub.adapter_down[0].state_dict())
                mine.up.load_state_dict(hub.adapter_up.state_dict())
    return ours, theirs


def test_ensemble_weights_are_adapterhubs_average_of_the_adapters_outputs():
    """Uniform weights (α = 0) are the mean of the adapters' outputs: AdapterHub's Average with unit,
    unnormalised weights; any w is Average with weights N·w. AdapterHub's default (normalised) Average
    divides the whole block output by N: LN((y + Ā)/N + r), which EMEA's equation does not."""
    from adapters.composition import Average

    base = tiny_bert()
    ours, theirs = adapterhub_two_adapters(base)
    ids = torch.randint(0, 99, (2, 9))
    run = lambda model: model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        theirs.set_active_adapters(Average("a", "b", weights=[1.0, 1.0], normalize_weights=False))
        expected, plain = run(theirs), run(base)
        assert (expected - plain).abs().max() > 1e-2
        torch.testing.assert_close(run(ours), expected, rtol=1e-5, atol=1e-5)
        for module in ours.modules():
            if getattr(module, "ensemble_logits", None) is not None:
                module.ensemble_logits.copy_(torch.tensor([0.3, -0.4]))
        w = torch.tensor([0.3, -0.4]).softmax(0)
        theirs.set_active_adapters(Average("a", "b", weights=(2 * w).tolist(), normalize_weights=False))
        torch.testing.assert_close(run(ours), run(theirs), rtol=1e-5, atol=1e-5)
        theirs.set_active_adapters(Average("a", "b"))  # the default: not the average of the outputs
        assert (run(theirs) - run(ours)).abs().max() > 1e-2


def test_emea_lowers_the_entropy_and_changes_only_the_ensemble_weights():
    from reference_impls.composition import emea, ensemble_weights

    base = tiny_bert()
    ours, _ = adapterhub_two_adapters(base)
    head = nn.Linear(32, 5)
    ids = torch.randint(0, 99, (4, 9))
    frozen = {
        name: parameter.detach().clone()
        for name, parameter in ours.named_parameters()
        if not name.endswith("ensemble_logits")
    }
    with torch.no_grad():
        for module in ours.modules():
            if getattr(module, "ensemble_logits", None) is not None:
                module.ensemble_logits.fill_(2.0)  # whatever a previous batch left: EMEA starts from 0
    logits, entropies = emea(ours, lambda: head(ours(input_ids=ids).last_hidden_state.mean(1)), steps=15, lr=2.0)
    assert len(entropies) == 16 and entropies[-1] < entropies[0]
    with torch.no_grad():
        torch.testing.assert_close(logits, head(ours(input_ids=ids).last_hidden_state.mean(1)))
    assert any((w - 0.5).abs().max() > 1e-3 for w in ensemble_weights(ours))  # the weights moved
    for name, parameter in ours.named_parameters():
        if name in frozen:
            torch.testing.assert_close(parameter, frozen[name])
            assert parameter.grad is None
    assert all(p.grad is None for p in head.parameters())
    with pytest.raises(ValueError, match="no ensemble"):
        emea(tiny_bert(), lambda: torch.zeros(1, 2))
