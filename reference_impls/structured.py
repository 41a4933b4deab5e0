"""Structured low-rank variants: MiSS (one matrix shared across shards), GraLoRA (a grid of small
LoRAs) and PEANuT (a small network computing ΔW from W₀).

Each keeps a budget near LoRA's r (d_in + d_out) numbers but arranges it differently, and each
adds ΔW to the frozen weight, so they merge.

**MiSS** (formerly Bone). Kang, Yin. "MiSS: Revisiting the Trade-off in LoRA with an Efficient
Shard-Sharing Structure." 2024. arXiv:2409.15371. One matrix D ∈ ℝ^{r×d_out} (start 0) is shared by
every shard of r input features: the input is folded into r-wide shards and summed, then D maps it out,

    h = W₀ x + b + Dᵀ Σ_c x_c,        ΔW[:, j] = D[j mod r]        (the last shard zero-padded)

Parameters: r · d_out. The "mini" variant shares further along the output, D ∈ ℝ^{r×m} repeated
d_out/m times (r · m parameters); the "bat" variant makes the update depend on the weight: for the
r × r blocks W_{ij} of W₀ and one trained r × r block Dᵢ per block row,

    ΔW_{ij} = W_{ij} Dᵢ + Dᵢ        (parameters: d_out · r; it needs r | d_in and r | d_out)

**GraLoRA.** Jung, Ahn, Kim, et al. "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient
Fine-Tuning." 2025. arXiv:2505.20355. The weight is cut into a k × k grid, each block with its own
rank-r/k LoRA, so that a gradient spike in one input block no longer reaches every output:

    ΔW_{mn} = s · B_{mn} A_{mn},        A_{mn} ∈ ℝ^{(r/k)×(d_in/k)},   B_{mn} ∈ ℝ^{(d_out/k)×(r/k)},   s = α / (r + r_h)

Parameters: r (d_in + d_out), as LoRA of rank r, for an update of rank up to k r. B = 0 at the
start. With `hybrid_r` = r_h > 0 a plain LoRA of rank r_h is added, with the same scale.

**PEANuT.** Zhong, Jiang, Li, et al. "PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural
Tweakers." 2024. arXiv:2410.01870. The update is a function of the frozen weight itself: each input
feature's column of W₀ passes through a small residual network of width r,

    Z₀ = φ(W₀ᵀ Aᵀ),   Zᵢ = φ(Eᵢ Zᵢ₋₁) (i = 1…L),   Y_L = Z_L,   Yᵢ₋₁ = φ(Dᵢ Yᵢ) + Zᵢ₋₁,   ΔW = s (Y₀ Bᵀ)ᵀ

with A ∈ ℝ^{r×d_out}, B ∈ ℝ^{d_out×r} (start 0), L encoder and decoder matrices Eᵢ, Dᵢ ∈ ℝ^{r×r}
(applied on the right: Zᵢ₋₁ Eᵢᵀ), the activation φ (ReLU by default) and a scale s. Parameters:
2 r d_out + 2 L r². ΔW is computed from the original W₀, also while merged.

All three equal PEFT 0.21 (`miss` with its three variants, `gralora`, `peanut`);
`reference_impls.interop` loads their checkpoints.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import (
    ReplacingMerge,
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

IMPLEMENTS = ("miss", "gralora", "peanut")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


# ---- MiSS -------------------------------------------------------------------------------------


class MiSSLinear(ReplacingMerge, nn.Module):
    """A frozen nn.Linear plus MiSS's shared-shard update ("balance", "mini" or "bat")."""

    def __init__(self, base: nn.Linear, r: int = 64, variant: str = "balance", mini_r: int = 1, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the input, in training (not "bat")
        d_in, d_out = base.in_features, base.out_features
        if not 0 < r <= d_in:
            raise ValueError(f"MiSS rank must be in 1..{d_in}, got {r}")
        if variant == "bat" and (d_in % r or d_out % r):
            raise ValueError(f"MiSS 'bat' needs r to divide d_in = {d_in} and d_out = {d_out}, got {r}")
        if variant == "mini" and d_out % mini_r:
            raise ValueError(f"MiSS 'mini' needs mini_r to divide d_out = {d_out}, got {mini_r}")
        if variant not in ("balance", "mini", "bat"):
            raise ValueError(f"MiSS variant must be 'balance', 'mini' or 'bat', got {variant!r}")
        self.base, self.r, self.variant = base, r, variant
        shape = {"balance": (r, d_out), "mini": (r, mini_r), "bat": (d_out // r, r, r)}[variant]
        self.D = nn.Parameter(torch.zeros(shape, device=base.weight.device, dtype=base.weight.dtype))

    def shared(self) -> torch.Tensor:
        """D as r × d_out (the "mini" D repeated along the output)."""
        return self.D.repeat(1, self.base.out_features // self.D.shape[1]) if self.variant == "mini" else self.D

    def delta_weight(self) -> torch.Tensor:
        d_out, d_in, r = self.base.out_features, self.base.in_features, self.r
        if self.variant == "bat":
            W0 = self.base.weight if self.W0 is None else self.W0  # the original weight, merged or not
            W = W0.to(self.D.dtype).reshape(d_out // r, r, d_in // r, r)  # blocks W[i, :, j, :]
            return (torch.einsum("iajb,ibc->iajc", W, self.D) + self.D[:, :, None, :]).reshape(d_out, d_in)
        D = self.shared()
        return D[torch.arange(d_in) % r].T  # column j is D[j mod r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.variant == "bat":  # weight-dependent: computed on the weight
            weight = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
            return F.linear(x, weight, self.base.bias)
        h = self.base(x)
        padded = F.pad(self.dropout(x), (0, -x.shape[-1] % self.r)).to(self.D.dtype)
        folded = padded.unflatten(-1, (-1, self.r)).sum(-2)  # Σ over shards: (…, r)
        return h + (folded @ self.shared()).to(h.dtype)

    def merged_weight(self) -> torch.Tensor:  # kept W₀ makes unmerge exact ("bat"'s update depends on it)
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)


# ---- GraLoRA ----------------------------------------------------------------------------------


class GraLoRALinear(nn.Module):
    """A frozen nn.Linear plus a k × k grid of rank-r/k LoRAs (and an optional plain LoRA of rank r_h)."""

    def __init__(
        self, base: nn.Linear, r: int = 32, alpha: float = 64.0, k: int = 2, hybrid_r: int = 0, dropout: float = 0.0
    ):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the input, in training
        d_in, d_out = base.in_features, base.out_features
        if d_in % k or d_out % k or r % k:
            raise ValueError(f"GraLoRA's k = {k} must divide d_in = {d_in}, d_out = {d_out} and r = {r}")
        self.base, self.k, self.scale = base, k, alpha / (r + hybrid_r)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.empty(k, k, r // k, d_in // k, **factory))  # A[m, n]: block (m, n)
        self.B = nn.Parameter(torch.zeros(k, k, d_out // k, r // k, **factory))
        bound = 1 / math.sqrt(d_in // k)  # Kaiming-uniform (a = √5) over an (r × d_in/k) matrix, as nn.Linear
        nn.init.uniform_(self.A, -bound, bound)
        # The hybrid part: a plain LoRA B_h A_h of rank r_h (B_h starts at 0), or none.
        self.A_h = nn.Parameter(torch.empty(hybrid_r, d_in, **factory)) if hybrid_r else None
        self.B_h = nn.Parameter(torch.zeros(d_out, hybrid_r, **factory)) if hybrid_r else None
        if hybrid_r:
            nn.init.kaiming_uniform_(self.A_h, a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        blocks = torch.einsum("mnos,mnsi->moni", self.B, self.A)  # (k, d_out/k, k, d_in/k)
        delta = blocks.reshape(self.base.out_features, self.base.in_features)
        if self.A_h is not None:
            delta = delta + self.B_h @ self.A_h
        return self.scale * delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        blocks = self.dropout(x).to(self.A.dtype).unflatten(-1, (self.k, -1))  # x_n: (…, k, d_in/k)
        z = torch.einsum("...ni,mnsi->...mns", blocks, self.A)  # A_{mn} x_n
        out = torch.einsum("...mns,mnos->...mo", z, self.B).flatten(-2)  # Σ_n B_{mn} A_{mn} x_n, block m
        if self.A_h is not None:
            # Its own dropout mask in training, as PEFT draws one for each part.
            out = out + F.linear(F.linear(self.dropout(x).to(self.A.dtype), self.A_h), self.B_h)
        return h + (self.scale * out).to(h.dtype)

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


# ---- PEANuT -----------------------------------------------------------------------------------

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class PEANuTLinear(ReplacingMerge, nn.Module):
    """A frozen nn.Linear plus ΔW = s · f(W₀): a residual network of width r over W₀'s columns."""

    def __init__(self, base: nn.Linear, r: int = 32, depth: int = 0, activation: str = "relu", scale: float = 1.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"PEANuT activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        d_out = base.out_features
        self.base, self.scale, self.activation = base, scale, ACTIVATIONS[activation]
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        linear = lambda d_in, d_out: nn.Linear(d_in, d_out, bias=False, **factory)  # noqa: E731  (Kaiming init)
        self.A, self.B = linear(d_out, r), linear(r, d_out)
        nn.init.zeros_(self.B.weight)
        self.encoders = nn.ModuleList([linear(r, r) for _ in range(depth)])
        self.decoders = nn.ModuleList([linear(r, r) for _ in range(depth)])
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        W0 = self.base.weight if self.W0 is None else self.W0  # the original weight, merged or not
        z = self.activation(self.A(W0.T.to(self.A.weight.dtype)))  # one row per input feature: (d_in, r)
        skips = []
        for encoder in self.encoders:
            skips.append(z)
            z = self.activation(encoder(z))
        for decoder, skip in zip(self.decoders, reversed(skips)):
            z = self.activation(decoder(z)) + skip
        return self.scale * self.B(z).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        delta = self.delta_weight()
        return h + F.linear(x.to(delta.dtype), delta).to(h.dtype)

    def merged_weight(self) -> torch.Tensor:
        return (self.base.weight + self.delta_weight()).to(self.base.weight.dtype)


# ---- Injection, merge, demo ---------------------------------------------------------------------

LAYERS = {"miss": MiSSLinear, "gralora": GraLoRALinear, "peanut": PEANuTLinear}


def inject_structured(model: nn.Module, target_names: list[str], method: str = "miss", **options) -> list[str]:
    """Wrap the named nn.Linear layers with the method's layer ("miss", "gralora" or "peanut"; options
    go to its constructor) and freeze everything else."""
    layer_type = LAYERS[method]
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, layer_type(model.get_submodule(name), **options))
    trained = ("A", "B", "encoders", "decoders") if layer_type is PEANuTLinear else None  # its own modules
    freeze_all_but(model, layer_type, trained)
    return targets


def merge_structured(model: nn.Module) -> None:
    set_merged(model, tuple(LAYERS.values()), True)


def unmerge_structured(model: nn.Module) -> None:
    set_merged(model, tuple(LAYERS.values()), False)


def demo() -> None:
    """MiSS (balance and bat), GraLoRA (k = 2, with a hybrid LoRA) and PEANuT on the toy task."""
    x, y = toy_task()
    for label, method, options in [
        ("miss (r = 8)", "miss", {"r": 8}),
        ("miss, bat (r = 8)", "miss", {"r": 8, "variant": "bat"}),
        ("gralora (r = 8, k = 2, hybrid rank 2)", "gralora", {"r": 8, "alpha": 16.0, "k": 2, "hybrid_r": 2}),
        ("peanut (r = 8, depth 1)", "peanut", {"r": 8, "depth": 1}),
    ]:
        model = toy_model()
        inject_structured(model, ["0", "2", "4"], method, **options)
        before, after = train(model, x, y, lr=1e-2)
        report(f"{label} on 3 layers", model, before, after)
        report_merge(model, x, merge_structured)


if __name__ == "__main__":
    demo()
