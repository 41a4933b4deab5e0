"""Ladder side-tuning against its equations and parameter count; no gradient through the backbone."""

import re

import pytest
import torch
from torch import nn

from reference_impls._plumbing import count_parameters
from reference_impls.side import LadderSideNetwork, ladder_side_tuning

from helpers import demo_losses, tiny_bert

D = 21


def backbone(layers=3):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(layers)], nn.Linear(D, 4)


def randomise(model):
    with torch.no_grad():
        for _name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)


def test_side_network_follows_the_equations():
    blocks, head = backbone()
    model = ladder_side_tuning(blocks, d=D, reduction=4, head=head)  # d_s = 5
    randomise(model)
    x = torch.randn(6, D)
    with torch.no_grad():
        s = model.first_down(x)
        h = x
        for i in range(3):
            h = blocks[i](h)
            mu = torch.sigmoid(model.gates[i] / 0.1)
            s = model.side_blocks[i](mu * s + (1 - mu) * model.downs[i](h))
        expected = head(model.up(nn.functional.layer_norm(s, (5,), model.norm.weight, model.norm.bias)))
        torch.testing.assert_close(model(x), expected)


def test_parameter_count():
    blocks, head = backbone(layers=3)
    model = ladder_side_tuning(blocks, d=D, reduction=4, head=head)
    d, ds, L = D, 5, 3
    side_blocks = L * (ds * ds + ds)
    assert count_parameters(model)[0] == (d * ds + ds) + L * (d * ds + ds) + L + side_blocks + 2 * ds + (ds * d + d)


def test_nothing_flows_through_the_backbone():
    blocks, head = backbone()
    model = ladder_side_tuning(blocks, d=D, reduction=4, head=head)
    x = torch.randn(6, D)
    states = model.backbone_states(x)
    assert all(state.grad_fn is None and not state.requires_grad for state in states)  # nothing kept for backward
    model(x).sum().backward()
    assert all(p.grad is None for block in blocks for p in block.parameters())
    assert all(p.grad is None for p in head.parameters())  # frozen, though the gradient passes through it
    assert model.gates.grad is not None and model.first_down.weight.grad is not None


def test_transformer_layers_as_the_backbone():
    bert = tiny_bert()
    model = ladder_side_tuning(list(bert.encoder.layer), d=32, reduction=4)
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():  # the embeddings belong to the frozen backbone too
        embeddings = bert.embeddings(input_ids=ids)
    out = model(embeddings)
    assert out.shape == (2, 7, 32)
    out.sum().backward()
    assert all(p.grad is None for p in bert.parameters())


def test_one_side_block_per_backbone_block():
    blocks, _ = backbone(2)
    with pytest.raises(ValueError, match="one side block per backbone block"):
        LadderSideNetwork(blocks, [nn.Identity()], D, 5)


def test_demo_runs_and_learns(capsys):
    """Ladder side-tuning learns; K-Adapter's two knowledge adapters learn their tasks, then their
    frozen knowledge, fused, learns the task that needs both."""
    from reference_impls.side import demo

    demo()
    out = capsys.readouterr().out
    (lst_before, lst_after), (fused_before, fused_after) = demo_losses(out)
    assert lst_after < 0.2 * lst_before and fused_after < 0.2 * fused_before
    knowledge = [float(value) for value in re.findall(r"loss [\d.e+-]+ → ([\d.e+-]+)", out)]
    assert len(knowledge) == 2 and max(knowledge) < 0.1


def test_bfloat16_backbone_gets_a_bfloat16_side_network():
    blocks, head = backbone()
    model = ladder_side_tuning(
        [block.to(torch.bfloat16) for block in blocks], d=D, reduction=4, head=head.to(torch.bfloat16)
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(torch.randn(3, D, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()


# ---- K-Adapter ------------------------------------------------------------------------------------


def k_adapter(**options):
    from reference_impls.side import inject_k_adapter

    backbone = tiny_bert()
    return backbone, inject_k_adapter(backbone, **{"read_layers": (0, 1, 2), "d_adapter": 12, "heads": 3, **options})


def test_knowledge_adapter_follows_its_equations():
    """a_j = K_j(h_{l_j} + a_{j−1}), K(z) = z + U T_N(D z), with the authors' skip every 3 layers."""
    _, model = k_adapter(names=("factual",))
    adapter = model.adapters["factual"]
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.2)
        ids = torch.randint(0, 99, (2, 7))
        states = model.backbone(input_ids=ids, output_hidden_states=True).hidden_states
        a, outputs = torch.zeros_like(states[-1]), []
        for layer, read in zip(adapter.layers, (0, 1, 2)):
            z = states[read] + a
            t = layer.down(z)
            for block in layer.transformer:
                t = block(t)
            a = z + layer.up(t)
            outputs.append(a)
        a = a + outputs[1]  # after the third layer: the second's output (j // skip = 1)
        torch.testing.assert_close(adapter(states), a)
        last = states[-1]
        expected = model.fuse_all(model.fuse_each["factual"](torch.cat([last, a], -1)))
        torch.testing.assert_close(model(ids), expected)


def test_k_adapter_trains_only_beside_the_backbone():
    backbone, model = k_adapter()
    assert set(model.adapters) == {"factual", "linguistic"}
    features = model(torch.randint(0, 99, (2, 7)))
    assert features.shape == (2, 7, 32)
    features.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert all(p.grad is not None for p in model.adapters.parameters())
    from reference_impls.side import k_adapter_layer_parameters

    layers = sum(p.numel() for p in model.adapters["factual"].parameters())
    assert layers == 3 * k_adapter_layer_parameters(32, 12, 2)
    fusion = sum(p.numel() for p in list(model.fuse_each.parameters()) + list(model.fuse_all.parameters()))
    assert fusion == 2 * (2 * 32 * 32 + 32) + (2 * 32 * 32 + 32)


def test_k_adapter_defaults_are_the_authors_and_checked_against_the_backbone():
    from reference_impls.side import KnowledgeAdapter, inject_k_adapter

    assert KnowledgeAdapter(8, d_adapter=8, heads=2).read_layers == (0, 11, 22)
    with pytest.raises(ValueError, match="hidden states 0 to 2"):
        inject_k_adapter(tiny_bert())  # (0, 11, 22) on a 2-layer model
