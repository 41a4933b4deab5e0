"""Shared bases, few trained numbers: PVeRA (a probabilistic VeRA) and VB-LoRA (a shared vector bank).

VeRA (`reference_impls.lora`) shares one pair of frozen random projections between all layers and
trains only two scaling vectors per layer. These two methods share more, or differently.

**PVeRA.** Fillioux, Ferrante, Cournède, et al. "PVeRA: Probabilistic Vector-Based Random Matrix
Adaptation." WACV 2026. arXiv:2512.07703.
VeRA whose down-projection gives a mean and a log-variance: with shared frozen A ∈ ℝ^{2r×d_in}
(rows 1…r for the mean, r+1…2r for the log-variance) and B ∈ ℝ^{d_out×r},

    [μ; log σ²] = Λ_d A x,        z = μ + ε ⊙ σ (ε ~ N(0, I), in training),   z = μ (in evaluation)
    h = W₀ x + b + Λ_b B z

Parameters: 2r + d_out per layer (Λ_d, Λ_b; B and A shared and frozen). Λ_b = 0 at the start.
Evaluation uses the mean (or samples too, with `sample_at_inference`); only the mean merges.

**VB-LoRA.** Li, Han, Ji. "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks."
NeurIPS 2024. arXiv:2405.15179. Every length-L piece of every layer's A and B is a mixture of k
vectors from one bank V ∈ ℝ^{N×L} shared by the whole model, chosen by learned logits:

    piece = Σ_{i ∈ top-k(ℓ)} softmax(ℓ_{top-k})ᵢ Vᵢ,        ΔW = B A

with logits ℓ ∈ ℝ^N per piece: A ∈ ℝ^{r×d_in} is r × d_in/L pieces, B ∈ ℝ^{d_out×r} is d_out/L × r
(each piece a column segment of B). Trained: the bank (N L numbers for the whole model) and the
logits; stored: the bank and, per piece, k indices and k − 1 weights (`save_only_topk_weights`).

**RandLoRA.** Albert, Zhang, Saratchandran, et al. "RandLoRA: Full rank parameter-efficient
fine-tuning of large models." ICLR 2025. arXiv:2502.00987. Enough frozen random rank-r bases to span
the full rank, n = ⌈d_min / r⌉ of them, each scaled by trained diagonals (d_min, d_max: the smaller
and larger of d_in, d_out):

    ΔW = s Σⱼ Bⱼ diag(λⱼ) A diag(γⱼ)        (j = 1…n),   s = α / r

with one shared A ∈ ℝ^{r×d_min} and Bⱼ ∈ ℝ^{d_max×r} random (Kaiming-uniform, scaled to unit
standard deviation; or ternary with `sparse`), λⱼ ∈ ℝ^r (start 0) and γⱼ ∈ ℝ^{d_min} trained; ΔW is
transposed where d_in > d_out, so that A always acts on the smaller side. Parameters: n (r + d_min)
per layer, about d_min + d_min²/r. PEFT pairs the bases' columns in another (flattened) order; both
are random, so the loader only renumbers the saved Bⱼ columns.

All three equal PEFT 0.21 (`pvera`, `vblora`, `randlora`); `reference_impls.interop` loads their
checkpoints (VB-LoRA also in its top-k form).
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
    report_merge,
    set_merged,
    toy_model,
    toy_task,
    train,
)
from reference_impls.lora import LoRALinear, kaiming_uniform

FAMILY = "Low-rank updates"

IMPLEMENTS = ("pvera", "vb-lora", "randlora")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


# ---- PVeRA ------------------------------------------------------------------------------------


class PVeRAShared(nn.Module):
    """The frozen shared A (2r × d_in: mean rows, then log-variance rows) and B (d_out × r)."""

    def __init__(self, r: int, d_in: int, d_out: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((2 * r, d_in), generator))
        self.register_buffer("B", kaiming_uniform((d_out, r), generator))


class PVeRALinear(nn.Module):
    """h = W₀ x + b + Λ_b B z, z = μ + ε σ from [μ; log σ²] = Λ_d A x (z = μ in evaluation)."""

    def __init__(
        self,
        base: nn.Linear,
        shared: PVeRAShared,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        sample_at_inference: bool = False,
    ):
        super().__init__()
        self.base, self.shared, self.sample_at_inference = base, shared, sample_at_inference
        r = shared.B.shape[1]
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lambda_d = nn.Parameter(torch.full((2 * r,), d_initial, **factory))
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared A and B (sized for the widest layer)."""
        return self.shared.A[:, : self.base.in_features], self.shared.B[: self.base.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        A, B = self.projections()
        x = self.dropout(x).to(self.lambda_d.dtype)
        mean, log_variance = (self.lambda_d * F.linear(x, A.to(x.dtype))).chunk(2, dim=-1)
        z = mean
        if self.training or self.sample_at_inference:  # the reparameterisation trick
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance)
        return h + (self.lambda_b * F.linear(z, B.to(z.dtype))).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The mean update, (Λ_b B)(Λ_d A) with the mean rows only: what merging folds in."""
        A, B = self.projections()
        r = B.shape[1]
        mean_rows = self.lambda_d[:r, None] * A[:r].to(self.lambda_d.dtype)
        return (self.lambda_b[:, None] * B.to(self.lambda_b.dtype)) @ mean_rows

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def inject_pvera(
    model: nn.Module, target_names: list[str], r: int = 256, d_initial: float = 0.1, seed: int = 0, **options
) -> list[str]:
    """PVeRA on the named layers: one shared frozen pair, sized for the widest layer."""
    targets = find_targets(model, target_names)
    layers = [model.get_submodule(name) for name in targets]
    shared = PVeRAShared(
        r, max(layer.in_features for layer in layers), max(layer.out_features for layer in layers), seed
    )
    for name, base in zip(targets, layers):
        replace_module(model, name, PVeRALinear(base, shared, d_initial, **options))
    freeze_all_but(model, PVeRALinear, ("lambda_d", "lambda_b"))
    return targets


# ---- VB-LoRA ----------------------------------------------------------------------------------


class VectorBank(nn.Module):
    """N trained vectors of length L, one bank for the whole model (each layer holds the same module)."""

    def __init__(self, n: int, length: int, bound: float = 0.02):
        super().__init__()
        self.vectors = nn.Parameter(torch.empty(n, length).uniform_(-bound, bound))


class VBLoRALinear(nn.Module):
    """A frozen nn.Linear plus B A x, every length-L piece of A and B a top-k mixture of the bank."""

    def __init__(self, base: nn.Linear, bank: VectorBank, r: int = 4, k: int = 2, logits_std: float = 0.1):
        super().__init__()
        n, length = bank.vectors.shape
        d_in, d_out = base.in_features, base.out_features
        if d_in % length or d_out % length:
            raise ValueError(f"VB-LoRA's vector length {length} must divide d_in = {d_in} and d_out = {d_out}")
        if not 0 < k <= n:
            raise ValueError(f"VB-LoRA mixes 1..{n} vectors per piece, got k = {k}")
        self.base, self.bank, self.r, self.k = base, bank, r, k
        # Logits for the r × d_in/L pieces of A and the d_out/L × r pieces of B.
        self.logits_A = nn.Parameter(torch.randn(r, d_in // length, n) * logits_std)
        self.logits_B = nn.Parameter(torch.randn(d_out // length, r, n) * logits_std)
        self.merged = False

    def mixture(self, logits: torch.Tensor) -> torch.Tensor:
        """Each piece: its top-k bank vectors weighted by the softmax of their logits (…, L)."""
        top, indices = logits.topk(self.k, dim=-1)
        return (top.softmax(-1).unsqueeze(-1) * self.bank.vectors[indices]).sum(-2)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.mixture(self.logits_A).flatten(1)  # (r, d_in)
        B = self.mixture(self.logits_B).transpose(1, 2).flatten(0, 1)  # pieces down each column: (d_out, r)
        return A, B

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


def inject_vblora(
    model: nn.Module, target_names: list[str], r: int = 4, n: int = 256, length: int = 256, k: int = 2
) -> list[str]:
    """VB-LoRA on the named layers, all drawing on one new bank of n vectors of the given length."""
    targets = find_targets(model, target_names)
    bank = VectorBank(n, length)
    for name in targets:
        replace_module(model, name, VBLoRALinear(model.get_submodule(name), bank, r, k))
    freeze_all_but(model, VBLoRALinear, ("logits_A", "logits_B", "bank"))
    return targets


# ---- RandLoRA ---------------------------------------------------------------------------------


class RandLoRABases(nn.Module):
    """The frozen shared bases: A (r × d_min) and n of B (d_max × r), stacked as (n × d_max × r)."""

    def __init__(self, r: int, d_min: int, d_max: int, seed: int = 0, sparse: bool = False):
        super().__init__()
        n = math.ceil(d_min / r)
        generator = torch.Generator().manual_seed(seed)
        if sparse:  # ternary entries, −1 and +1 each with probability 1/6 (the paper's sparse bases)
            draw = lambda shape: torch.rand(shape, generator=generator)  # noqa: E731
            ternary = lambda u: (u > 5 / 6).float() - (u < 1 / 6).float()  # noqa: E731
            A, B = ternary(draw((r, d_min))), ternary(draw((n, d_max, r)))
        else:
            A = kaiming_uniform((r, d_min), generator)
            B = torch.stack([kaiming_uniform((d_max, r), generator) for _ in range(n)])
        self.register_buffer("A", A / A.std())
        self.register_buffer("B", B / B.std())


class RandLoRALinear(nn.Module):
    """A frozen nn.Linear plus s Σⱼ Bⱼ diag(λⱼ) A diag(γⱼ) (transposed where d_in > d_out)."""

    def __init__(self, base: nn.Linear, bases: RandLoRABases, alpha: float = 640.0, dropout: float = 0.0):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        self.base, self.bases, self.transposed = base, bases, d_in > d_out
        self.d_min, self.d_max = min(d_in, d_out), max(d_in, d_out)
        r = bases.A.shape[0]
        self.n = math.ceil(self.d_min / r)
        if bases.A.shape[1] < self.d_min or bases.B.shape[0] < self.n or bases.B.shape[1] < self.d_max:
            raise ValueError(f"RandLoRA bases {tuple(bases.B.shape)} are too small for a {d_out} × {d_in} layer")
        self.scale = alpha / r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lambda_ = nn.Parameter(torch.zeros(self.n, r, **factory))
        self.gamma = nn.Parameter(torch.full((self.n, self.d_min), 1 / max(self.n, self.d_min), **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_max × n r) and (n r × d_min): the stacked Bⱼ and the scaled copies diag(λⱼ) A diag(γⱼ)."""
        A = self.bases.A[:, : self.d_min].to(self.lambda_.dtype)
        B = self.bases.B[: self.n, : self.d_max].to(self.lambda_.dtype)
        scaled_A = self.lambda_[:, :, None] * A[None] * self.gamma[:, None, :]  # (n, r, d_min)
        return B.permute(1, 0, 2).flatten(1), scaled_A.flatten(0, 1)

    def delta_weight(self) -> torch.Tensor:
        B, A = self.factors()
        delta = self.scale * (B @ A)  # d_max × d_min
        return delta.T if self.transposed else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        B, A = self.factors()
        x = self.dropout(x).to(A.dtype)
        # Thin products either way round: A (or Bᵀ) acts first, on the smaller width where it can.
        update = F.linear(F.linear(x, B.T), A.T) if self.transposed else F.linear(F.linear(x, A), B)
        return h + (self.scale * update).to(h.dtype)

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def inject_randlora(
    model: nn.Module, target_names: list[str], r: int = 32, alpha: float = 640.0, seed: int = 0, sparse: bool = False
) -> list[str]:
    """RandLoRA on the named layers: one set of bases for the model, sized for the widest layers."""
    targets = find_targets(model, target_names)
    layers = [model.get_submodule(name) for name in targets]
    d_min = max(min(layer.in_features, layer.out_features) for layer in layers)
    d_max = max(max(layer.in_features, layer.out_features) for layer in layers)
    bases = RandLoRABases(r, d_min, d_max, seed, sparse)
    for name, base in zip(targets, layers):
        replace_module(model, name, RandLoRALinear(base, bases, alpha))
    freeze_all_but(model, RandLoRALinear, ("lambda_", "gamma"))
    return targets


SHARED_BASIS_LAYERS = (PVeRALinear, VBLoRALinear, RandLoRALinear)


def merge_shared(model: nn.Module) -> None:
    set_merged(model, SHARED_BASIS_LAYERS, True)


def unmerge_shared(model: nn.Module) -> None:
    set_merged(model, SHARED_BASIS_LAYERS, False)


def demo() -> None:
    """PVeRA (sampled in training, its mean in evaluation), VB-LoRA and RandLoRA on the toy task."""
    x, y = toy_task()
    model = toy_model()
    inject_pvera(model, ["0", "2", "4"], r=256, d_initial=0.5)
    model.train()
    before, after = train(model, x, y, lr=3e-2)
    model.eval()
    with torch.no_grad():
        evaluated = nn.functional.mse_loss(model(x), y).item()
    report("pvera (r = 256) on 3 layers", model, before, after)
    print(f"  in evaluation (the mean): {evaluated:.4g}")
    report_merge(model, x, merge_shared)

    model = toy_model()
    inject_vblora(model, ["0", "2", "4"], r=4, n=64, length=16, k=2)
    before, after = train(model, x, y, lr=1e-2)
    report("vb-lora (r = 4, a bank of 64 × 16) on 3 layers", model, before, after)
    trainable, _ = count_parameters(model)
    print(f"  the bank is {64 * 16} of the {trainable:,} trained numbers; stored per piece: 2 indices, 1 weight")
    report_merge(model, x, merge_shared)

    model = toy_model()
    inject_randlora(model, ["0", "2", "4"], r=8, alpha=16.0)
    before, after = train(model, x, y, lr=1e-2)
    report("randlora (r = 8, 8 bases a layer) on 3 layers", model, before, after)
    with torch.no_grad():
        rank = torch.linalg.matrix_rank(model[0].delta_weight()).item()
    print(f"  rank of the first layer's update: {rank} of 64")
    report_merge(model, x, merge_shared)


if __name__ == "__main__":
    demo()
