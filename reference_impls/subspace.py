"""Subspace updates: OSF, PSOFT and DEFT change a frozen weight only inside (or by projecting out) a subspace.

Each method picks a subspace of the frozen weight W₀ — from its SVD, or learned — and confines the
update to it; each starts as the base model and merges into the weight.

**OSF** (orthogonal subspace fine-tuning). Nayak, Killamsetty, Han, et al. "Sculpting Subspaces:
Constrained Full Fine-Tuning in LLMs for Continual Learning." 2025. arXiv:2504.07097. For continual
learning: the top k singular directions of W₀ = U S Vᵀ hold what earlier tasks need and stay
frozen; the rest, U_l S_l V_lᵀ, is trained in full, with gradients projected away from the frozen
directions so the update never turns into them:

    W = U_h S_h V_hᵀ + U_l S_l V_lᵀ,        ∇U_l ← (I − U_h U_hᵀ) ∇U_l,        ∇V_lᵀ ← ∇V_lᵀ (I − V_h V_hᵀ)

The layer computes W₀ x + (U_l S_l V_lᵀ − U_l⁰ S_l⁰ V_l⁰ᵀ) x, exact at the start. Parameters: the
low part, (n − k)(d_out + d_in + 1) for n = min(d_out, d_in); it is full fine-tuning in a subspace,
not a small adapter. The projections are gradient hooks on U_l and V_l, as in PEFT: plain SGD then
never leaves the subspace, while an optimiser that rescales each coordinate (Adam) drifts out of it
slowly, since its step is no longer a multiple of the projected gradient.

**PSOFT.** Wu, Hu, Min, Wang. "Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation."
ICLR 2026. arXiv:2505.11235. Orthogonal fine-tuning restricted to the top r singular directions:
with W₀'s SVD truncated to A = V_rᵀ ∈ ℝ^{r×d_in} and B = U_r S_r ∈ ℝ^{d_out×r} (both frozen), a
small r × r rotation R acts between them,

    h = W₀ x + b + B (R′ − I) A x,        R′ = diag(β) R diag(α),        R = (I + Q)(I − Q)⁻¹

so the principal part U_r S_r V_rᵀ becomes U_r S_r R′ V_rᵀ while the rest of W₀ stays. Q is
skew-symmetric (r(r−1)/2 numbers; the Cayley–Neumann series of `reference_impls.orthogonal` is an
option, with Q first scaled into ‖Q‖_F ≤ ε when `neumann_eps` is set); α, β ∈ ℝ^r are optional
scalings (start 1). With `orthogonal=False`, R is a free r × r matrix (start I). Parameters:
r(r−1)/2 + 2r. With the "pissa" split, A = √S_r V_rᵀ and B = U_r √S_r. PEFT's `psoft_alpha`
divides B by α/r and multiplies the update by it: it cancels, and is left out here. R is written in
the SVD's basis, so a checkpoint means something only with the same singular vectors (signs
included): the loader recomputes them with the same `torch.linalg.svd` of the same weight as PEFT.

**DEFT.** Kumar, Anwer, Khan, Khan, Laptev, Cholakkal. "DEFT: Decompositional Efficient
Fine-Tuning for Text-to-Image Models." NeurIPS 2025. arXiv:2509.22793. A trained P ∈ ℝ^{d_out×r}
spans a subspace of the output; DEFT projects that subspace out of W₀ and writes new content into it:

    W = (I − P_proj) W₀ + s P̃ R,        P_proj = P̃ Tᵀ

with the projector either P̃ = P, T = relu(P) (the default: cheap, not orthogonal) or P̃ = T = Q
from the QR decomposition of P (an orthogonal projection P Pᵀ as in the paper). R ∈ ℝ^{r×d_in}
starts at Tᵀ W₀ / s, which puts back exactly what the projection removed; s = α/r, or 1 without α.
Parameters: r (d_out + d_in). With `para=True` there is no R: W = (I − P_proj) W₀ only, the rank
reduction of PaRa (Chen et al., "PaRa: Personalizing Text-to-Image Diffusion via Parameter Rank
Reduction"), which does not start as the base model. The bias is not projected.

In training, PSOFT's `dropout` drops inputs of its update and DEFT's those of R's new content, as
in PEFT.

All three equal PEFT 0.21 (`osf`, `psoft`, `deft`), in training too; `reference_impls.interop` loads
their checkpoints.
"""

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
from reference_impls.orthogonal import cayley, skew_symmetric

FAMILY = "Subspace updates"

IMPLEMENTS = ("osf", "psoft", "deft")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ of a weight, computed in fp32 (as PEFT does, so that the singular vectors agree)."""
    return torch.linalg.svd(weight.detach().float(), full_matrices=False)


class SubspaceLinear(ReplacingMerge, nn.Module):
    """A frozen nn.Linear plus the method's `delta_weight()`; merging keeps W₀ to unmerge exactly."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"subspace methods adapt nn.Linear layers here, got {type(base).__name__}")
        self.base, self.d_in, self.d_out = base, base.in_features, base.out_features
        self.dtype = base.weight.dtype
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        return (self.base.weight + self.delta_weight()).to(self.base.weight.dtype)


# OSF -------------------------------------------------------------------------------------------


class OSFLinear(SubspaceLinear):
    """W = U_h S_h V_hᵀ (frozen, top k) + U_l S_l V_lᵀ (trained, gradients kept orthogonal to the top k)."""

    def __init__(self, base: nn.Linear, k: int | None = None):
        super().__init__(base)
        U, S, Vh = svd(base.weight)
        n = S.shape[0]
        k = n // 2 if k is None else k  # PEFT's default: half the singular directions stay frozen
        if not 0 < k < n:
            raise ValueError(f"OSF freezes 0 < k < {n} singular directions, got k = {k}")
        self.k = k
        as_dtype = lambda t: t.to(self.dtype, copy=True).contiguous()  # noqa: E731  (own storage each)
        self.register_buffer("U_high", as_dtype(U[:, :k]))
        self.register_buffer("V_high", as_dtype(Vh[:k]))
        for name, value in (("U_low", U[:, k:]), ("S_low", S[k:]), ("V_low", Vh[k:])):
            self.register_buffer(f"{name}_0", as_dtype(value))  # the start, subtracted in the forward pass
            setattr(self, name, nn.Parameter(as_dtype(value)))
        self.U_low.register_hook(lambda grad: grad - self.U_high @ (self.U_high.T @ grad))
        self.V_low.register_hook(lambda grad: grad - (grad @ self.V_high.T) @ self.V_high)

    def delta_weight(self) -> torch.Tensor:
        return (self.U_low * self.S_low) @ self.V_low - (self.U_low_0 * self.S_low_0) @ self.V_low_0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        # Two rank-(n − k) products, never the d_out × d_in update: (U_l S_l)(V_l x) − (U⁰ S⁰)(V⁰ x).
        x = x.to(self.U_low.dtype)
        now = F.linear(F.linear(x, self.V_low), self.U_low * self.S_low)
        start = F.linear(F.linear(x, self.V_low_0), self.U_low_0 * self.S_low_0)
        return h + (now - start).to(h.dtype)


# PSOFT -----------------------------------------------------------------------------------------


class PSOFTLinear(SubspaceLinear):
    """h = W₀ x + b + B (R′ − I) A x: a rotation R′ = diag(β) R diag(α) of W₀'s top-r singular subspace."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        orthogonal: bool = True,
        scale_in: bool = True,
        scale_out: bool = True,
        neumann_terms: int = 0,
        neumann_eps: float | None = None,
        split: str = "psoft",
        dropout: float = 0.0,
    ):
        super().__init__(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the update's input, in training
        if not 0 < r <= min(self.d_in, self.d_out):
            raise ValueError(f"PSOFT rank must be in 1..{min(self.d_in, self.d_out)}, got {r}")
        if split not in ("psoft", "pissa"):
            raise ValueError(f"PSOFT split must be 'psoft' or 'pissa', got {split!r}")
        self.r, self.orthogonal, self.neumann_terms, self.neumann_eps = r, orthogonal, neumann_terms, neumann_eps
        U, S, Vh = svd(base.weight)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
        if split == "psoft":
            A, B = Vh, U * S
        else:
            A, B = S.sqrt()[:, None] * Vh, U * S.sqrt()
        self.register_buffer("A", A.contiguous().to(self.dtype))
        self.register_buffer("B", B.contiguous().to(self.dtype))
        factory = {"device": base.weight.device, "dtype": self.dtype}
        if orthogonal:
            self.Q = nn.Parameter(torch.zeros(r * (r - 1) // 2, **factory))
        else:
            self.M = nn.Parameter(torch.eye(r, **factory))
        self.alpha = nn.Parameter(torch.ones(r, **factory)) if scale_in else None
        self.beta = nn.Parameter(torch.ones(r, **factory)) if scale_out else None

    def rotation(self) -> torch.Tensor:
        """R′ = diag(β) R diag(α) (r × r), computed in fp32 at least."""
        wide = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        if self.orthogonal:
            Q = skew_symmetric(self.Q[None].to(wide), self.r)[0]
            if self.neumann_terms and self.neumann_eps is not None:  # keep the series where it converges
                norm = Q.norm()
                Q = Q * (self.neumann_eps / (norm + 1e-12)) if torch.isfinite(norm) and norm > self.neumann_eps else Q
            R = cayley(Q[None], self.neumann_terms)[0]
        else:
            R = self.M.to(wide)
        if self.beta is not None:
            R = self.beta.to(wide)[:, None] * R
        if self.alpha is not None:
            R = R * self.alpha.to(wide)[None, :]
        return R

    def delta_weight(self) -> torch.Tensor:
        R = self.rotation()
        eye = torch.eye(self.r, device=R.device, dtype=R.dtype)
        return self.B.to(R.dtype) @ (R - eye) @ self.A.to(R.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        R = self.rotation()
        xa = F.linear(self.dropout(x).to(R.dtype), self.A.to(R.dtype))  # coordinates in the principal subspace
        return h + F.linear(F.linear(xa, R) - xa, self.B.to(R.dtype)).to(h.dtype)


# DEFT ------------------------------------------------------------------------------------------


class DEFTLinear(SubspaceLinear):
    """W = (I − P̃ Tᵀ) W₀ + s P̃ R: a learned output subspace projected out of W₀ and refilled by R."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        projector: str = "relu",
        alpha: float | None = None,
        para: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on R's input, in training
        if projector not in ("relu", "qr"):
            raise ValueError(f"DEFT projector must be 'relu' or 'qr', got {projector!r}")
        if r <= 0:
            raise ValueError(f"DEFT rank must be positive, got {r}")
        r = min(r, self.d_out)  # as PEFT: a subspace of the output cannot be wider than it
        self.r, self.projector, self.para = r, projector, para
        self.scale = alpha / r if alpha else 1.0
        factory = {"device": base.weight.device, "dtype": self.dtype}
        self.P = nn.Parameter(torch.randn(self.d_out, r, **factory) * 0.02)
        if not para:
            _, T = self.projection()
            # R₀ = Tᵀ W₀ / s: s P̃ R₀ puts back exactly what the projection P̃ Tᵀ W₀ removes.
            self.R = nn.Parameter((T.T @ base.weight.detach().float() / self.scale).to(self.dtype))

    def projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P̃, T), in fp32, with P_proj = P̃ Tᵀ."""
        P = self.P.float()
        if self.projector == "relu":
            return P, torch.relu(P)
        Q, _ = torch.linalg.qr(P)
        return Q, Q

    def delta_weight(self) -> torch.Tensor:
        P_tilde, T = self.projection()
        delta = -P_tilde @ (T.T @ self.base_weight())
        return delta if self.para else delta + self.scale * P_tilde @ self.R.float()

    def base_weight(self) -> torch.Tensor:
        return (self.base.weight if self.W0 is None else self.W0).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        # In fp32 as PEFT computes it: z − P̃ (Tᵀ z) cancels most of z's subspace component.
        z = F.linear(x.float(), self.base.weight.float())
        P_tilde, T = self.projection()
        h = z - (z @ T) @ P_tilde.T
        if not self.para:
            h = h + self.scale * F.linear(F.linear(self.dropout(x).float(), self.R.float()), P_tilde)
        if self.base.bias is not None:
            h = h + self.base.bias.float()
        return h.to(x.dtype)


# Injection, merge, demo ------------------------------------------------------------------------

LAYERS = {"osf": OSFLinear, "psoft": PSOFTLinear, "deft": DEFTLinear}


def inject_subspace(model: nn.Module, target_names: list[str], method: str = "psoft", **options) -> list[str]:
    """Wrap the named nn.Linear layers with the method's layer ("osf", "psoft" or "deft"; options go
    to its constructor) and freeze everything but the method's own parameters."""
    layer_type = LAYERS[method]
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, layer_type(model.get_submodule(name), **options))
    freeze_all_but(model, layer_type)
    return targets


def merge_subspace(model: nn.Module) -> None:
    set_merged(model, SubspaceLinear, True)


def unmerge_subspace(model: nn.Module) -> None:
    set_merged(model, SubspaceLinear, False)


def demo() -> None:
    """PSOFT and DEFT on the toy task; OSF on it (with SGD) while its frozen top directions stay untouched."""
    x, y = toy_task()
    for method, options in [("psoft", {"r": 32}), ("deft", {"r": 4}), ("osf", {"k": 16})]:
        model = toy_model()
        inject_subspace(model, ["0", "2", "4"], method, **options)
        if method == "osf":
            before, after = train(model, x, y, lr=0.5, optimizer=torch.optim.SGD)
        else:
            before, after = train(model, x, y, lr=3e-2)
        report(f"{method} on 3 layers", model, before, after)
        report_merge(model, x, merge_subspace)
        if method == "osf":
            layer = model[0]
            kept = (layer.U_high.T @ (layer.delta_weight() @ layer.V_high.T)).abs().max().item()
            print(f"  the update inside the frozen top-{layer.k} subspace: {kept:.1e}")


if __name__ == "__main__":
    demo()
