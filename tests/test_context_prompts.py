"""CPT against its definition (the examples' token types, the ε-balls, frozen labels, the decayed loss
on the context's labels and the query's) and against HF PEFT's `CPTConfig`: the same logits, losses
and refined prompt after training steps on the same batches; its checkpoints load."""

import copy

import pytest
import torch
from peft import CPTConfig, get_peft_model
from safetensors.torch import save_file
from test_interop import tiny_llama

from reference_impls.context_prompts import CPT, CPTPrompt, example_types
from reference_impls.interop import UnsupportedAdapter, load_peft_adapter

from helpers import demo_losses, relative_error, run_demo

# Two examples: (input template, input, output template, output) of 2, 3, 1, 1 tokens each.
TYPES = example_types([(2, 3, 1, 1), (2, 2, 1, 1)])
TOKENS = [5, 6, 11, 12, 13, 7, 20, 5, 6, 14, 15, 7, 21]


def test_the_token_types_number_the_examples():
    assert TYPES == [1, 1, 2, 2, 2, 3, 4, 5, 5, 6, 6, 7, 8]


def pair(decay=None, epsilon=0.1, format_epsilon=0.05):
    base = tiny_llama()
    ours = CPT(copy.deepcopy(base), TOKENS, TYPES, epsilon=epsilon, format_epsilon=format_epsilon, decay=decay)
    config = CPTConfig(
        task_type="CAUSAL_LM",
        cpt_token_ids=TOKENS,
        cpt_tokens_type_mask=TYPES,
        opt_weighted_loss_type="decay" if decay is not None else "none",
        opt_loss_decay_factor=decay if decay is not None else 1.0,
        opt_projection_epsilon=epsilon,
        opt_projection_format_epsilon=format_epsilon,
    )
    return ours, get_peft_model(base, config)


def batch():
    ids = torch.randint(0, 97, (3, 6))
    query_types = torch.tensor([[1, 2, 2, 3, 4, 4], [1, 1, 2, 3, 4, 0], [1, 2, 3, 3, 4, 4]])
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    return ids, mask, query_types


@pytest.mark.parametrize("decay", [None, 0.5])
def test_cpt_gives_peft_s_logits_losses_and_prompt_after_training_steps(decay):
    ours, theirs = pair(decay)
    optimisers = [
        torch.optim.SGD([ours.prompt.delta], lr=0.5),
        torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5),
    ]
    for _ in range(4):
        ids, mask, query_types = batch()
        losses = []
        for model, optimiser in zip((ours, theirs), optimisers):
            optimiser.zero_grad()
            output = model(input_ids=ids, attention_mask=mask, labels=ids, input_type_mask=query_types.clone())
            output.loss.backward()
            optimiser.step()
            losses.append((output.loss.item(), output.logits))
        (ours_loss, ours_logits), (their_loss, their_logits) = losses
        assert ours_loss == pytest.approx(their_loss, rel=1e-5)
        assert relative_error(ours_logits, their_logits) <= 1e-5
    encoder = theirs.prompt_encoder["default"]
    their_delta = encoder.get_projection()
    ours.prompt.project()
    assert relative_error(ours.prompt.delta, their_delta) <= 1e-5
    assert ours.prompt.delta.abs().sum() > 0


def test_only_the_templates_and_inputs_move_and_each_stays_in_its_ball():
    ours, _ = pair(epsilon=0.1, format_epsilon=0.05)
    optimiser = torch.optim.SGD([ours.prompt.delta], lr=100.0)  # steps far outside every ball
    ids, mask, query_types = batch()
    for _ in range(2):
        optimiser.zero_grad()
        ours(input_ids=ids, labels=ids, input_type_mask=query_types).loss.backward()
        optimiser.step()
    ours.prompt.project()
    norms = ours.prompt.delta.norm(dim=1)
    types = torch.tensor(TYPES)
    scale = (32 / 2048) ** 0.5
    assert torch.all(norms[types % 4 == 0] == 0)  # labels as written
    assert torch.allclose(norms[types % 4 == 2], torch.full_like(norms[types % 4 == 2], 0.1 * scale))
    templates = (types % 4 == 1) | (types % 4 == 3)
    assert torch.allclose(norms[templates], torch.full_like(norms[templates], 0.05 * scale))
    assert ours.prompt.E0.requires_grad is False


def test_the_decayed_loss_weighs_the_last_label_most():
    ours, _ = pair(decay=0.5)
    flat, _ = pair(decay=None)
    ids, _, query_types = batch()
    with torch.no_grad():
        logits = ours(input_ids=ids).logits
        decayed = ours.loss(logits, ids, query_types)
        plain = flat.loss(logits, ids, query_types)
    assert decayed.item() != pytest.approx(plain.item())
    with pytest.raises(ValueError, match="one type per context token"):
        CPTPrompt(torch.nn.Embedding(9, 4), [1, 2], [1])


def test_a_cpt_checkpoint_loads_as_its_refined_prompt(tmp_path):
    ours, theirs = pair()
    optimiser = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    ids, mask, query_types = batch()
    theirs(input_ids=ids, labels=ids, input_type_mask=query_types).loss.backward()
    optimiser.step()
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    loaded = load_peft_adapter(tiny_llama(), tmp_path)
    assert isinstance(loaded, CPT)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        assert relative_error(loaded(input_ids=ids, attention_mask=mask).logits, expected) <= 1e-5
        assert not loaded.prompt.delta.any()  # as PEFT loads it: E₀ is the saved prompt, Δ = 0


def test_a_checkpoint_without_its_prompt_is_refused_in_one_line(tmp_path):
    _, theirs = pair()
    theirs.save_pretrained(tmp_path)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedAdapter, match="lacks prompt_embeddings"):
        load_peft_adapter(tiny_llama(), tmp_path)


def test_demo_learns():
    ((before, after),) = demo_losses(run_demo("reference_impls.context_prompts"))
    assert after < before / 3
