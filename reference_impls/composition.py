"""Composing adapters that were trained separately: AdapterFusion, stacking, and weight arithmetic.

Pfeiffer, Kamath, Rücklé, Cho, Gurevych. "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning." EACL 2021. arXiv:2005.00247. N task adapters are trained one by one and frozen;
then, at every place that has them, a fusion layer learns which to listen to, token by token. With
h the hidden state the adapters read and z_n = A_n(h) what adapter n would add:

    s = softmax_n( (h Q + b_Q) · (z_n K + b_K) ),      o = Σ_n s_n · z_n V,      added like one adapter

Q, K, V ∈ ℝ^{d×d}; V starts at the identity (and a penalty λ‖I − V‖²_F keeps it near there), so at
the start o is a mix of the adapters' own outputs. Trainable parameters per place: 3d² + 2d.

Stacking (Pfeiffer, Vulić, Gurevych, Ruder, "MAD-X", EMNLP 2020, arXiv:2005.00052): a task adapter
reads what a language adapter produced, y_k = y_{k−1} + A_k(read(y_{k−1})), so that the language
adapter can be swapped at test time. Each language also gets an invertible adapter on the token
embeddings, a NICE coupling (Dinh et al. 2015) of the two halves of an embedding e = [e₁, e₂]:

    o₁ = e₁ + F(e₂),   o₂ = e₂ + G(o₁);        inverse:  e₂ = o₂ − G(o₁),   e₁ = o₁ − F(e₂)

with F, G small bottleneck MLPs (halving the width). The inverse runs before the tied output
embeddings, so that language-specific input and output vocabularies are both adapted.

Both compose bottleneck adapters (bottleneck.py) in the same places: around any sublayer, where
read(y) = y, or inside a post-norm Add & Norm block LN(y + r), where, as in Pfeiffer's placement,
read(y) = LN(y + r) and the block's LayerNorm is applied once more at the end.

Wang, Tsvetkov, Ruder, Neubig. "Efficient Test Time Adapter Ensembling for Low-resource Language
Varieties." Findings of EMNLP 2021 (2021.findings-emnlp.63) (EMEA). For a language variety that has
no adapter of its own, the adapters of related languages are ensembled at every place,

    y + Σ_n w_n A_n(read(y)),      w = softmax(α),   α = 0 (the plain average) for every test batch,

and the weights α alone take a few gradient steps on that batch to lower the entropy of the model's
predictions, H = −Σ_c p_c log p_c averaged over the batch; then the batch is predicted. No labels, and
no parameter of the model or of the adapters changes. Trainable at test time: N per place. The step
size and count (here SGD, 10 steps of 1.0) are ours; the paper's exact values could not be checked.
At α = 0 the ensemble is the mean of the adapters' outputs, which is AdapterHub's `Average` with
weights 1 each and normalize_weights=False; with its default normalised weights AdapterHub 1.3
averages w_n·(y + A_n), i.e. divides the whole block output by N (tested), which we do not follow.

Arithmetic on the weights of trained modules makes a new module without training:
- Chronopoulou, Peters, Fraser, Dodge. "AdapterSoup: Weight Averaging to Improve Generalization of
  Pretrained Language Models." Findings of EACL 2023 (2023.findings-eacl.153): the uniform average of the
  adapters of related domains (the paper picks them by text similarity or clustering; not here).
- Zhang, Chen, Liu, He. "Composing Parameter-Efficient Modules with Arithmetic Operations."
  NeurIPS 2023. arXiv:2306.14870: addition θ = Σ_i λ_i θ_i (Σ λ_i = 1), parameter by parameter,
  and negation: LoRA (A, B) → (A, −B), so that ΔW → −ΔW; (IA)³ l → 2 − l, so that the update
  (l − 1) ⊙ h becomes −(l − 1) ⊙ h. Adding (IA)³ vectors adds their updates; adding LoRA's A and B
  separately does not add the updates B A (cross terms appear), which is why the paper starts all
  LoRA modules from the same A.
"""

import copy

import torch
from torch import nn

from reference_impls._plumbing import find_targets, output_width, replace_module, report, toy_model, toy_task, train
from reference_impls.bottleneck import (
    ACTIVATIONS,
    HOULSBY,
    Adapter,
    SequentialAdapter,
    inject_adapters,
    is_add_norm_block,
)
from reference_impls.ia3 import IA3Linear, inject_ia3
from reference_impls.lora import LoRALinear, inject_lora

FAMILY = "Composition and merging"

IMPLEMENTS = ("adapterfusion", "mad-x", "adaptersoup", "pem-arithmetic", "emea")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("adapterhub", "adapters-library", "modular-deep-learning")


class Fusion(nn.Module):
    """Attention over the adapters' outputs: o = Σ_n softmax_n((h Q)·(z_n K)) · z_n V."""

    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.query, self.key = nn.Linear(d, d, **factory), nn.Linear(d, d, **factory)
        self.value = nn.Linear(d, d, bias=False, **factory)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        nn.init.eye_(self.value.weight)  # the adapters' outputs themselves, at the start

    def forward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h: (..., d); z: (..., N, d), the N adapters' outputs for h."""
        scores = (self.key(z) @ self.query(h).unsqueeze(-1)).squeeze(-1)  # (..., N)
        return (scores.softmax(dim=-1).unsqueeze(-2) @ self.value(z)).squeeze(-2)


class ComposedAdapters(nn.Module):
    """N bottleneck adapters at one place, stacked ("stack"), fused ("fuse") or ensembled ("ensemble")."""

    def __init__(self, sublayer: nn.Module, adapters: list[Adapter], mode: str):
        super().__init__()
        self.sublayer, self.adapters, self.mode = sublayer, nn.ModuleList(adapters), mode
        self.add_norm = is_add_norm_block(sublayer)  # then forward takes the hidden states and the residual r
        weight = adapters[0].up.weight
        d = adapters[0].up.out_features
        self.fusion = Fusion(d, weight.device, weight.dtype) if mode == "fuse" else None
        # EMEA's ensemble weights w = softmax(α): α = 0, the plain average, until test time moves it.
        self.ensemble_logits = (
            nn.Parameter(torch.zeros(len(adapters), device=weight.device, dtype=weight.dtype))
            if mode == "ensemble"
            else None
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.add_norm:
            block, residual = self.sublayer, inputs[1]
            y = block.dropout(block.dense(inputs[0]))
            read = finish = lambda y: block.LayerNorm(y + residual)
        else:
            y = self.sublayer(*inputs)
            read = finish = lambda y: y
        if self.mode == "stack":
            for adapter in self.adapters:
                y = y + adapter(read(y))
            return finish(y)
        h = read(y)
        z = torch.stack([adapter(h) for adapter in self.adapters], dim=-2)
        if self.mode == "ensemble":
            return finish(y + (self.ensemble_logits.softmax(0).unsqueeze(-1) * z).sum(-2))
        return finish(y + self.fusion(h, z))


class InvertibleAdapter(nn.Module):
    """MAD-X's NICE coupling on token embeddings: exactly invertible, whatever F and G compute."""

    def __init__(self, d: int, reduction: int = 2, activation: str = "relu", device=None, dtype=None):
        super().__init__()
        self.half = d // 2
        factory = {"device": device, "dtype": dtype}

        def mlp(width_in: int, width_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(width_in, width_in // reduction, **factory),
                ACTIVATIONS[activation](),
                nn.Linear(width_in // reduction, width_out, **factory),
            )

        self.F, self.G = mlp(d - self.half, self.half), mlp(self.half, d - self.half)
        for net in (self.F, self.G):  # the identity at the start, like every adapter here
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        e1, e2 = e[..., : self.half], e[..., self.half :]
        o1 = e1 + self.F(e2)
        return torch.cat([o1, e2 + self.G(o1)], dim=-1)

    def inverse(self, o: torch.Tensor) -> torch.Tensor:
        o1, o2 = o[..., : self.half], o[..., self.half :]
        e2 = o2 - self.G(o1)
        return torch.cat([o1 - self.F(e2), e2], dim=-1)


class ThenInvertible(nn.Module):
    """The embedding layer, then the invertible adapter."""

    def __init__(self, embeddings: nn.Module, invertible: InvertibleAdapter):
        super().__init__()
        self.embeddings, self.invertible = embeddings, invertible

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.invertible(self.embeddings(*args, **kwargs))


class InverseThen(nn.Module):
    """The invertible adapter's inverse, then the output embeddings (the same adapter's parameters)."""

    def __init__(self, output: nn.Module, invertible: InvertibleAdapter):
        super().__init__()
        self.output, self.invertible = output, invertible

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.invertible.inverse(hidden))


def inject_invertible(
    model: nn.Module,
    embeddings_name: str,
    output_name: str | None = None,
    reduction: int = 2,
    activation: str = "relu",
    trainable: bool = True,
) -> InvertibleAdapter:
    """Put an invertible adapter after the named embedding module and, if output_name names the output
    embeddings (a language-model head), its inverse before them. Trainable with the language adapter
    (trainable=True), frozen while a task adapter is trained on top (False); the rest is left as it is."""
    embeddings = model.get_submodule(embeddings_name)
    weight = next(embeddings.parameters())
    invertible = InvertibleAdapter(weight.shape[-1], reduction, activation, weight.device, weight.dtype)
    invertible.requires_grad_(trainable)
    replace_module(model, embeddings_name, ThenInvertible(embeddings, invertible))
    if output_name is not None:
        replace_module(model, output_name, InverseThen(model.get_submodule(output_name), invertible))
    return invertible


def inject_composition(
    model: nn.Module, target_names: list[str], adapters: int, m: int, mode: str = "fuse", activation: str = "relu"
) -> list[str]:
    """Give each named sublayer `adapters` bottleneck adapters (fill them with load_adapter). Trainable:
    the fusion layers ("fuse"), or the last adapter of each stack ("stack": the task adapter on top
    of the language adapters)."""
    if mode not in ("fuse", "stack", "ensemble"):
        raise ValueError(f"mode is 'fuse', 'stack' or 'ensemble', not {mode!r}")
    targets = find_targets(model, target_names, kind=nn.Module)
    for name in targets:
        sublayer = model.get_submodule(name)
        weight = next(sublayer.parameters())
        d = output_width(sublayer)
        slots = [Adapter(d, m, activation, device=weight.device, dtype=weight.dtype) for _ in range(adapters)]
        replace_module(model, name, ComposedAdapters(sublayer, slots, mode))
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, ComposedAdapters):
            if mode != "ensemble":  # an ensemble learns nothing in training: its weights move at test time
                (module.fusion if mode == "fuse" else module.adapters[-1]).requires_grad_(True)
    return targets


@torch.no_grad()
def load_adapter(model: nn.Module, index: int, trained: nn.Module) -> None:
    """Copy the adapters of a model trained with bottleneck.inject_adapters into slot `index`, place by place."""
    for name, module in trained.named_modules():
        if isinstance(module, SequentialAdapter):
            model.get_submodule(name).adapters[index].load_state_dict(module.adapter.state_dict())


def ensemble_weights(model: nn.Module) -> list[torch.Tensor]:
    """w = softmax(α) at every ensemble place, in module order."""
    return [
        m.ensemble_logits.softmax(0).detach()
        for m in model.modules()
        if isinstance(m, ComposedAdapters) and m.mode == "ensemble"
    ]


def emea(model: nn.Module, predict, steps: int = 10, lr: float = 1.0) -> tuple[torch.Tensor, list[float]]:
    """EMEA for one test batch: every ensemble's α back to 0 (the average), `steps` SGD steps on the
    mean entropy of predict() (the batch's class logits) with respect to the α only, then predict once
    more. Returns the final logits and the entropy before each step and at the end."""
    logits = [m.ensemble_logits for m in model.modules() if isinstance(m, ComposedAdapters) and m.mode == "ensemble"]
    if not logits:
        raise ValueError("the model has no ensemble of adapters: inject_composition(..., mode='ensemble')")
    entropies = []
    with torch.no_grad():
        for alpha in logits:
            alpha.zero_()
    for step in range(steps + 1):
        with torch.enable_grad():
            for alpha in logits:
                alpha.requires_grad_(True)
            log_p = predict().log_softmax(-1)
            entropy = -(log_p.exp() * log_p).sum(-1).mean()
            entropies.append(entropy.item())
            if step == steps:
                break
            gradients = torch.autograd.grad(entropy, logits)  # the α only: nothing else gets a .grad
        with torch.no_grad():
            for alpha, gradient in zip(logits, gradients):
                alpha -= lr * gradient
    for alpha in logits:
        alpha.requires_grad_(False)
    with torch.no_grad():
        return predict(), entropies


def fusion_penalty(model: nn.Module) -> torch.Tensor:
    """Σ ‖I − V‖²_F over the fusion layers: add λ times it to the loss (the paper's regulariser)."""
    values = [module.value.weight for module in model.modules() if isinstance(module, Fusion)]
    terms = [
        ((value - torch.eye(value.shape[0], device=value.device, dtype=value.dtype)) ** 2).sum() for value in values
    ]
    return torch.stack(terms).sum()


# ---- arithmetic on trained modules ------------------------------------------------------------


def method_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a PEFT method trains (the ones left trainable by its inject function)."""
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


@torch.no_grad()
def add_modules(models: list[nn.Module], weights: list[float] | None = None) -> nn.Module:
    """A copy of models[0] whose method parameters are Σ_i λ_i θ_i (λ uniform by default: AdapterSoup)."""
    weights = weights if weights is not None else [1 / len(models)] * len(models)
    if abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"the weights of an addition sum to 1, not {sum(weights)}")
    combined = copy.deepcopy(models[0])
    parameters = [method_parameters(model) for model in models]
    for name, parameter in method_parameters(combined).items():
        parameter.copy_(sum(weight * theta[name] for weight, theta in zip(weights, parameters)))
    return combined


@torch.no_grad()
def negate(model: nn.Module) -> nn.Module:
    """A copy whose LoRA and (IA)³ updates point the other way: B → −B, l → 2 − l."""
    negated = copy.deepcopy(model)
    for module in negated.modules():
        if isinstance(module, LoRALinear):
            module.B.neg_()
        elif isinstance(module, IA3Linear):
            module.l.copy_(2 - module.l)
        elif any(parameter.requires_grad for parameter in module.parameters(recurse=False)):
            raise ValueError(f"negation is defined for LoRA and (IA)³, not {type(module).__name__}")
    return negated


def demo() -> None:
    """Fuse two task adapters for a task that mixes them; average two (IA)³ modules trained on
    different data of one task (a soup); negate a LoRA module to unlearn its task."""
    (x, y1), (_, y2) = toy_task(seed=1), toy_task(seed=2)  # the same inputs, two tasks
    y_mixed = (y1 + y2) / 2
    fused = toy_model()
    inject_composition(fused, ["2", "4"], adapters=2, m=8, mode="fuse", activation=HOULSBY["activation"])
    for index, y in enumerate((y1, y2)):
        model = toy_model()
        inject_adapters(model, ["2", "4"], m=8, **HOULSBY)
        train(model, x, y)
        load_adapter(fused, index, model)
    before, after = train(fused, x, y_mixed)
    report("AdapterFusion of two task adapters, on their mixed task", fused, before, after)

    loss, held_out = nn.MSELoss(), slice(256, 512)
    halves = []
    for rows in (slice(0, 32), slice(32, 64)):  # few examples each: each module overfits its own
        model = toy_model()
        inject_ia3(model, ["0", "2", "4"])
        train(model, x[rows], y1[rows])
        halves.append(model)
    with torch.no_grad():
        alone = ", ".join(f"{loss(model(x[held_out]), y1[held_out]):.4g}" for model in halves)
        print(
            f"(IA)³ modules trained on two sets of 32 examples, loss on held-out examples: {alone}; "
            f"their average (no training): {loss(add_modules(halves)(x[held_out]), y1[held_out]):.4g}"
        )

    model = toy_model()
    inject_lora(model, ["0", "2", "4"], r=4, alpha=8)
    train(model, x, y1)
    with torch.no_grad():
        print(
            f"LoRA on its task: loss {loss(model(x), y1):.4g}; the base model: {loss(toy_model()(x), y1):.4g}; "
            f"the negated module (unlearning): {loss(negate(model)(x), y1):.4g}"
        )

    emea_demo()


def emea_demo() -> None:
    """Two "language" adapters, each trained on its own 8-class task; a batch of a variety close to the
    first: EMEA moves the ensemble toward the first adapter without a label."""
    (x, y1), (_, y2) = toy_task(seed=1), toy_task(seed=2)
    labels = [y[:, :8].argmax(-1) for y in (y1, y2)]
    classify = lambda model, inputs: model(inputs)[:, :8]
    ensemble = toy_model()
    inject_composition(ensemble, ["2", "4"], adapters=2, m=8, mode="ensemble", activation=HOULSBY["activation"])
    for index, target in enumerate(labels):
        model = toy_model()
        inject_adapters(model, ["2", "4"], m=8, **HOULSBY)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(classify(model, x[:256]), target[:256]).backward()
            optimizer.step()
        load_adapter(ensemble, index, model)
    batch = x[256:] + 0.1 * torch.randn_like(x[256:])  # held-out inputs of a variety of language 1
    with torch.no_grad():
        average = classify(ensemble, batch)
    adapted, entropies = emea(ensemble, lambda: classify(ensemble, batch))
    accuracy = lambda logits: (logits.argmax(-1) == labels[0][256:]).float().mean().item()
    weights = ", ".join(f"{w[0]:.2f}/{w[1]:.2f}" for w in ensemble_weights(ensemble))
    print(
        f"EMEA on a variety of language 1: prediction entropy {entropies[0]:.3f} → {entropies[-1]:.3f}; "
        f"weights of the two adapters per place {weights}; accuracy {accuracy(average):.3f} with the plain "
        f"average, {accuracy(adapted):.3f} after EMEA"
    )


if __name__ == "__main__":
    demo()
