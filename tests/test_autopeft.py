"""AutoPEFT's search space, cost formula and Pareto front; the configurations applied to a tiny BERT."""

import random

import pytest
import torch

from reference_impls._plumbing import count_parameters
from reference_impls.autopeft import (
    SIZES,
    Configuration,
    SerialParallelBlock,
    Trial,
    inject_autopeft,
    mutate,
    parameters,
    pareto_front,
    sample,
    search,
)

from helpers import tiny_bert


@pytest.mark.parametrize("seed", range(6))
def test_the_cost_formula_counts_what_is_trained(seed):
    config = sample(2, random.Random(seed))
    model = tiny_bert()
    inject_autopeft(model, config)
    trainable, _ = count_parameters(model)
    assert trainable == parameters(config, d=32), config


def test_every_module_off_is_the_frozen_model():
    base = tiny_bert()
    model = tiny_bert()
    assert inject_autopeft(model, Configuration((True, True), 0, 0, 0)) == []
    assert count_parameters(model)[0] == 0
    ids = torch.randint(0, 99, (2, 7))
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state)


def test_the_block_follows_its_equation_and_starts_as_the_identity():
    model = tiny_bert()
    inject_autopeft(model, Configuration((False, True), serial=4, parallel=3, prefix=0))
    block = model.encoder.layer[1].output
    assert isinstance(block, SerialParallelBlock) and not isinstance(model.encoder.layer[0].output, SerialParallelBlock)
    hidden, residual = torch.randn(2, 5, 37), torch.randn(2, 5, 32)
    inner = block.block
    torch.testing.assert_close(block(hidden, residual), inner(hidden, residual))  # up-projections start at zero
    with torch.no_grad():
        for adapter in (block.serial, block.parallel):
            adapter.up.weight.normal_()
    y = inner.dense(hidden)
    expected = inner.LayerNorm(y + block.serial(inner.LayerNorm(y + residual)) + block.parallel(residual) + residual)
    torch.testing.assert_close(block(hidden, residual), expected)
    assert block.parallel.scale == 4.0


def test_mutations_stay_in_the_space_and_change_one_coordinate():
    rng = random.Random(3)
    for _ in range(200):
        config = sample(4, rng)
        neighbour = mutate(config, rng)
        assert {neighbour.serial, neighbour.parallel, neighbour.prefix} <= set(SIZES)
        changed = sum(a != b for a, b in zip(config.layers, neighbour.layers)) + sum(
            getattr(config, name) != getattr(neighbour, name) for name in ("serial", "parallel", "prefix")
        )
        assert changed == 1


def test_the_front_holds_exactly_the_undominated_trials():
    config = Configuration((True,))
    points = [(10, 0.5), (20, 0.4), (15, 0.6), (30, 0.4), (5, 0.9), (10, 0.5)]
    trials = [Trial(config, cost, loss) for cost, loss in points]
    front = pareto_front(trials)
    assert [(t.cost, t.loss) for t in front] == [(5, 0.9), (10, 0.5), (10, 0.5), (20, 0.4)]
    rng = random.Random(0)
    for _ in range(20):  # and on random points, by the definition
        trials = [Trial(config, rng.randrange(50), rng.random()) for _ in range(15)]
        front = pareto_front(trials)
        for trial in trials:
            dominated = any(
                o.cost <= trial.cost and o.loss <= trial.loss and (o.cost, o.loss) != (trial.cost, trial.loss)
                for o in trials
            )
            assert (trial in front) == (not dominated)


def test_search_spends_its_budget_on_distinct_configurations():
    evaluated = []

    def evaluate(config):  # a made-up objective: bigger is better, with diminishing returns
        evaluated.append(config)
        return 1.0 / (1 + parameters(config, 8))

    trials, front = search(evaluate, layers=3, d=8, budget=10, initial=4, seed=1)
    assert len(trials) == 10 and len(set(evaluated)) == 10
    assert front == pareto_front(trials) and front


def test_a_configuration_must_fit_the_model():
    with pytest.raises(ValueError, match="names 3 layers; the model has 2"):
        inject_autopeft(tiny_bert(), Configuration((True, True, True), serial=2))


def test_demo_runs_and_finds_a_front(capsys):
    from reference_impls.autopeft import demo

    demo()
    out = capsys.readouterr().out
    assert "12 configurations" in out and out.count("on the front") >= 1
