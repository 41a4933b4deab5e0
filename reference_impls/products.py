"""Updates built from products of small factors: LoHa (Hadamard), LoKr (Kronecker) and HiRA (Hadamard with W₀).

A low-rank update B A has rank at most r. Combining small factors by an elementwise (Hadamard, ⊙)
or a Kronecker (⊗) product instead gives updates of much higher rank for the same number of
trained numbers. Each method below computes a ΔW of the frozen weight's shape; the layer adds
ΔW x (or the convolution with ΔW) to the frozen layer's output, so every update can be merged.

**LoHa.** Hyeon-Woo, Ye-Bin, Oh. "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning." ICLR 2022. arXiv:2108.06098. FedPara writes a weight as the Hadamard product
of two low-rank products; LoHa (from the LyCORIS library, as PEFT implements it) writes the update so:

    ΔW = s · (B₁ A₁) ⊙ (B₂ A₂),        s = α / r

with B₁, B₂ ∈ ℝ^{d_out×r} and A₁, A₂ ∈ ℝ^{r×d_in}: rank up to r², for 2r (d_in + d_out)
parameters. A₂ starts at zero (the others Kaiming-uniform), so ΔW = 0 at the start. For a
k×k convolution d_in is c_in·k² (the kernel flattened); with `effective_conv=True` each factor is
instead a Tucker product Tᵢ ×₁ Bᵢ ×₂ Aᵢᵀ of a core Tᵢ ∈ ℝ^{r×r×k×k} (the CP form of LyCORIS):
2 (r·c_out + r·c_in + r²k²) parameters.

**LoKr.** Yeh, Hsieh, Gao, Yang, Oh, Gong. "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation." 2023. arXiv:2309.14859. The update is a Kronecker product
of a small matrix C and a low-rank one:

    ΔW = s · C ⊗ (B A),        C ∈ ℝ^{a×c},   B ∈ ℝ^{b×r},   A ∈ ℝ^{r×e},   d_out = a·b,   d_in = c·e

The shapes come from factorising each width into two factors, the smaller one as close to its
square root as a divisor allows, or equal to `factor` when that divides it (PEFT's rule,
`kronecker_factors`). Where r ≥ max(b, e)/2 a low-rank B A would save nothing and the right factor
is one full matrix W₂ ∈ ℝ^{b×e}; with `decompose_both` C too is a low-rank product where
r < max(a, c)/2. C starts at zero. Parameters: a·c + r (b + e) in the common case.

**HiRA.** Huang, Ko, Zhuang, Tang, Zhang. "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation
for Large Language Models." ICLR 2025 (openreview TwJrTz9cRS). The low-rank product modulates the
frozen weight itself, so the update inherits W₀'s high rank:

    h = W₀ x + b + (W₀ ⊙ B A) x,        B ∈ ℝ^{d_out×r} (starts at 0),   A ∈ ℝ^{r×d_in}

Parameters: r (d_in + d_out), as for LoRA. There is no scale α. Merging changes W₀, the very
matrix the update is made from, so the layer keeps W₀ to unmerge exactly.

**In training** LoHa and LoKr can drop the whole update (`module_dropout`: one coin per forward
pass) or rows of ΔW (`rank_dropout`, the kept rows rescaled by their fraction where
`rank_dropout_scale`; PEFT's LoHa always rescales), as LyCORIS does; HiRA drops inputs of its
update (`dropout`). All three equal PEFT 0.21 (`loha`, `lokr`, `hira`) on the same weights, in
training too; `reference_impls.interop` loads their checkpoints.
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

FAMILY = "Hadamard and Kronecker products"

IMPLEMENTS = ("loha", "lokr", "hira")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def apply_weight(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x through the base layer's operation with another weight (and no bias): x Wᵀ, or the
    convolution with the base's stride, padding, dilation and groups."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
    return conv(x, weight, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)


def layer_widths(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(d_out, d_in, kernel size) of an nn.Linear, Conv1d or Conv2d (d_in per group; kernel () for Linear)."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features, ()
    if isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.padding_mode == "zeros":
        return base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size)
    raise TypeError(f"expected an nn.Linear, or an nn.Conv1d or nn.Conv2d with zero padding, got {base!r}")


class WeightUpdateLayer(nn.Module):
    """A frozen Linear or convolution plus the method's ΔW (computed by `delta_weight`); mergeable.
    The method's factors are the layer's own parameters (the base's are not)."""

    def __init__(self, base: nn.Module, rank_dropout: float = 0.0, rank_dropout_scale: bool = True, module_dropout=0.0):
        super().__init__()
        self.base = base
        self.d_out, self.d_in, self.kernel = layer_widths(base)
        self.factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.merged = False
        # LyCORIS's training-time dropouts: drop the whole update (module), or rows of ΔW (rank).
        self.rank_dropout, self.rank_dropout_scale, self.module_dropout = (
            rank_dropout,
            rank_dropout_scale,
            module_dropout,
        )

    def parameter(self, *shape: int, zero: bool = False) -> nn.Parameter:
        """A new factor: zeros, or Kaiming-uniform as nn.Linear initialises its weight."""
        tensor = torch.zeros(shape, **self.factory)
        if not zero:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        return nn.Parameter(tensor)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        # In training, one coin per pass decides whether the update is dropped (drawn even at p = 0,
        # as LyCORIS and PEFT draw it: the random stream, and so any rank dropout, stays the same).
        if self.training and torch.rand(1).item() <= self.module_dropout:
            return h
        delta = self.delta_weight()
        if self.training and self.rank_dropout:
            keep = (torch.rand(self.d_out) > self.rank_dropout).to(delta)
            keep = keep / keep.mean() if self.rank_dropout_scale else keep
            delta = delta * keep.reshape(-1, *[1] * (delta.dim() - 1))
        return h + apply_weight(self.base, delta, x.to(delta.dtype)).to(h.dtype)

    # W ← W₀ + ΔW and back: the same fold as LoRA's.
    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def tucker(core: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """T ×₁ B ×₂ Aᵀ: a (d_out × d_in × kernel) weight from a core (r × r × kernel), B (d_out × r), A (r × d_in)."""
    return torch.einsum("ij...,pi,jq->pq...", core, B, A)


class LoHaLayer(WeightUpdateLayer):
    """ΔW = s · (B₁A₁) ⊙ (B₂A₂), on a Linear or (flattened or in CP form) a convolution."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8.0, effective_conv: bool = False, **dropouts):
        super().__init__(base, **dropouts)
        if r <= 0:
            raise ValueError(f"LoHa rank r must be positive, got {r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        # PEFT too uses the flattened form for 1×1 kernels: a core would add nothing there.
        self.effective_conv = effective_conv and math.prod(self.kernel) > 1
        flat_in = self.d_in * math.prod(self.kernel)
        self.B1, self.B2 = self.parameter(self.d_out, r), self.parameter(self.d_out, r)
        if self.effective_conv:
            self.A1, self.A2 = self.parameter(r, self.d_in), self.parameter(r, self.d_in, zero=True)
            self.T1, self.T2 = self.parameter(r, r, *self.kernel), self.parameter(r, r, *self.kernel)
        else:
            self.A1, self.A2 = self.parameter(r, flat_in), self.parameter(r, flat_in, zero=True)

    def delta_weight(self) -> torch.Tensor:
        if self.effective_conv:
            product = tucker(self.T1, self.B1, self.A1) * tucker(self.T2, self.B2, self.A2)
        else:
            product = (self.B1 @ self.A1) * (self.B2 @ self.A2)
        return (self.scale * product).reshape(self.base.weight.shape)


def kronecker_factors(width: int, factor: int = -1) -> tuple[int, int]:
    """Split width into m · n (PEFT's rule): m = factor if it divides width; else m is the largest
    divisor of width that is at most √width (and at most factor when factor > 0), and m ≤ n."""
    if factor > 0 and width % factor == 0:
        return factor, width // factor
    limit = width if factor == -1 else factor
    m = max([k for k in range(1, math.isqrt(width) + 1) if width % k == 0 and k <= limit], default=1)
    return m, width // m


class LoKrLayer(WeightUpdateLayer):
    """ΔW = s · C ⊗ W₂, W₂ = B A (or a full matrix where low rank would not save), C = C_B C_A optionally."""

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        factor: int = -1,
        decompose_both: bool = False,
        effective_conv: bool = False,
        **dropouts,
    ):
        super().__init__(base, **dropouts)
        if r <= 0:
            raise ValueError(f"LoKr rank r must be positive, got {r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        (a, b), (c, e) = kronecker_factors(self.d_out, factor), kronecker_factors(self.d_in, factor)
        self.full_C = not (decompose_both and r < max(a, c) / 2)
        self.full_W2 = r >= max(b, e) / 2
        self.effective_conv = effective_conv and math.prod(self.kernel) > 1 and not self.full_W2
        kernel, flat = self.kernel, math.prod(self.kernel)
        if self.full_C:
            self.C = self.parameter(a, c, zero=True)
        else:
            self.C_B, self.C_A = self.parameter(a, r, zero=True), self.parameter(r, c)
        if self.full_W2:
            self.W2 = self.parameter(b, e, *kernel)
        elif self.effective_conv:
            self.B, self.A, self.T = self.parameter(b, r), self.parameter(r, e), self.parameter(r, r, *kernel)
        else:
            self.B, self.A = self.parameter(b, r), self.parameter(r, e * flat)

    def delta_weight(self) -> torch.Tensor:
        C = self.C if self.full_C else self.C_B @ self.C_A
        if self.full_W2:
            W2 = self.W2
        elif self.effective_conv:
            W2 = tucker(self.T, self.B, self.A)
        else:
            W2 = (self.B @ self.A).reshape(self.B.shape[0], -1, *self.kernel)
        C = C.reshape(*C.shape, *[1] * len(self.kernel))  # a k×k kernel: C ⊗ acts on the channel axes only
        return (self.scale * torch.kron(C, W2)).reshape(self.base.weight.shape)


class HiRALayer(ReplacingMerge, WeightUpdateLayer):
    """ΔW = W₀ ⊙ (B A): the low-rank product modulates the frozen weight."""

    def __init__(self, base: nn.Linear, r: int = 8, dropout: float = 0.0):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"HiRA adapts nn.Linear layers, got {type(base).__name__}")
        super().__init__(base)
        if r <= 0:
            raise ValueError(f"HiRA rank r must be positive, got {r}")
        self.r = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the update's input, in training
        self.A, self.B = self.parameter(r, self.d_in), self.parameter(self.d_out, r, zero=True)

    def frozen_weight(self) -> torch.Tensor:
        return self.base.weight if self.W0 is None else self.W0

    def delta_weight(self) -> torch.Tensor:
        return self.frozen_weight().to(self.B.dtype) * (self.B @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        delta = self.delta_weight()
        return h + F.linear(self.dropout(x).to(delta.dtype), delta).to(h.dtype)

    # Merging changes W₀, the matrix the update is made from: ReplacingMerge keeps it (self.W0).
    def merged_weight(self) -> torch.Tensor:
        return (self.base.weight + self.delta_weight()).to(self.base.weight.dtype)


PRODUCT_LAYERS = (LoHaLayer, LoKrLayer, HiRALayer)


def inject_products(model: nn.Module, target_names: list[str], method: str = "loha", **options) -> list[str]:
    """Wrap the named Linear (and, for LoHa and LoKr, Conv1d and Conv2d) layers with the method's
    layer ("loha", "lokr" or "hira"; options go to its constructor) and freeze everything else."""
    layer_type = {"loha": LoHaLayer, "lokr": LoKrLayer, "hira": HiRALayer}[method]
    kinds = nn.Linear if method == "hira" else (nn.Linear, nn.Conv1d, nn.Conv2d)
    targets = find_targets(model, target_names, kind=kinds)
    for name in targets:
        replace_module(model, name, layer_type(model.get_submodule(name), **options))
    freeze_all_but(model, PRODUCT_LAYERS)  # the method's factors, not the base's weights
    return targets


def merge_products(model: nn.Module) -> None:
    set_merged(model, PRODUCT_LAYERS, True)


def unmerge_products(model: nn.Module) -> None:
    set_merged(model, PRODUCT_LAYERS, False)


def demo() -> None:
    """LoHa and HiRA on the toy task; LoKr learning a Kronecker-structured change (the toy task's
    random low-rank shift is far from any C ⊗ W₂ of the same size); LoHa in CP form on a ConvNet."""
    x, y = toy_task()
    for method, options, lr in [("loha", {"r": 2, "alpha": 2}, 1e-2), ("hira", {"r": 4}, 3e-2)]:
        model = toy_model()
        inject_products(model, ["0", "2", "4"], method, **options)
        before, after = train(model, x, y, lr=lr)
        report(f"{method} on 3 layers", model, before, after)
        report_merge(model, x, merge_products)

    teacher = toy_model()
    inject_products(teacher, ["0", "2", "4"], "lokr", r=4, alpha=4)
    with torch.no_grad():
        for layer in teacher.modules():
            if isinstance(layer, LoKrLayer):
                layer.C.normal_(0, 0.2)
        y_kronecker = teacher(x)
    model = toy_model()
    inject_products(model, ["0", "2", "4"], "lokr", r=4, alpha=4)
    before, after = train(model, x, y_kronecker, lr=1e-2)
    report("lokr on 3 layers (a Kronecker-structured change)", model, before, after)
    report_merge(model, x, merge_products)

    torch.manual_seed(0)
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    images = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        target = convnet(images) + 0.3 * torch.tanh(convnet[0](images))  # a new task: a shift in the output
    inject_products(convnet, ["0", "2"], "loha", r=2, alpha=2, effective_conv=True)
    before, after = train(convnet, images, target, steps=200)
    report("loha (CP form) on 2 convolutions", convnet, before, after)
    report_merge(convnet, images, merge_products)


if __name__ == "__main__":
    demo()
