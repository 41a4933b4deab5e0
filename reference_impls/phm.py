"""Compacter: bottleneck adapters whose projections are sums of Kronecker products.

Karimi Mahabadi, Henderson, Ruder. "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers."
NeurIPS 2021. arXiv:2106.04647.

A parameterised hypercomplex multiplication (PHM) layer builds its weight H ∈ ℝ^{k×d} from n
Kronecker products:

    H = Σ_{i=1}^{n} S_i ⊗ W_i,      S_i ∈ ℝ^{n×n},   W_i ∈ ℝ^{(k/n)×(d/n)},      y = x H + b

Compacter shares the "slow" matrices S_i between every adapter layer of the model and makes each
layer's "fast" matrices low-rank, W_i = s_i t_iᵀ with s_i ∈ ℝ^{(k/n)×r}, t_i ∈ ℝ^{r×(d/n)} (r = 1 in
the paper: rank-one). A Compacter is a bottleneck adapter (see bottleneck.py) with PHM down- and
up-projections, placed like Houlsby's adapters (after attention and after the FFN). Compacter++
keeps only the one after the FFN, in Pfeiffer et al.'s place: it reads the output of the FFN's
Add & Norm block and that LayerNorm runs again, LN(y + A(LN(y + r)) + r) with y the FFN's output
and r its residual. That is AdapterHub's CompacterPlusPlusConfig (a SeqBnConfig with PHM layers),
which the tests match; the paper says Compacter++ follows Pfeiffer et al. in dropping the adapter
after attention, and we could not check its text here for whether the LayerNorm is reapplied.

Trainable parameters: n³ shared, plus per PHM layer n·r·(k/n + d/n) + d (bias); so per adapter of
width d and bottleneck m: 2·n·r·(d/n + m/n) + d + m, against 2·d·m + d + m for a plain adapter.
The up-projection's t_i start at zero, so every adapter starts as the identity.
"""

import torch
from torch import nn

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    output_width,
    replace_module,
    report,
    toy_model,
    toy_task,
    train,
)
from reference_impls.bottleneck import ACTIVATIONS, AddNormAdapter, SequentialAdapter, is_add_norm_block

FAMILY = "Bottleneck adapters"

IMPLEMENTS = ("compacter",)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("adapters-library", "opendelta", "scaling-down-to-scale-up", "peft-ref")


class PHMLinear(nn.Module):
    """y = x (Σ_i S_i ⊗ s_i t_iᵀ) + b, with the slow S shared by every PHM layer of the model."""

    def __init__(self, d_in: int, d_out: int, rules: nn.Parameter, rank: int = 1, zero_init: bool = False):
        super().__init__()
        n = rules.shape[0]
        if d_in % n or d_out % n:
            raise ValueError(f"PHM layers need widths divisible by n = {n}, not {d_in} → {d_out}")
        self.rules = rules  # the same nn.Parameter in every layer; PyTorch counts and trains it once
        self.s = nn.Parameter(torch.empty(n, d_in // n, rank))
        self.t = nn.Parameter(torch.empty(n, rank, d_out // n))
        self.b = nn.Parameter(torch.zeros(d_out))
        nn.init.xavier_uniform_(self.s)
        nn.init.zeros_(self.t) if zero_init else nn.init.xavier_uniform_(self.t)

    def weight(self) -> torch.Tensor:
        """H ∈ ℝ^{d_in×d_out}: H[(a,c),(b,e)] = Σ_i S_i[a,b] · W_i[c,e], i.e. Σ_i S_i ⊗ W_i."""
        n, p, q = self.s.shape[0], self.s.shape[1], self.t.shape[2]
        W = self.s @ self.t  # (n, d_in/n, d_out/n): the rank-r fast weights
        return torch.einsum("iab,ice->acbe", self.rules, W).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().to(x.dtype) + self.b.to(x.dtype)


class CompacterAdapter(nn.Module):
    """A(h) = PHM_up(f(PHM_down(h)))."""

    def __init__(self, d: int, m: int, rules: nn.Parameter, rank: int = 1, activation: str = "gelu"):
        super().__init__()
        self.down = PHMLinear(d, m, rules, rank)
        self.f = ACTIVATIONS[activation]()
        self.up = PHMLinear(m, d, rules, rank, zero_init=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.f(self.down(h)))


def inject_compacter(
    model: nn.Module,
    target_names: list[str],
    m: int = 32,
    n: int = 4,
    rank: int = 1,
    activation: str = "gelu",
    placement: str = "sequential",
) -> list[str]:
    """A Compacter at each named sublayer, all sharing one set of slow weights, and freeze all else.

    placement="sequential": after the sublayer's output (Compacter: Houlsby's places, the attention
    and FFN output projections). placement="after_norm": Compacter++ in Pfeiffer's place; each target
    is a post-norm Add & Norm block (BERT's `output`), whose LayerNorm runs again after the adapter."""
    if placement not in ("sequential", "after_norm"):
        raise ValueError(f"placement is 'sequential' (Compacter) or 'after_norm' (Compacter++), not {placement!r}")
    targets = find_targets(model, target_names, kind=nn.Module)
    weight = next(model.parameters())
    rules = nn.Parameter(torch.randn(n, n, n, device=weight.device) * 0.01)  # the shared slow weights
    for name in targets:
        sublayer = model.get_submodule(name)
        adapter = CompacterAdapter(output_width(sublayer), m, rules, rank, activation)
        adapter.to(device=weight.device, dtype=weight.dtype)
        if placement == "after_norm":
            if not is_add_norm_block(sublayer):
                raise ValueError(
                    f"{name}: Compacter++ goes into a post-norm Add & Norm block (dense, dropout, "
                    f"LayerNorm), not a {type(sublayer).__name__}"
                )
            replace_module(model, name, AddNormAdapter(sublayer, adapter, "after_norm"))
        else:
            replace_module(model, name, SequentialAdapter(sublayer, adapter))
    freeze_all_but(model, PHMLinear, ("rules", "s", "t", "b"))
    return targets


# The papers' configurations as arguments of inject_compacter (targets: see each).
COMPACTER = dict(placement="sequential", activation="gelu")  # the attention and FFN output projections
COMPACTER_PLUS_PLUS = dict(placement="after_norm", activation="gelu")  # the FFN's Add & Norm block only


def demo() -> None:
    """Compacter (n = 4, rank one) after two layers of the frozen MLP."""
    model = toy_model()
    x, y = toy_task()
    inject_compacter(model, ["2", "4"], m=16, n=4)
    before, after = train(model, x, y, lr=3e-2)
    report("Compacter n=4 r=1 m=16", model, before, after)


if __name__ == "__main__":
    demo()
