"""LoRA and its family: low-rank updates of frozen linear layers (LoRA, rsLoRA, DoRA, VeRA, AdaLoRA).

LoRA: Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. "LoRA: Low-Rank Adaptation of Large
Language Models." ICLR 2022. arXiv:2106.09685. rsLoRA scaling: Kalajdzievski, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023, arXiv:2312.03732.

A pre-trained weight W₀ ∈ ℝ^{d_out×d_in} stays frozen; the update is a product of two small
trainable matrices, B ∈ ℝ^{d_out×r} and A ∈ ℝ^{r×d_in}, with rank r ≪ min(d_in, d_out):

    h = W₀ x + b + s · B A x,        s = α / r     (rsLoRA: s = α / √r)

A starts random and B starts at zero, so B A = 0 and the adapted model computes exactly what the
pre-trained one did. The scale s keeps the update's size stable when r changes (α is fixed while r
is tuned). After training, the update can be folded into the weight, so inference costs nothing:

    merge:    W ← W₀ + s · B A          unmerge:   W₀ ← W − s · B A

Trainable parameters per adapted d_in → d_out layer: r · (d_in + d_out). Two options as PEFT has
them: dropout on the update's input in training (s · B A dropout(x)), and a trainable bias on B
(PEFT's `lora_bias`: s · (B A x + β), β = 0 at the start, + d_out parameters, merged into b).

DoRA: Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen. "DoRA: Weight-Decomposed Low-Rank
Adaptation." ICML 2024. arXiv:2402.09353. The weight is split into a magnitude m (one number per
output feature) and a direction; LoRA updates the direction, m is trained directly:

    W' = m · (W₀ + s·BA) / ‖W₀ + s·BA‖        (norm per output feature, m initialised to ‖W₀‖)

and ‖W₀ + s·BA‖ is treated as a constant in the backward pass (the paper's section 4.3).
Trainable parameters: r · (d_in + d_out) + d_out.

VeRA: Kopiczko, Blankevoort, Asano. "VeRA: Vector-based Random Matrix Adaptation." ICLR 2024.
arXiv:2310.11454. One pair of random matrices A ∈ ℝ^{r×d_in}, B ∈ ℝ^{d_out×r}, frozen and shared by
every adapted layer (cut to each layer's size), and two trainable vectors per layer:

    h = W₀ x + b + Λ_b B Λ_d A x,     Λ_b = diag(b) starts at 0, Λ_d = diag(d) starts at d_initial

Trainable parameters per layer: r + d_out (the shared A, B are regenerated from a seed).

AdaLoRA: Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao. "Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning." ICLR 2023. arXiv:2303.10512. The update has the
form of an SVD, and the rank budget moves to where it matters during training:

    h = W₀ x + b + (α / r) · P Λ Q x,     P ∈ ℝ^{d_out×r}, Λ = diag(λ), Q ∈ ℝ^{r×d_in}

with λ = 0 at the start and the penalty ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F keeping P, Q near orthogonal.
The importance of triplet i is S_i = s(λ_i) + mean_k s(P_ki) + mean_k s(Q_ik), where s(w) is the
smoothed sensitivity |w·∂L/∂w| times its uncertainty; a cubic schedule lowers the total budget from
r per layer to target_r per layer by zeroing the λ_i of the least important triplets.
Trainable parameters per layer: r · (d_in + d_out + 1).
"""

import math

import torch
from torch import nn

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
from reference_impls.kernels.dora import fused_dora
from reference_impls.kernels.fused_lora import fused_lora, kernel_takes

FAMILY = "Low-rank updates"

# The papers.yaml entries this module implements (the site and `catalog check --strict-impl` read it).
IMPLEMENTS = ("lora", "rslora", "dora", "vera", "adalora")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = (
    "adapters-library",
    "opendelta",
    "hf-peft",
    "llm-adapters",
    "alpaca-lora",
    "modular-deep-learning",
    "scaling-down-to-scale-up",
    "peft-ref",
    "peft-survey-han-2024",
    "delta-tuning",
)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable low-rank update s·BA."""

    use_kernels = True  # False: always the plain PyTorch path (the kernel tests compare the two)

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = False,
    ):
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
        self.B_bias = nn.Parameter(torch.zeros(base.out_features, **factory)) if bias else None  # PEFT's lora_bias
        self.merged = False

    def takes_kernel(self, x: torch.Tensor) -> bool:
        """Whether this forward can run as the fused kernel and compute exactly the same: on CUDA, one
        dtype throughout, no dropout, and a frozen base (the fused backward returns no gradient for
        W₀ or its bias, so an unfrozen bias would silently stop learning)."""
        bias = self.base.bias
        return (
            self.use_kernels
            and not self.merged
            and self.B_bias is None
            and isinstance(self.dropout, nn.Identity)
            and not self.base.weight.requires_grad
            and (bias is None or not bias.requires_grad)
            and kernel_takes(x, self.base.weight, self.A, self.B, bias)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self) is LoRALinear and self.takes_kernel(x):
            # On a GPU: the same function, with the update added inside the GEMM (kernels/fused_lora.py).
            return fused_lora(x, self.base.weight, self.A, self.B, self.scale, self.base.bias)
        h = self.base(x)
        if self.merged:
            return h
        # (x Aᵀ) Bᵀ: two thin matrix products, never the full d_out × d_in matrix BA.
        update = (self.dropout(x).to(self.A.dtype) @ self.A.T) @ self.B.T
        if self.B_bias is not None:
            update = update + self.B_bias
        return h + (self.scale * update).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    # Many layers of other methods borrow these two (W ← W ± ΔW); only LoRA's own may carry a bias on B.
    @torch.no_grad()
    def merge(self) -> None:
        bias = getattr(self, "B_bias", None)
        if bias is not None and self.base.bias is None:
            raise ValueError("a LoRA bias merges into the layer's bias, and this layer has none")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            if bias is not None:
                self.base.bias += (self.scale * bias).to(self.base.bias.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            if getattr(self, "B_bias", None) is not None:
                self.base.bias -= (self.scale * self.B_bias).to(self.base.bias.dtype)
            self.merged = False


class DoRALinear(LoRALinear):
    """LoRA for the direction, a trained magnitude m per output feature."""

    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False
    ):
        super().__init__(base, r, alpha, dropout, use_rslora)  # no bias on B: PEFT refuses it with DoRA too
        self.m = nn.Parameter(self.column_norm().detach())  # so that W' = W₀ at the start

    def column_norm(self) -> torch.Tensor:
        """‖W₀ + s·BA‖ per output feature (the paper's column norm; rows of nn.Linear's weight)."""
        weight = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
        return torch.linalg.norm(weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.takes_kernel(x):
            # On a GPU: the norm without forming W₀ + s·BA, the rescale inside the GEMM (kernels/dora.py).
            return fused_dora(x, self.base.weight, self.A, self.B, self.m, self.scale, self.base.bias)
        factor = (self.m / self.column_norm().detach()).to(x.dtype)  # m / ‖W₀ + s·BA‖, norm as a constant
        if self.training and not isinstance(self.dropout, nn.Identity):
            # PEFT's form with dropout: the frozen path sees x, the rest of DoRA the dropped x̃,
            # h = W₀x + b + (factor − 1) W₀x̃ + factor · s·BAx̃ (without dropout, the same as below).
            dropped = self.dropout(x)
            update = (dropped.to(self.A.dtype) @ self.A.T) @ self.B.T
            rescaled = (factor - 1) * nn.functional.linear(dropped, self.base.weight)
            return self.base(x) + rescaled + factor * (self.scale * update).to(x.dtype)
        h_without_bias = nn.functional.linear(x, self.base.weight)
        update = (x.to(self.A.dtype) @ self.A.T) @ self.B.T
        h = factor * (h_without_bias + (self.scale * update).to(x.dtype))
        return h if self.base.bias is None else h + self.base.bias

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._norm_at_merge = self.column_norm()
            weight = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
            self.base.weight.copy_((self.m / self._norm_at_merge).unsqueeze(1) * weight)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base.weight * (self._norm_at_merge / self.m).unsqueeze(1)
            self.base.weight.copy_(weight - self.delta_weight().to(weight.dtype))
            self.merged = False


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−b, b) with b = √(6 / fan_in), fan_in = shape[1] (Kaiming, gain √2), drawn from `generator`:
    the frozen random bases of VeRA and its relatives, restored from their seed alone."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, d_in: int, d_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen A (r × d_in) and B (d_out × r), Kaiming-uniform from one seeded generator,
    so that storing the seed is enough to restore them."""
    generator = torch.Generator().manual_seed(seed)
    return kaiming_uniform((r, d_in), generator), kaiming_uniform((d_out, r), generator)


class VeRALinear(nn.Module):
    """A frozen nn.Linear plus Λ_b B Λ_d A x, with A and B shared between layers."""

    def __init__(
        self,
        base: nn.Linear,
        shared: "VeRAShared",
        d_initial: float = 0.1,
        dropout: float = 0.0,
        owns_shared: bool = False,
    ):
        super().__init__()
        self.base = base
        self.shared = [shared]  # a plain list: the matrices are registered (and saved) by one layer only
        if owns_shared:
            self.shared_projections = shared
        r = shared.A.shape[0]
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lambda_d = nn.Parameter(torch.full((r,), d_initial, **factory))
        self.lambda_b = nn.Parameter(torch.zeros(base.out_features, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.shared[0]
        return shared.A[:, : self.base.in_features], shared.B[: self.base.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        A, B = self.projections()
        x = self.dropout(x).to(self.lambda_d.dtype)
        return h + (self.lambda_b * ((self.lambda_d * (x @ A.T.to(x.dtype))) @ B.T.to(x.dtype))).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        A, B = self.projections()
        return self.lambda_b.unsqueeze(1) * (B.to(self.lambda_b.dtype) * self.lambda_d) @ A.to(self.lambda_b.dtype)

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


class VeRAShared(nn.Module):
    """The shared projections, registered once on the model (as buffers: they are never trained)."""

    def __init__(self, r: int, d_in: int, d_out: int, seed: int = 0):
        super().__init__()
        A, B = vera_projections(r, d_in, d_out, seed)
        self.register_buffer("A", A)
        self.register_buffer("B", B)


class SVDLinear(nn.Module):
    """AdaLoRA's layer: a frozen nn.Linear plus (α/r) · P diag(λ) Q, with λ maskable by rank."""

    def __init__(
        self, base: nn.Linear, r: int = 12, alpha: float = 32.0, dropout: float = 0.0, initial_r: int | None = None
    ):
        super().__init__()
        # AdaLoRA prunes a triplet by zeroing its λ, so the scale stays α / (the initial rank). A layer
        # whose pruned triplets were cut out (a saved checkpoint: r may even be 0) keeps that scale.
        initial_r = r if initial_r is None else initial_r
        if r < 0 or initial_r <= 0 or r > initial_r:
            raise ValueError(f"AdaLoRA ranks must satisfy 0 ≤ r ≤ initial_r, 0 < initial_r; got {r}, {initial_r}")
        self.base, self.r, self.scale = base, r, alpha / initial_r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.Q = nn.Parameter(torch.randn(r, base.in_features, **factory) * 0.02)  # right singular vectors
        self.P = nn.Parameter(torch.randn(base.out_features, r, **factory) * 0.02)  # left singular vectors
        self.lambda_ = nn.Parameter(torch.zeros(r, 1, **factory))  # singular values; 0 → identity at start
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        update = (self.dropout(x).to(self.Q.dtype) @ (self.Q * self.lambda_).T) @ self.P.T
        return h + (self.scale * update).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.P @ (self.Q * self.lambda_)

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def orthogonal_penalty(model: nn.Module) -> torch.Tensor:
    """Σ over AdaLoRA layers of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F; add it to the loss with a small weight."""
    terms = []
    for module in model.modules():
        if isinstance(module, SVDLinear):
            eye = torch.eye(module.r, device=module.P.device, dtype=module.P.dtype)
            terms.append(((module.P.T @ module.P - eye) ** 2).sum() + ((module.Q @ module.Q.T - eye) ** 2).sum())
    return torch.stack(terms).sum()


class RankAllocator:
    """AdaLoRA's budget: after each backward, score every triplet (P_:i, λ_i, Q_i:) and, on the
    schedule, zero the λ of the least important ones until `budget` triplets remain in all."""

    def __init__(
        self,
        model: nn.Module,
        target_r: int,
        total_steps: int,
        warmup_steps: int = 0,
        final_steps: int = 0,
        mask_every: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        self.layers = [module for module in model.modules() if isinstance(module, SVDLinear)]
        self.initial_budget = sum(layer.r for layer in self.layers)
        self.target_budget = target_r * len(self.layers)
        self.total, self.warmup, self.final, self.every = total_steps, warmup_steps, final_steps, mask_every
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: dict[int, torch.Tensor] = {}  # smoothed |w·∂L/∂w|, per parameter
        self.uncertainty: dict[int, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets to keep, whether to mask at this step): warm-up, cubic decrease, then fixed."""
        if step <= self.warmup:
            return self.initial_budget, False
        if step > self.total - self.final:
            return self.target_budget, True
        remaining = 1 - (step - self.warmup) / (self.total - self.final - self.warmup)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % self.every == 0

    @torch.no_grad()
    def score(self, parameter: torch.Tensor) -> torch.Tensor:
        """s(w) = smoothed sensitivity × uncertainty; updated from the current gradient."""
        key = id(parameter)
        importance = (parameter * parameter.grad).abs()
        previous = self.sensitivity.get(key, torch.zeros_like(importance))
        self.sensitivity[key] = self.beta1 * previous + (1 - self.beta1) * importance
        previous_uncertainty = self.uncertainty.get(key, torch.zeros_like(importance))
        self.uncertainty[key] = (
            self.beta2 * previous_uncertainty + (1 - self.beta2) * (importance - self.sensitivity[key]).abs()
        )
        return self.sensitivity[key] * self.uncertainty[key]

    @torch.no_grad()
    def step(self, step: int) -> int:
        """Call after loss.backward(); returns the budget in force."""
        scores = [
            (self.score(layer.lambda_).view(-1) + self.score(layer.P).mean(dim=0) + self.score(layer.Q).mean(dim=1))
            for layer in self.layers
        ]
        budget, mask_now = self.budget(step)
        if mask_now and budget < self.initial_budget:
            threshold = torch.kthvalue(torch.cat(scores), self.initial_budget - budget).values
            for layer, layer_scores in zip(self.layers, scores):
                layer.lambda_.masked_fill_((layer_scores <= threshold).unsqueeze(1), 0.0)
        return budget


def inject_lora(
    model: nn.Module,
    target_names: list[str],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    bias: bool = False,
) -> list[str]:
    """Wrap every nn.Linear named in target_names with LoRA (or DoRA) and freeze all else; `bias` adds
    a trainable bias to B (PEFT's lora_bias; not with DoRA, as in PEFT)."""
    if use_dora and bias:
        raise ValueError("a bias on B (lora_bias) does not combine with DoRA")
    targets = find_targets(model, target_names)
    for name in targets:
        base = model.get_submodule(name)
        layer = (
            DoRALinear(base, r, alpha, dropout, use_rslora)
            if use_dora
            else LoRALinear(base, r, alpha, dropout, use_rslora, bias)
        )
        replace_module(model, name, layer)
    trained = ("A", "B", "m") if use_dora else ("A", "B", "B_bias") if bias else ("A", "B")
    freeze_all_but(model, DoRALinear if use_dora else LoRALinear, trained)
    return targets


def inject_vera(
    model: nn.Module, target_names: list[str], r: int = 256, d_initial: float = 0.1, seed: int = 0, dropout: float = 0.0
) -> list[str]:
    """VeRA on the named layers: one shared pair of projections, sized for the largest layer."""
    targets = find_targets(model, target_names)
    layers = [model.get_submodule(name) for name in targets]
    shared = VeRAShared(r, max(l.in_features for l in layers), max(l.out_features for l in layers), seed)
    for index, (name, base) in enumerate(zip(targets, layers)):
        replace_module(model, name, VeRALinear(base, shared, d_initial, dropout, owns_shared=index == 0))
    freeze_all_but(model, VeRALinear, ("lambda_d", "lambda_b"))
    return targets


def inject_adalora(
    model: nn.Module, target_names: list[str], r: int = 12, alpha: float = 32.0, dropout: float = 0.0
) -> list[str]:
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, SVDLinear(model.get_submodule(name), r, alpha, dropout))
    freeze_all_but(model, SVDLinear, ("P", "lambda_", "Q"))
    return targets


ADAPTED = (LoRALinear, VeRALinear, SVDLinear)  # DoRALinear is a LoRALinear


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA-family update into its base weight (any of the four methods)."""
    set_merged(model, ADAPTED, True)


def unmerge_lora(model: nn.Module) -> None:
    set_merged(model, ADAPTED, False)


def demo() -> None:
    """Adapt the same frozen MLP to a new task with each method, then merge."""
    x, y = toy_task()
    layers = ["0", "2", "4"]
    # VeRA trains far fewer numbers per rank, so it uses the large ranks and learning rate of its paper.
    for name, inject, lr in [
        ("LoRA r=4", lambda m: inject_lora(m, layers, r=4, alpha=8), 1e-2),
        ("DoRA r=4", lambda m: inject_lora(m, layers, r=4, alpha=8, use_dora=True), 3e-2),
        ("VeRA r=256", lambda m: inject_vera(m, layers, r=256, d_initial=1.0), 1e-1),
        ("AdaLoRA r=4", lambda m: inject_adalora(m, layers, r=4, alpha=4), 3e-2),
    ]:
        model = toy_model()
        inject(model)
        before, after = train(model, x, y, lr=lr)
        report(name, model, before, after)
        report_merge(model, x, merge_lora)
    assert count_parameters(model)[0] == 3 * 4 * (64 + 64 + 1)  # AdaLoRA: r (d_in + d_out + 1) per layer


if __name__ == "__main__":
    demo()
