"""One trained vector for the whole model: Uni-LoRA projects it into every layer's LoRA factors.

"Uni-LoRA: One Vector Is All You Need." 2025. arXiv:2506.00799.

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

Equal to PEFT 0.21 `unilora`; `reference_impls.interop` loads its checkpoints.
"""

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

IMPLEMENTS = ("uni-lora",)

# The frameworks that provide the method.
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
    """θ_d, the one trained vector (each adapted layer holds this same module)."""

    def __init__(self, d: int, bound: float = 0.02):
        super().__init__()
        self.theta = nn.Parameter(torch.empty(d).uniform_(-bound, bound))


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


def merge_unilora(model: nn.Module) -> None:
    set_merged(model, UniLoRALinear, True)


def unmerge_unilora(model: nn.Module) -> None:
    set_merged(model, UniLoRALinear, False)


def demo() -> None:
    """Uni-LoRA on the toy task with θ_d of 256 and of 1,024 numbers for three rank-8 layers (3,072 LoRA numbers)."""
    x, y = toy_task()
    for d in (256, 1024):
        model = toy_model()
        inject_unilora(model, ["0", "2", "4"], r=8, d=d)
        before, after = train(model, x, y, lr=5e-2)
        report(f"uni-lora (θ_d of {d}) on 3 layers", model, before, after)
        report_merge(model, x, merge_unilora)


if __name__ == "__main__":
    demo()
