"""Mixing a library of frozen LoRA experts token by token: X-LoRA (a small classifier, trained, reads
the model's own hidden states and weighs the experts of every layer) and Arrow (no training at all:
each expert is represented by one direction of its update, and a token goes to the experts it aligns
with), with GenKnowSub (a general-knowledge LoRA subtracted from every expert before routing).

Every adapted layer holds E experts (Aₑ, Bₑ, sₑ), trained beforehand and frozen, and adds their
updates weighted per token:

    h = W₀ x + Σₑ wₑ(x) · sₑ Bₑ Aₑ x

**X-LoRA.** Buehler, Buehler. "X-LoRA: Mixture of low-rank adapter experts, a flexible framework for
large language models with applications in protein mechanics and molecular design." APL Machine
Learning 2(2), 2024. arXiv:2402.07148. Two passes. The first runs the model with every expert at a
fixed weight c (`scaling_pass_value`, 0 by default: the base model) and keeps the last hidden state
H (the input of the LM head). A classifier — one linear layer, or `depth` layers of width `size` with
ReLU and dropout — turns H into weights per token, layer ℓ and expert e:

    w_{ℓ,e} = softmax_e(f(H)_{ℓ,e} / T)        (f(H) shared by all layers unless `layerwise`)

optionally keeping only each token's top-k experts (renormalised by a softmax over them with
`softmax_top_k`); the second pass uses them, times a global weight g. Only the classifier trains:
hidden · size + size + (depth − 2)(size² + size) + size · E·L' + E·L' for depth ≥ 2 (hidden · E·L' +
E·L' for depth 1), with L' = L layers if `layerwise`, else 1.

**Arrow.** Ostapenko, Su, Ponti, et al. "Towards Modular LLMs by Building and Reusing a Library of
LoRAs." ICML 2024. arXiv:2405.11157. Each expert's prototype is the top right singular vector vₑ of
its ΔWₑ = Bₑ Aₑ (the input direction it amplifies most; its sign is arbitrary, so only |⟨x, vₑ⟩|
counts). A token's weights are a softmax over its top-k experts:

    wₑ(x) = softmax_{e ∈ topk} (|⟨x, vₑ⟩| / T),        0 for the others

so a library trained on other tasks serves a new one zero-shot. Nothing trains.

**GenKnowSub.** Bagherifard, Rajabi, Edalat, Yaghoobzadeh. "GenKnowSub: Improving Modularity and
Reusability of LLMs through General Knowledge Subtraction." ACL 2025 (short papers). arXiv:2505.10939.
LoRAs trained on general text (of one or more languages) capture what every expert shares; removing
it leaves experts that hold their task alone. As PEFT does, the mean of the general LoRAs' factors
is subtracted from every expert's, Aₑ ← Aₑ − Ā and Bₑ ← Bₑ − B̄, before the prototypes are taken.

PEFT 0.21 implements both: `XLoraConfig` (type `xlora`) and LoRA's `ArrowConfig` (`create_arrow_model`,
with `use_gks`). Ours equals them on the same experts (tested): X-LoRA in evaluation and in training
with the classifier's dropout, against the PEFT model in memory (PEFT 0.21.2's `save_pretrained`
drops every X-LoRA key that contains ".0.", the classifier's first layer among them, so its own
reload is not the trained model); Arrow with and without GenKnowSub. PEFT finds Arrow's prototypes by
15 power iterations from a random start; ours takes the exact SVD, which those iterations approach
(tested with PEFT's count raised until converged).
"""

import copy

import torch
from torch import nn

from reference_impls._plumbing import freeze_model, replace_module, report, toy_model, train
from reference_impls.lora import LoRALinear, inject_lora

FAMILY = "Mixtures and routing"

IMPLEMENTS = ("x-lora", "arrow", "genknowsub")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


class ExpertLoRALinear(nn.Module):
    """A frozen nn.Linear plus E frozen LoRA experts, mixed by per-token weights (…, E): set from
    outside before the forward pass (X-LoRA) or computed from the input by a router (Arrow)."""

    def __init__(self, base: nn.Linear, experts: list[LoRALinear]):
        super().__init__()
        self.base = base
        self.register_buffer("A", torch.stack([e.A.detach() for e in experts]))  # (E, r, d_in)
        self.register_buffer("B", torch.stack([e.B.detach() for e in experts]))  # (E, d_out, r)
        self.register_buffer("scales", torch.tensor([e.scale for e in experts], dtype=base.weight.dtype))
        self.weights = None  # (…, E) for the next forward
        self.router = None  # or a function of (layer, x) giving them

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(…, E, d_out): every expert's sₑ Bₑ Aₑ x."""
        after_A = torch.einsum("...i,eri->...er", x.to(self.A.dtype), self.A)
        return torch.einsum("...er,eor->...eo", after_A, self.B) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(self, x) if self.router is not None else self.weights
        mixed = (weights[..., :, None].to(self.A.dtype) * self.expert_outputs(x)).sum(-2)
        return self.base(x) + mixed.to(x.dtype)


def inject_experts(model: nn.Module, experts: list[nn.Module]) -> list[str]:
    """Replace every layer that carries a LoRA in all the expert models (copies of `model`, each with
    one trained LoRA, e.g. from `reference_impls.interop.load_peft_adapter`) by an ExpertLoRALinear
    over the model's own base layer; everything is frozen."""
    per_model = [{n: m for n, m in expert.named_modules() if isinstance(m, LoRALinear)} for expert in experts]
    names = [n for n in per_model[0] if all(n in layers for layers in per_model)]
    if not names or any(set(layers) != set(names) for layers in per_model):
        raise ValueError("the experts must carry LoRA on the same layers")
    for name in names:
        replace_module(model, name, ExpertLoRALinear(model.get_submodule(name), [m[name] for m in per_model]))
    freeze_model(model)
    return names


# ---- X-LoRA -------------------------------------------------------------------------------------


class XLoRA(nn.Module):
    """The model with X-LoRA's two passes around it; `classifier` is the only trained part."""

    def __init__(
        self,
        model: nn.Module,
        experts: list[nn.Module],
        hidden_size: int,
        depth: int = 1,
        size: int = 2048,
        dropout: float = 0.2,
        layerwise: bool = False,
        softmax: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        softmax_top_k: bool = False,
        scaling_pass_value: float = 0.0,
        global_weight: float = 1.0,
        hidden_module: str = "lm_head",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"X-LoRA's classifier depth must be at least 1, got {depth}")
        self.model = model
        self.names = inject_experts(model, experts)
        self.E, self.L = len(experts), len(self.names)
        outputs = self.E * self.L if layerwise else self.E
        layers: list[nn.Module] = []
        width = hidden_size
        for _ in range(depth - 1):
            layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
            width = size
        self.classifier = nn.Sequential(*layers, nn.Linear(width, outputs))
        dtype = next(model.parameters()).dtype
        self.classifier.to(dtype)
        self.layerwise, self.softmax, self.temperature = layerwise, softmax, temperature
        self.top_k, self.softmax_top_k = top_k, softmax_top_k
        self.scaling_pass_value, self.global_weight = scaling_pass_value, global_weight
        self.hidden_module = hidden_module  # whose input is the last hidden state
        self.train(model.training)  # the classifier's dropout follows the model's mode

    def layers(self) -> list[ExpertLoRALinear]:
        return [self.model.get_submodule(name) for name in self.names]

    def expert_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, L, E): the classifier's weights of every layer's experts, for each token."""
        logits = self.classifier(hidden)
        if self.layerwise:
            logits = logits.unflatten(-1, (self.L, self.E))
        else:
            logits = logits[..., None, :].expand(*logits.shape[:-1], self.L, self.E)
        return torch.softmax(logits / self.temperature, dim=-1) if self.softmax else logits

    def layer_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Top-k (and its softmax) on one layer's (…, E) weights, times the global weight."""
        if self.top_k is not None:
            kept = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, weights.topk(self.top_k, dim=-1)[1], True)
            weights = weights * kept
        if self.softmax_top_k:  # over the non-zero weights, as PEFT (a scaling pass at c = 0 stays 0)
            kept = weights != 0
            weights = torch.softmax(weights.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
        return weights * self.global_weight

    def forward(self, *args, **kwargs):
        hidden = []
        reader = self.model.get_submodule(self.hidden_module)
        hook = reader.register_forward_pre_hook(lambda module, inputs: hidden.append(inputs[0]))
        try:
            with torch.no_grad():  # the scaling pass: every expert at weight c · g (top-k keeps the first k, as PEFT)
                for layer in self.layers():
                    layer.weights = self.layer_weights(torch.full((self.E,), float(self.scaling_pass_value)))
                self.model(*args, **kwargs)
        finally:
            hook.remove()
        weights = self.expert_weights(hidden[0])
        for index, layer in enumerate(self.layers()):
            layer.weights = self.layer_weights(weights[..., index, :])
        self.last_weights = weights
        return self.model(*args, **kwargs)


# ---- Arrow and GenKnowSub -----------------------------------------------------------------------


class ArrowRouter(nn.Module):
    """Per token: a softmax over the top-k |⟨x, vₑ⟩| / T, the others 0 (the prototypes a buffer, so
    that they move with the model)."""

    def __init__(self, layer: ExpertLoRALinear, top_k: int, temperature: float):
        super().__init__()
        deltas = layer.B.float() @ layer.A.float()  # (E, d_out, d_in)
        prototypes = torch.linalg.svd(deltas, full_matrices=False)[2][:, 0].to(layer.A.dtype)  # (E, d_in)
        self.register_buffer("prototypes", prototypes)
        self.top_k, self.temperature = min(top_k, len(deltas)), temperature

    def forward(self, layer: ExpertLoRALinear, x: torch.Tensor) -> torch.Tensor:
        similarity = (x.to(self.prototypes.dtype) @ self.prototypes.T).abs()
        best, index = similarity.topk(self.top_k, dim=-1)
        scores = torch.full_like(similarity, float("-inf")).scatter_(-1, index, best)
        return torch.softmax(scores / self.temperature, dim=-1)


def subtract_general_knowledge(model: nn.Module, general: list[nn.Module]) -> None:
    """GenKnowSub: every expert's A and B minus the mean A and B of the general LoRAs, layer by layer."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoRALinear):
            mean_A = torch.stack([g.get_submodule(name).A.detach() for g in general]).mean(0)
            mean_B = torch.stack([g.get_submodule(name).B.detach() for g in general]).mean(0)
            module.A -= mean_A
            module.B -= mean_B


def inject_arrow(
    model: nn.Module,
    experts: list[nn.Module],
    top_k: int = 3,
    temperature: float = 1.0,
    general: list[nn.Module] = (),
) -> list[str]:
    """Arrow over the experts (copies of `model`, each with one LoRA), after GenKnowSub if general
    LoRAs (copies too) are given; nothing trains."""
    names = inject_experts(model, experts)
    if general:
        subtract_general_knowledge(model, list(general))
    for name in names:
        layer = model.get_submodule(name)
        layer.router = ArrowRouter(layer, top_k, temperature)
    return names


def demo() -> None:
    """Two LoRA experts, each trained on inputs from its own 4-dimensional subspace; a mixture of both
    kinds of input: each expert alone, Arrow (no training) and X-LoRA (its classifier trained)."""
    generator = torch.Generator().manual_seed(0)
    subspaces = torch.linalg.qr(torch.randn(64, 8, generator=generator))[0].split(4, dim=1)
    frozen = toy_model()
    tasks = []
    for U in subspaces:  # inputs in span(U); the task adds its own linear map to the frozen model's output
        x = torch.randn(256, 4, generator=generator) @ U.T * 4
        with torch.no_grad():
            y = frozen(x) + x @ torch.randn(64, 64, generator=generator).T / 8
        tasks.append((x, y))
    experts = []
    for x, y in tasks:
        expert = toy_model()
        inject_lora(expert, ["0", "2", "4"], r=4, alpha=4)
        train(expert, x, y, steps=300)
        experts.append(expert)
    inputs, targets = torch.cat([t[0] for t in tasks]), torch.cat([t[1] for t in tasks])
    loss = lambda model: nn.functional.mse_loss(model(inputs), targets).item()  # noqa: E731
    with torch.no_grad():
        print(f"the frozen model: loss on the mixture {loss(frozen):.4g}")
        for number, expert in enumerate(experts, 1):
            print(f"expert {number} alone: loss on the mixture {loss(expert):.4g}")
        arrow = toy_model()
        inject_arrow(arrow, [copy.deepcopy(e) for e in experts], top_k=1)
        print(f"arrow (top-1 of 2 experts, nothing trained): loss on the mixture {loss(arrow):.4g}")
    xlora = XLoRA(toy_model(), [copy.deepcopy(e) for e in experts], hidden_size=64, depth=2, size=32, dropout=0.0,
                  hidden_module="4")  # fmt: skip
    before, after = train(xlora, inputs, targets, steps=300, lr=1e-2)
    report("x-lora (a classifier over 2 experts)", xlora, before, after)


if __name__ == "__main__":
    demo()
