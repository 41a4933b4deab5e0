"""AutoPEFT: search a space of PEFT configurations for the best trade-offs between size and quality.

Zhou, Wan, Vulić, Korhonen. "AutoPEFT: Automatic Configuration Search for Parameter-Efficient
Fine-Tuning." TACL 2024. arXiv:2301.12132.

A configuration c says, as in the authors' code, which layers of an encoder get modules (one bit per
layer) and, shared by those layers, the width m_s of a serial adapter (Pfeiffer's place, after the
FFN's Add & Norm), the width m_p of a parallel adapter (beside the FFN, reading its input, scaled
by s = 4 as in He et al.) and the length n of a prefix in the layer's self-attention. Each size is
0 (the module is off) or a power of two. In the FFN's Add & Norm block of an active layer, with y
the FFN's output and r its input:

    out = LN(y + A_s(LN(y + r)) + s · A_p(r) + r)          (bottleneck.py's adapters; prompts.py's prefix)

The cost of c is its trainable-parameter count, for width d and L_c active layers:

    P(c) = L_c · [ (2·d·m_s + d + m_s)·[m_s > 0] + (2·d·m_p + d + m_p)·[m_p > 0] + 2·n·d ]

(the prefix is trained directly, P-tuning v2 style; the authors' sizes are reduction factors 2^0 ...
2^10 of d, which ours spell as the widths themselves). AutoPEFT looks for the Pareto front of cost
against task loss: the configurations that no other beats on both. The paper searches with
multi-objective Bayesian optimisation (a Gaussian process over the encoded configuration); this
module keeps the search space, the cost and the front and searches by evolution instead (random
configurations, then mutations of front members, one coordinate at a time), which is small enough
to read and to run in the demo. Every candidate is trained from the same frozen model.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from reference_impls._plumbing import count_parameters, freeze_model, tiny_encoder, toy_sequence_task, train_classifier
from reference_impls.bottleneck import Adapter, is_add_norm_block
from reference_impls.prefixes import inject_encoder_prefix

FAMILY = "Unified designs and search"

IMPLEMENTS = ("autopeft",)

SIZES = (0, 1, 2, 4, 8, 16, 32, 64)  # for every module: 0 switches it off
PARALLEL_SCALE = 4.0


@dataclass(frozen=True)
class Configuration:
    layers: tuple[bool, ...]  # which layers get modules
    serial: int = 0  # m_s
    parallel: int = 0  # m_p
    prefix: int = 0  # n

    def __str__(self) -> str:
        active = "".join("1" if on else "0" for on in self.layers)
        return f"layers {active}, serial {self.serial}, parallel {self.parallel}, prefix {self.prefix}"


def parameters(config: Configuration, d: int) -> int:
    """P(c), the formula of the module docstring."""
    per_layer = 2 * config.prefix * d
    for m in (config.serial, config.parallel):
        per_layer += (2 * d * m + d + m) if m else 0
    return sum(config.layers) * per_layer


class SerialParallelBlock(nn.Module):
    """An FFN's post-norm Add & Norm block with AutoPEFT's two adapters (either may be absent)."""

    def __init__(self, block: nn.Module, serial: Adapter | None, parallel: Adapter | None):
        super().__init__()
        self.block, self.serial, self.parallel = block, serial, parallel

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        block = self.block
        y = block.dropout(block.dense(hidden_states))
        out = y + residual
        if self.serial is not None:
            out = out + self.serial(block.LayerNorm(y + residual))
        if self.parallel is not None:
            out = out + self.parallel(residual)
        return block.LayerNorm(out)


def inject_autopeft(model: nn.Module, config: Configuration) -> list[str]:
    """Apply configuration c to a BERT-style encoder (`model.encoder.layer[i]`); freeze all else.
    Returns the names of the adapted modules."""
    layers = model.encoder.layer
    if len(config.layers) != len(layers):
        raise ValueError(f"the configuration names {len(config.layers)} layers; the model has {len(layers)}")
    active = [index for index, on in enumerate(config.layers) if on]
    d = model.config.hidden_size
    adapted = []
    if config.prefix and active:
        inject_encoder_prefix(model, n=config.prefix, hidden=None, layers=active)
        adapted += [f"encoder.layer.{index}.attention.self" for index in active]
    trainable = [model.prefixes] if config.prefix and active else []
    freeze_model(model)
    make = lambda m, scale, weight: (
        Adapter(d, m, "relu", scale, device=weight.device, dtype=weight.dtype) if m else None
    )
    for index in active if (config.serial or config.parallel) else []:
        block = layers[index].output
        if not is_add_norm_block(block):
            raise ValueError(f"encoder.layer.{index}.output is not a post-norm Add & Norm block")
        weight = block.dense.weight
        wrapped = SerialParallelBlock(
            block, make(config.serial, 1.0, weight), make(config.parallel, PARALLEL_SCALE, weight)
        )
        layers[index].output = wrapped
        trainable += [module for module in (wrapped.serial, wrapped.parallel) if module is not None]
        adapted.append(f"encoder.layer.{index}.output")
    for module in trainable:
        module.requires_grad_(True)
    return adapted


# ---- the search ------------------------------------------------------------------------------------


def sample(layers: int, rng: random.Random) -> Configuration:
    """A random configuration of the space (at least one layer active)."""
    bits = [rng.random() < 0.5 for _ in range(layers)]
    bits[rng.randrange(layers)] = True
    return Configuration(tuple(bits), rng.choice(SIZES), rng.choice(SIZES), rng.choice(SIZES))


def mutate(config: Configuration, rng: random.Random) -> Configuration:
    """A neighbour: one layer bit flipped, or one size moved one step up or down."""
    coordinate = rng.randrange(len(config.layers) + 3)
    if coordinate < len(config.layers):
        bits = list(config.layers)
        bits[coordinate] = not bits[coordinate]
        return replace(config, layers=tuple(bits))
    name = ("serial", "parallel", "prefix")[coordinate - len(config.layers)]
    position = SIZES.index(getattr(config, name))
    step = rng.choice([-1, 1]) if 0 < position < len(SIZES) - 1 else (1 if position == 0 else -1)
    return replace(config, **{name: SIZES[position + step]})


@dataclass(frozen=True)
class Trial:
    config: Configuration
    cost: int  # trainable parameters
    loss: float  # held-out task loss after training


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """The trials no other trial beats on both objectives (cost, loss), by increasing cost."""
    beaten = lambda t: any(
        (o.cost <= t.cost and o.loss <= t.loss) and (o.cost < t.cost or o.loss < t.loss) for o in trials
    )
    return sorted((t for t in trials if not beaten(t)), key=lambda t: (t.cost, t.loss))


def search(
    evaluate: Callable[[Configuration], float],
    layers: int,
    d: int,
    budget: int = 12,
    initial: int = 5,
    seed: int = 0,
) -> tuple[list[Trial], list[Trial]]:
    """Evolutionary multi-objective search: `initial` random configurations, then mutations of a
    random member of the current front, until `budget` distinct configurations are evaluated.
    Returns (every trial, the Pareto front)."""
    rng, trials, seen = random.Random(seed), [], set()
    while len(trials) < budget:
        front = pareto_front(trials)
        config = sample(layers, rng) if len(trials) < initial or not front else mutate(rng.choice(front).config, rng)
        if config in seen or not any(config.layers):
            continue
        seen.add(config)
        trials.append(Trial(config, parameters(config, d), evaluate(config)))
    return trials, pareto_front(trials)


def demo() -> None:
    """Search 12 configurations of a frozen tiny BERT on a toy task; print the Pareto front."""
    ids, labels = toy_sequence_task(samples=192)
    train_ids, train_labels, test_ids, test_labels = ids[:128], labels[:128], ids[128:], labels[128:]

    def evaluate(config: Configuration) -> float:
        model = tiny_encoder()
        inject_autopeft(model, config)
        _, _, head = train_classifier(model, train_ids, train_labels, steps=40)
        with torch.no_grad():
            logits = head(model(input_ids=test_ids).last_hidden_state.mean(1))
            return nn.functional.cross_entropy(logits, test_labels).item()

    base = tiny_encoder()
    trials, front = search(evaluate, layers=len(base.encoder.layer), d=base.config.hidden_size)
    _, total = count_parameters(base)
    print(f"AutoPEFT: {len(trials)} configurations of a {total:,}-parameter encoder trained and evaluated")
    for trial in front:
        print(f"  on the front: {trial.cost:>5,} parameters, held-out loss {trial.loss:.4f}: {trial.config}")


if __name__ == "__main__":
    demo()
