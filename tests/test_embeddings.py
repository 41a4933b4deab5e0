"""UNKs Everywhere: the factorised embeddings, lexical-overlap initialisation and MAD-X 2.0 adapters."""

import pytest
import torch

from reference_impls._plumbing import count_parameters
from reference_impls.bottleneck import AddNormAdapter
from reference_impls.embeddings import (
    FactorizedEmbedding,
    adapt_to_new_vocabulary,
    factorize,
    inject_madx2_adapters,
    new_token_vectors,
)

from helpers import demo_losses, tiny_bert


def test_factorisation_is_exact_at_full_rank_and_optimal_below():
    E = torch.randn(37, 11, dtype=torch.float64)
    I, F = factorize(E, 11)
    torch.testing.assert_close(I @ F, E)
    I, F = factorize(E, 4)
    assert I.shape == (37, 4) and F.shape == (4, 11)
    singular = torch.linalg.svdvals(E)
    # Eckart-Young: the error is exactly the discarded singular values, and no rank-4 matrix does better.
    torch.testing.assert_close(torch.linalg.norm(E - I @ F), singular[4:].norm())
    torch.testing.assert_close(F @ F.T, torch.eye(4, dtype=torch.float64))  # F has orthonormal rows


def test_lexical_overlap_copies_shared_tokens_and_draws_the_rest():
    old_vectors = torch.randn(500, 6) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 10
    old = {f"w{i}": i for i in range(500)}
    new = {"w3": 0, "w499": 1, "fresh": 2} | {f"n{i}": 3 + i for i in range(3000)}
    lex = new_token_vectors(old_vectors, old, new, lexical=True)
    torch.testing.assert_close(lex[0], old_vectors[3])
    torch.testing.assert_close(lex[1], old_vectors[499])
    rest = lex[2:]
    torch.testing.assert_close(rest.mean(0), old_vectors.mean(0), atol=0.3, rtol=0.05)
    torch.testing.assert_close(rest.std(0), old_vectors.std(0), atol=0.2, rtol=0.1)
    rand = new_token_vectors(old_vectors, old, new, lexical=False)
    assert not torch.allclose(rand[0], old_vectors[3])  # EL-rand copies nothing


def test_the_new_embeddings_train_only_their_token_vectors():
    model = tiny_bert()
    old = {f"t{i}": i for i in range(99)}
    new = {f"t{i}": i for i in range(10)} | {f"x{i}": 10 + i for i in range(30)}
    model.requires_grad_(False)
    embedding = adapt_to_new_vocabulary(model, old, new, rank=8)
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding)
    assert count_parameters(model)[0] == 40 * 8  # |V'| · d'
    I, F = factorize(torch.nn.Embedding(99, 32).weight.detach(), 8)  # the shapes of what was stored
    assert embedding.projection.shape == F.shape and not embedding.projection.requires_grad
    ids = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(embedding(ids), embedding.token_vectors[ids] @ embedding.projection)
    torch.testing.assert_close(embedding.weight[ids], embedding(ids))
    model(input_ids=ids).last_hidden_state.sum().backward()
    assert embedding.token_vectors.grad is not None
    assert all(parameter.grad is None for name, parameter in model.named_parameters() if "token_vectors" not in name)


def test_overlapping_tokens_keep_their_old_embeddings_up_to_the_rank():
    model = tiny_bert()
    full = model.get_input_embeddings().weight.detach().clone()
    old = {f"t{i}": i for i in range(99)}
    embedding = adapt_to_new_vocabulary(model, old, {"t5": 0, "t42": 1, "zz": 2}, rank=32)  # full rank
    torch.testing.assert_close(embedding.weight[:2], full[[5, 42]], rtol=1e-4, atol=1e-5)


def test_madx2_leaves_the_last_layer_without_an_adapter():
    model = tiny_bert()
    adapted = inject_madx2_adapters(model, [f"encoder.layer.{i}.output" for i in range(2)], m=4)
    assert adapted == ["encoder.layer.0.output"]
    assert isinstance(model.encoder.layer[0].output, AddNormAdapter)
    assert not isinstance(model.encoder.layer[1].output, AddNormAdapter)
    with pytest.raises(ValueError):
        inject_madx2_adapters(tiny_bert(), ["nothing"], m=4)


def test_bf16_embeddings():
    model = tiny_bert().to(torch.bfloat16)
    embedding = adapt_to_new_vocabulary(model, {"a": 0}, {"a": 0, "b": 1}, rank=4)
    assert embedding(torch.tensor([[0, 1]])).dtype == torch.bfloat16


def test_demo_runs_and_learns_the_new_language(capsys):
    from reference_impls.embeddings import demo

    demo()
    losses = demo_losses(capsys.readouterr().out)
    assert len(losses) == 2 and all(after < 0.3 * before for before, after in losses)
