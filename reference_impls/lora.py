"""LoRA: low-rank adaptation of a frozen linear layer.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. "LoRA: Low-Rank Adaptation of Large Language
Models." ICLR 2022. arXiv:2106.09685. Scaling of rank-stabilised LoRA (rsLoRA): Kalajdzievski,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023, arXiv:2312.03732.

A pre-trained weight W₀ ∈ ℝ^{d_out×d_in} stays frozen; the update is a product of two small
trainable matrices, B ∈ ℝ^{d_out×r} and A ∈ ℝ^{r×d_in}, with rank r ≪ min(d_in, d_out):

    h = W₀ x + b + s · B A x,        s = α / r     (rsLoRA: s = α / √r)

A starts random and B starts at zero, so B A = 0 and the adapted model computes exactly what the
pre-trained one did. The scale s keeps the update's size stable when r changes (α is fixed while r
is tuned). After training, the update can be folded into the weight, so inference costs nothing:

    merge:    W ← W₀ + s · B A          unmerge:   W₀ ← W − s · B A

Trainable parameters per adapted d_in → d_out layer: r · (d_in + d_out).
"""

import math

import torch
from torch import nn

from reference_impls._plumbing import count_parameters, find_targets, freeze_all_but, replace_module, report, toy_model, toy_task, train

# The papers.yaml entries this module implements (the site and `catalog check --strict-impl` read it).
IMPLEMENTS = ("lora",)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank update s·BA."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.r, self.alpha = r, alpha
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        # A as nn.Linear initialises its weight (Kaiming-uniform); B = 0 makes BA = 0 at the start.
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        # (x Aᵀ) Bᵀ: two thin matrix products, never the full d_out × d_in matrix BA.
        update = (self.dropout(x).to(self.A.dtype) @ self.A.T) @ self.B.T
        return h + (self.scale * update).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def inject_lora(model: nn.Module, target_names: list[str], r: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, use_rslora: bool = False) -> list[str]:
    """Wrap every nn.Linear named in target_names with LoRA and freeze all else; returns their names."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora))
    freeze_all_but(model, LoRALinear, ("A", "B"))
    return targets


def merge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()


def demo() -> None:
    """Adapt a frozen MLP to a new task with rank-4 LoRA on every layer, then merge."""
    model = toy_model()
    x, y = toy_task()
    inject_lora(model, ["0", "2", "4"], r=4, alpha=8)
    before, after = train(model, x, y)
    report("LoRA r=4 on 3 layers", model, before, after)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        print(f"merged into the weights: max output change {(model(x) - unmerged).abs().max().item():.2e}")
    assert count_parameters(model)[0] == 3 * 4 * (64 + 64)


if __name__ == "__main__":
    demo()
