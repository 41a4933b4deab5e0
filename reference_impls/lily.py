"""Lily: low-rank adapters interconnected across layers, shared down-projections and routed up-projections.

Zhong, Zhao, Zhou. "Low-Rank Interconnected Adaptation across Layers." Findings of ACL 2025.
arXiv:2407.09946.

LoRA gives every layer its own pair (A, B). Lily shares them across the layers that play the same
role (every `q_proj`, say): each run of `stride` consecutive layers shares one low-rank
down-projection A ∈ ℝ^{r×d_in}, and all layers of the role share E up-projection "experts"
B₁ … B_E ∈ ℝ^{r×d_out}, which each layer mixes with its own router R ∈ ℝ^{E×r}:

    z = A x,        p = mean over the batch's tokens of softmax(R z),        h = W₀ x + b + s · zᵀ Σₑ pₑ Bₑ

Parameters per role: (L / stride) r d_in + E r d_out + L E r for its L layers. B = 0 at the start.
The mixing weights p are averaged over every token of the batch (as PEFT does), so one row's output
depends on the others in its batch, and the update cannot be merged: it changes with the input.

Equal to PEFT 0.21 `lily`; `reference_impls.interop` loads its checkpoints (each layer with its own
copy of the shared A and experts: the same numbers, no longer tied).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import (
    count_parameters,
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    toy_task,
    train,
)

FAMILY = "Mixtures and routing"

IMPLEMENTS = ("lily",)

# The frameworks that provide the method.
COVERED_BY = ("hf-peft",)


class LilyDown(nn.Module):
    """A (r × d_in), shared by a run of `stride` layers."""

    def __init__(self, d_in: int, r: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


class LilyExperts(nn.Module):
    """B₁ … B_E (E × r × d_out), shared by every layer of a role; zero at the start."""

    def __init__(self, r: int, d_out: int, experts: int):
        super().__init__()
        self.B = nn.Parameter(torch.zeros(experts, r, d_out))


class LilyLinear(nn.Module):
    """A frozen nn.Linear plus s · (A x)ᵀ Σₑ pₑ Bₑ, p from this layer's router, averaged over the batch."""

    def __init__(self, base: nn.Linear, down: LilyDown, experts: LilyExperts, scale: float = 1.0):
        super().__init__()
        self.base, self.down, self.experts, self.scale = base, down, experts, scale
        count, r, _ = experts.B.shape
        self.router = nn.Parameter(torch.empty(count, r))
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    def mixture(self, z: torch.Tensor) -> torch.Tensor:
        """p: the router's softmax, averaged over every token of the batch (E)."""
        return F.softmax(z @ self.router.T, dim=-1).reshape(-1, self.router.shape[0]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        z = F.linear(x.to(self.down.A.dtype), self.down.A)
        B = torch.einsum("e,erd->rd", self.mixture(z), self.experts.B)
        return h + (self.scale * z @ B).to(h.dtype)


def inject_lily(
    model: nn.Module, target_names: list[str], r: int = 32, stride: int = 1, experts: int = 2, scale: float = 1.0
) -> list[str]:
    """Lily on the named layers. A role is a target name and a weight shape; in model order, each run of
    `stride` layers of a role shares its A, and all of them its experts."""
    targets = find_targets(model, target_names)
    roles: dict[tuple, list[str]] = {}
    for name in targets:
        base = model.get_submodule(name)
        role = (next(t for t in target_names if name == t or name.endswith("." + t)), tuple(base.weight.shape))
        roles.setdefault(role, []).append(name)
    for (_, (d_out, d_in)), names in roles.items():
        shared_experts = LilyExperts(r, d_out, experts)
        for position, name in enumerate(names):
            if position % stride == 0:
                down = LilyDown(d_in, r)
            replace_module(model, name, LilyLinear(model.get_submodule(name), down, shared_experts, scale))
    freeze_all_but(model, LilyLinear, ("down", "experts", "router"))
    return targets


def demo() -> None:
    """Lily on four blocks of one width: their `proj` layers share three experts, and A in pairs."""
    from collections import OrderedDict

    x, y = toy_task()
    torch.manual_seed(0)
    block = lambda: nn.Sequential(OrderedDict(proj=nn.Linear(64, 64), act=nn.Tanh()))  # noqa: E731
    model = nn.Sequential(*[block() for _ in range(4)])
    inject_lily(model, ["proj"], r=16, stride=2, experts=3)
    assert model[0].proj.down is model[1].proj.down and model[0].proj.experts is model[3].proj.experts
    before, after = train(model, x, y, lr=1e-2)
    report("lily (r = 16, stride 2, 3 experts) on 4 layers", model, before, after)
    trainable, _ = count_parameters(model)
    print(f"  {trainable:,} trained numbers, where LoRA of rank 16 on the same layers trains {4 * 16 * 128:,}")


if __name__ == "__main__":
    demo()
