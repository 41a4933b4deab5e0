"""Tiny trained vectors projected into LoRA's parameters: Uni-LoRA (one vector for the whole model)
and TinyLoRA (a few numbers mixing fixed random cores between frozen SVD factors).

**Uni-LoRA.** "Uni-LoRA: One Vector Is All You Need." 2025. arXiv:2506.00799.

Put every LoRA parameter of the model — each adapted layer's A ∈ ℝ^{r×d_in} and B ∈ ℝ^{d_out×r},
all flattened and concatenated — into one long vector θ_D of length D. Uni-LoRA trains a short
vector θ_d ∈ ℝ^d instead and sets θ_D = P θ_d with a fixed sparse projection P: each LoRA entry
copies one entry of θ_d, chosen at random but balanced (every entry of θ_d is used ⌊D/d⌋ or ⌈D/d⌉
times), and divided by the square root of that count, so that P's columns are orthonormal (an
isometry: distances in θ_d are distances in θ_D):

    θ_D = P θ_d,        P[k, iₖ] = 1 / √cₖ,        A = θ_D[A's entries],   B = θ_D[B's entries],   ΔW = B A

Trained: d numbers for the whole model (PEFT's default d = 256), whatever its size. θ_d starts
uniform in ±0.02, so ΔW is small but not 0 at the start. The assignment is PEFT's (`balanced_
indices`, from a seed, over the layers in model order, A then B), so a checkpoint that does not
save it is rebuilt here exactly.

**TinyLoRA.** "Learning to Reason in 13 Parameters." 2026. arXiv:2602.04118. LoRA-XS (frozen
factors from the truncated SVD W₀ ≈ U_r Σ_r V_rᵀ around a trained r × r core R) with the core itself
reduced to u numbers v through u fixed random matrices Pᵢ ∈ ℝ^{r×r}, Pᵢ ~ N(0, 1/r):

    ΔW = B R A,        R = Σᵢ vᵢ Pᵢ,        B = U_r Σ_r^½,   A = Σ_r^½ V_rᵀ

Layers may share v ("weight tying" τ ∈ [0, 1]): the L adapted layers, in model order, form
max(1, round(L (1 − τ))) groups of consecutive layers, each with one v. Trained: u per group (u = 13
and τ = 1 is the paper's 13 parameters for a whole model). v = 0 at the start, so ΔW = 0. Each
layer's Pᵢ are drawn from the seed plus the layer's index. Splitting Σ_r evenly between B and A is
PEFT's choice (LoRA-XS keeps it on one side); with R confined to the span of the Pᵢ the two give
different u-dimensional families of updates, and the reference follows PEFT.

Both equal PEFT 0.21 (`unilora`, `tinylora`); `reference_impls.interop` loads their checkpoints.
"""

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    report_merge,
    set_merged,
    toy_model,
    toy_task,
    train,
)
from reference_impls.lora import LoRALinear

FAMILY = "Low-rank updates"

IMPLEMENTS = ("uni-lora", "tinylora")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def balanced_indices(count: int, d: int, seed: int) -> torch.Tensor:
    """`count` entries of θ_d, each used ⌊count/d⌋ or ⌈count/d⌉ times, shuffled (PEFT's draw, NumPy's
    generator): every index repeated ⌊count/d⌋ times, then `count mod d` distinct extras, shuffled."""
    rng = np.random.default_rng(seed)
    indices = np.repeat(np.arange(d), count // d)
    if count % d:
        indices = np.concatenate([indices, rng.choice(d, size=count % d, replace=False)])
    rng.shuffle(indices)
    return torch.as_tensor(indices, dtype=torch.long)


class SharedVector(nn.Module):
    """A trained vector θ that several layers hold (Uni-LoRA's θ_d, TinyLoRA's v): uniform in ±bound, or 0."""

    def __init__(self, d: int, bound: float = 0.02):
        super().__init__()
        self.theta = nn.Parameter(torch.empty(d).uniform_(-bound, bound) if bound else torch.zeros(d))


class UniLoRALinear(nn.Module):
    """A frozen nn.Linear plus B A x, every entry of A and B an entry of θ_d times 1/√(its use count)."""

    def __init__(self, base: nn.Linear, vector: SharedVector, r: int = 4):
        super().__init__()
        self.base, self.vector, self.r = base, vector, r
        # Filled by `assign`, once every layer of the model is known.
        self.register_buffer("index_A", torch.zeros(r, base.in_features, dtype=torch.long))
        self.register_buffer("index_B", torch.zeros(base.out_features, r, dtype=torch.long))
        self.register_buffer("scale_A", torch.zeros(r, base.in_features))
        self.register_buffer("scale_B", torch.zeros(base.out_features, r))
        self.merged = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.vector.theta
        return theta[self.index_A] * self.scale_A.to(theta.dtype), theta[self.index_B] * self.scale_B.to(theta.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        A, B = self.factors()
        return h + F.linear(F.linear(x.to(A.dtype), A), B).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.factors()
        return B @ A

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


@torch.no_grad()
def assign(layers: list[UniLoRALinear], d: int, seed: int) -> None:
    """Give every layer its entries of θ_d: one balanced draw over all A's and B's, in layer order."""
    sizes = [size for layer in layers for size in (layer.index_A.numel(), layer.index_B.numel())]
    indices = balanced_indices(sum(sizes), d, seed)
    scales = torch.bincount(indices, minlength=d).float().clamp_min(1).rsqrt()  # 1/√(uses of each entry)
    chunks = iter(indices.split(sizes))
    for layer in layers:
        for index, scale in ((layer.index_A, layer.scale_A), (layer.index_B, layer.scale_B)):
            chunk = next(chunks).view_as(index)
            index.copy_(chunk)
            scale.copy_(scales[chunk])


def inject_unilora(model: nn.Module, target_names: list[str], r: int = 4, d: int = 256, seed: int = 42) -> list[str]:
    """Uni-LoRA on the named layers: one θ_d of length d for all of them."""
    targets = find_targets(model, target_names)
    vector = SharedVector(d)
    layers = [UniLoRALinear(model.get_submodule(name), vector, r) for name in targets]
    for name, layer in zip(targets, layers):
        replace_module(model, name, layer)
    if not vector.theta.is_meta:  # on the meta device (counting parameters only) there is nothing to assign
        assign(layers, d, seed)
    freeze_all_but(model, UniLoRALinear, ("vector",))
    return targets


class TinyLoRALinear(nn.Module):
    """A frozen nn.Linear plus B (Σᵢ vᵢ Pᵢ) A x: frozen SVD factors B, A and random cores Pᵢ, trained v."""

    def __init__(self, base: nn.Linear, vector: SharedVector, r: int = 2, seed: int = 42, dropout: float = 0.0):
        super().__init__()
        self.base, self.vector = base, vector
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the input, in training
        d_out, d_in = base.weight.shape
        r, u = min(r, d_out, d_in), vector.theta.shape[0]
        if base.weight.is_meta:  # counting parameters only: no SVD, no draw
            A, B, P = (torch.empty(shape, device="meta") for shape in ((r, d_in), (d_out, r), (u, r, r)))
        else:
            U, S, Vh = torch.linalg.svd(base.weight.detach().float(), full_matrices=False)
            root = S[:r].sqrt()
            A, B = (root[:, None] * Vh[:r]).to(base.weight.dtype), (U[:, :r] * root).to(base.weight.dtype)
            P = torch.normal(0.0, r**-0.5, size=(u, r, r), generator=torch.Generator().manual_seed(seed))
        self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.register_buffer("P", P.to(base.weight.device))
        self.merged = False

    def core(self) -> torch.Tensor:
        v = self.vector.theta
        return torch.einsum("i,ijk->jk", v, self.P.to(v.dtype))  # R = Σᵢ vᵢ Pᵢ

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        x = self.dropout(x).to(self.A.dtype)
        return h + F.linear(F.linear(F.linear(x, self.A), self.core().to(self.A.dtype)), self.B).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.core().to(self.A.dtype) @ self.A

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def tinylora_groups(count: int, tying: float) -> list[int]:
    """The group (index of the shared v) of each of `count` layers in model order: max(1, round(count (1 − τ)))
    groups of ⌊count / groups⌋ consecutive layers, the last group taking the remainder."""
    groups = max(1, round(count * (1.0 - tying)))
    size = max(1, count // groups)
    return [min(index // size, groups - 1) for index in range(count)]


def inject_tinylora(
    model: nn.Module,
    target_names: list[str],
    r: int = 2,
    u: int = 64,
    tying: float = 0.0,
    seed: int = 42,
    dropout: float = 0.0,
) -> list[str]:
    """TinyLoRA on the named layers: u trained numbers per group of layers (tying τ), v = 0 at the start."""
    targets = find_targets(model, target_names)
    groups = tinylora_groups(len(targets), tying)
    vectors = [SharedVector(u, bound=0.0) for _ in range(max(groups) + 1)]
    for index, (name, group) in enumerate(zip(targets, groups)):
        layer = TinyLoRALinear(model.get_submodule(name), vectors[group], r, seed=seed + index, dropout=dropout)
        replace_module(model, name, layer)
    freeze_all_but(model, TinyLoRALinear, ("vector",))
    return targets


def merge_projections(model: nn.Module) -> None:
    set_merged(model, (UniLoRALinear, TinyLoRALinear), True)


def unmerge_projections(model: nn.Module) -> None:
    set_merged(model, (UniLoRALinear, TinyLoRALinear), False)


def top_singular_task(model: nn.Module, layers: list[str], r: int = 2, seed: int = 1):
    """Inputs, and the outputs of `model` with each named layer's top-r singular block W[U_r, V_r]
    changed at random: a task TinyLoRA can reach, since it moves only those directions."""
    generator = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for name in layers:
            W = teacher.get_submodule(name).weight
            U, S, Vh = torch.linalg.svd(W)
            change = torch.randn(r, r, generator=generator) * S[:r, None]
            W += U[:, :r] @ change @ Vh[:r]
        x = torch.randn(512, W.shape[1], generator=generator)
        return x, teacher(x)


def demo() -> None:
    """Uni-LoRA with θ_d of 256 and of 1,024 numbers for three rank-8 layers (3,072 LoRA numbers);
    TinyLoRA (r = 2) with u = 13 per layer and with one v of 13 for all three layers."""
    x, y = toy_task()
    for d in (256, 1024):
        model = toy_model()
        inject_unilora(model, ["0", "2", "4"], r=8, d=d)
        before, after = train(model, x, y, lr=5e-2)
        report(f"uni-lora (θ_d of {d}) on 3 layers", model, before, after)
        report_merge(model, x, merge_projections)
    # TinyLoRA moves only each layer's top-r singular directions: the shared toy task lies mostly
    # outside them, so it trains here on a task inside them (and shows the toy task for contrast).
    x_top, y_top = top_singular_task(toy_model(), ["0", "2", "4"])
    for tying in (0.0, 1.0):
        model = toy_model()
        inject_tinylora(model, ["0", "2", "4"], r=2, u=13, tying=tying)
        before, after = train(copy.deepcopy(model), x, y, lr=5e-2)
        print(f"tinylora, tying {tying:g}, on the toy task (outside its reach): {before:.4g} → {after:.4g}")
        before, after = train(model, x_top, y_top, lr=5e-2)
        report(f"tinylora (u = 13, tying {tying:g}) on 3 layers, top-2 singular task", model, before, after)
        report_merge(model, x_top, merge_projections)


if __name__ == "__main__":
    demo()
