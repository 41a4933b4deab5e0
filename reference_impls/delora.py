"""DeLoRA: a low-rank update whose direction and strength are learned apart, its norm bounded by λ.

Bini, Girrbach, Akata. "Decoupling Angles and Strength in Low-rank Adaptation." ICLR 2025.
arXiv:2503.18225.

LoRA's update B A can grow without limit as training goes on, which makes its learning rate
fragile. DeLoRA normalises each rank-one term b_i a_iᵀ of the update to unit norm, and gives the
sum one learned strength λ, relative to the size of the frozen weight:

    ΔW = (λ / r) · B Ξ A · diag(w),        Ξ = diag(1 / (‖b_i‖ ‖a_i‖)),   w_j = ‖W₀[:, j]‖

with B ∈ ℝ^{d_out×r} (columns b_i), A ∈ ℝ^{r×d_in} (rows a_i) and w the norms of W₀'s columns, one
per input feature, fixed when the layer is made. Every rank-one term then has norm at most λ/r
times the weight's scale, so ‖ΔW‖ ≤ λ · max_j w_j whatever B and A become: the angles (B, A) are
learned freely and the strength is λ alone.

    h = W₀ x + b + ΔW x

Norms below 10⁻⁴ are taken as 10⁻⁴ (as PEFT does), so B = 0 at the start gives ΔW = 0 and the
model is unchanged; the paper instead starts from random B and subtracts the initial update. λ starts at
`lambda_` (15 in PEFT). Trainable parameters per layer: r (d_in + d_out) + 1.

In training, `dropout` drops inputs of the update (PEFT calls it `module_dropout`). Equals PEFT
0.21's `delora` on the same weights, in training too; `reference_impls.interop` loads its checkpoints.
"""

import math

import torch
from torch import nn

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

IMPLEMENTS = ("delora",)

# The frameworks that provide the method.
COVERED_BY = ("hf-peft",)

SMALLEST_NORM = 1e-4


class DeLoRALinear(nn.Module):
    """A frozen nn.Linear plus (λ/r) · B Ξ A · diag(w)."""

    def __init__(self, base: nn.Linear, r: int = 8, lambda_: float = 15.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"DeLoRA rank r must be positive, got {r}")
        self.base, self.r = base, r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the update's input, in training
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        self.lambda_ = nn.Parameter(torch.full((1,), float(lambda_), **factory))
        # w, the norms of W₀'s columns: fixed now, saved with the adapter (merging changes W₀).
        self.register_buffer("w", torch.linalg.norm(base.weight.detach(), dim=0))
        self.merged = False

    def strengths(self) -> torch.Tensor:
        """(λ / r) / (‖b_i‖ ‖a_i‖), one per rank-one term: the diagonal of (λ/r) Ξ."""
        a_norms = self.A.norm(dim=1).clamp(min=SMALLEST_NORM)
        b_norms = self.B.norm(dim=0).clamp(min=SMALLEST_NORM)
        return self.lambda_ / self.r / (a_norms * b_norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        # ((x ⊙ w) Aᵀ ⊙ strengths) Bᵀ: thin products, never the full d_out × d_in matrix.
        u = (self.dropout(x).to(self.A.dtype) * self.w) @ self.A.T
        return h + ((u * self.strengths()) @ self.B.T).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.B * self.strengths()) @ self.A * self.w

    # W ← W₀ + ΔW and back: the same fold as LoRA's.
    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def inject_delora(
    model: nn.Module, target_names: list[str], r: int = 8, lambda_: float = 15.0, dropout: float = 0.0
) -> list[str]:
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, DeLoRALinear(model.get_submodule(name), r, lambda_, dropout))
    freeze_all_but(model, DeLoRALinear, ("A", "B", "lambda_"))
    return targets


def merge_delora(model: nn.Module) -> None:
    set_merged(model, DeLoRALinear, True)


def unmerge_delora(model: nn.Module) -> None:
    set_merged(model, DeLoRALinear, False)


def bound(layer: DeLoRALinear) -> float:
    """The largest ‖ΔW‖_F the layer can reach with its current λ: λ · max_j w_j."""
    return (layer.lambda_.abs() * layer.w.max()).item()


def demo() -> None:
    """Train DeLoRA on the toy task, then check the update's norm against the bound λ · max_j w_j."""
    x, y = toy_task()
    model = toy_model()
    # The toy weights' columns have norms near 0.6, so the change the task asks for needs a large λ.
    inject_delora(model, ["0", "2", "4"], r=4, lambda_=30.0)
    before, after = train(model, x, y, lr=1e-2)
    report("DeLoRA (r = 4) on 3 layers", model, before, after)
    for name, layer in model.named_modules():
        if isinstance(layer, DeLoRALinear):
            norm = torch.linalg.norm(layer.delta_weight()).item()
            print(f"  layer {name}: λ = {layer.lambda_.item():.3f}, ‖ΔW‖_F = {norm:.3f} ≤ bound {bound(layer):.3f}")
    report_merge(model, x, merge_delora)


if __name__ == "__main__":
    demo()
