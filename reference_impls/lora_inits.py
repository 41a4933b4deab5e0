"""LoRA started from the frozen weight's decompositions: PiSSA (its principal singular triplets),
OLoRA (its QR decomposition), MiCA (its minor singular directions) and KaSA (its minor singular
components dropped, singular values learned). PiSSA and OLoRA start A and B from a piece of W and
leave the rest as the frozen base, so the model computes W x at the start, as with LoRA's zero B,
but training moves W's main part; MiCA trains in the directions W uses least; KaSA replaces them.

**PiSSA.** Meng, Wang, Zhang. "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models." NeurIPS 2024. arXiv:2404.02948. With W = U S Vᵀ and its top r triplets,

    B = U_r (S_r / s)^½,    A = (S_r / s)^½ V_rᵀ,    W₀ ← W − s·B A = W − U_r S_r V_rᵀ

(s the LoRA scale; dividing S by s makes s·BA the rank-r truncation whatever α is). The SVD may be
the exact one or a randomised one with a few power iterations (PEFT's "pissa_niter_k"), which is
much faster on large weights.

**OLoRA.** Büyükakyüz. "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models." 2024.
arXiv:2406.01775. With the QR decomposition W = Q R (Q with orthonormal columns),

    B = Q[:, :r],    A = R[:r, :],    W₀ ← W − s·B A

so B starts orthonormal. Both add nothing to LoRA's parameter count, r (d_in + d_out), and merge
as LoRA does (W₀ + s·BA = W at the start).

**MiCA.** Rüdiger, Raschka. "MiCA Learns More Knowledge Than LoRA and Full Fine-Tuning." 2026.
arXiv:2604.01694. B is fixed to the left singular vectors of W's r smallest singular values and
frozen; only A trains, from 0:

    B = U[:, −r:] (frozen),    A = 0,    ΔW = s·B A

so the update writes only into the output directions the pre-trained weight barely uses. The base
is untouched. Trained parameters: r · d_in per layer (B is fixed by W).

**KaSA.** Wang, Jiang, Park, et al. "KaSA: Knowledge-Aware Singular-Value Adaptation of Large
Language Models." ICLR 2025. arXiv:2412.06071. The base keeps only its top k − r singular components
(k = min(d_in, d_out): the r smallest, "noisy" ones are dropped once), and the update has an SVD's
form with learned singular values δ:

    W₀ ← U_{k−r} S_{k−r} V_{k−r}ᵀ,        ΔW = s·B diag(δ) A,        δ ∈ ℝ^r ~ N(0, 1),  B = 0

with the paper's regulariser β‖δ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) added to the task loss (`kasa_penalty`;
PEFT's `_get_kasa_loss`). So the model does not start at W x exactly: it starts at the truncated W₀.
Trainable parameters: r (d_in + d_out + 1) per layer.

A PiSSA, OLoRA or KaSA checkpoint holds the trained A and B but not the residual base: PEFT, loading it, runs
the initialisation again on the original weights, and `reference_impls.interop` does the same, so such
an adapter loads onto the base model it was trained from. PEFT 0.21's `init_lora_weights`
"pissa", "pissa_niter_k", "olora" and "mica" are these (the randomised SVD draws from the global generator,
so PEFT's own loading of a "pissa_niter_k" checkpoint is not reproducible; the loader refuses it).
"""

import torch
from torch import nn

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    report_merge,
    toy_model,
    toy_task,
    train,
)
from reference_impls.lora import LoRALinear, inject_lora, merge_lora

FAMILY = "Low-rank updates"

IMPLEMENTS = ("pissa", "olora", "mica", "kasa")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


@torch.no_grad()
def pissa_init(layer: LoRALinear, niter: int | None = None) -> None:
    """B, A from the top r singular triplets of the layer's weight (exact SVD, or randomised with `niter`
    power iterations), and the base weight left as the residual W − s·BA. Computed in fp32."""
    W, r = layer.base.weight.float(), layer.r
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        Vh = V.T
    root = (S / layer.scale).sqrt()
    set_factors(layer, A=root[:, None] * Vh, B=U * root)


@torch.no_grad()
def olora_init(layer: LoRALinear) -> None:
    """B = Q[:, :r], A = R[:r] from W = QR, and the base weight left as W − s·BA. Computed in fp32."""
    Q, R = torch.linalg.qr(layer.base.weight.float())
    set_factors(layer, A=R[: layer.r], B=Q[:, : layer.r])


@torch.no_grad()
def mica_init(layer: LoRALinear) -> None:
    """B = the left singular vectors of the r smallest singular values of W, frozen; A = 0 (trained)."""
    W, r = layer.base.weight.float(), layer.r
    if r > min(W.shape):
        raise ValueError(f"MiCA needs r ≤ min(d_in, d_out) = {min(W.shape)}, got {r}")
    U = torch.linalg.svd(W, full_matrices=False)[0]
    layer.B.copy_(U[:, -r:].to(layer.B.dtype))
    layer.A.zero_()
    layer.B.requires_grad_(False)


def set_factors(layer: LoRALinear, A: torch.Tensor, B: torch.Tensor) -> None:
    residual = layer.base.weight.float() - layer.scale * B @ A
    dtype = layer.base.weight.dtype
    layer.A.copy_(A.to(dtype)), layer.B.copy_(B.to(dtype)), layer.base.weight.copy_(residual.to(dtype))


INITIALISATIONS = {"pissa": pissa_init, "olora": olora_init}  # those that leave a residual base


class KaSALinear(LoRALinear):
    """LoRA with learned singular values, s·B diag(δ) A, over a base truncated to its top k − r components."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora=False):
        k = min(base.weight.shape)
        if r >= k:
            raise ValueError(f"KaSA keeps k − r = {k} − {r} of the weight's singular components: r must be below {k}")
        super().__init__(base, r, alpha, dropout, use_rslora)
        self.diag = nn.Parameter(torch.randn(r, device=base.weight.device, dtype=base.weight.dtype))  # δ
        if not base.weight.is_meta:
            with torch.no_grad():  # drop the r smallest singular components of W, once
                U, S, Vh = torch.linalg.svd(base.weight.float(), full_matrices=False)
                kept = k - r
                base.weight.copy_(((U[:, :kept] * S[:kept]) @ Vh[:kept]).to(base.weight.dtype))

    def takes_kernel(self, x: torch.Tensor) -> bool:
        return False  # the fused LoRA kernel has no diagonal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        update = ((self.dropout(x).to(self.A.dtype) @ self.A.T) * self.diag) @ self.B.T
        return h + (self.scale * update).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B * self.diag) @ self.A


def kasa_penalty(model: nn.Module, beta: float = 1e-4, gamma: float = 1e-3) -> torch.Tensor:
    """Σ over KaSA layers of β‖δ‖² + γ(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F), in fp32 (PEFT's defaults for β, γ)."""
    total = torch.zeros(())
    for layer in model.modules():
        if isinstance(layer, KaSALinear):
            eye = torch.eye(layer.r)
            A, B = layer.A.float(), layer.B.float()
            orthogonality = torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye)
            total = total + beta * layer.diag.float().pow(2).sum() + gamma * orthogonality
    return total


def inject_kasa(model: nn.Module, target_names: list[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
    """KaSA on the named layers: each base weight truncated, B, A and δ trained."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, KaSALinear(model.get_submodule(name), r, alpha, dropout))
    freeze_all_but(model, KaSALinear, ("A", "B", "diag"))
    return targets


def inject_initialised_lora(
    model: nn.Module, target_names: list[str], init: str = "pissa", niter: int | None = None, **lora_options
) -> list[str]:
    """LoRA on the named layers (options as `lora.inject_lora`), its factors from the weight: "pissa"
    (with `niter`, the randomised SVD) or "olora", each base weight becoming the residual; or "mica",
    B frozen."""
    if init not in (*INITIALISATIONS, "mica"):
        raise ValueError(f"initialisation must be one of {sorted(INITIALISATIONS) + ['mica']}, got {init!r}")
    targets = inject_lora(model, target_names, **lora_options)
    for name in targets:
        layer = model.get_submodule(name)
        if init == "mica":
            layer.B.requires_grad_(False)  # B is W's (on the meta device too: it counts as frozen)
        if layer.base.weight.is_meta:  # counting parameters only: nothing to factor
            continue
        pissa_init(layer, niter) if init == "pissa" else olora_init(layer) if init == "olora" else mica_init(layer)
    return targets


def demo() -> None:
    """LoRA, PiSSA, OLoRA, MiCA and KaSA (rank 8, the same steps) on the toy task: different starts and paths."""
    x, y = toy_task()
    for name, init in [("lora", None), ("pissa", "pissa"), ("olora", "olora"), ("mica", "mica")]:
        model = toy_model()
        if init is None:
            inject_lora(model, ["0", "2", "4"], r=8, alpha=8)
        else:
            inject_initialised_lora(model, ["0", "2", "4"], init, r=8, alpha=8)
        before, after = train(model, x, y, lr=1e-2)
        report(f"{name} (r = 8) on 3 layers", model, before, after)
        report_merge(model, x, merge_lora)
    model = toy_model()
    inject_kasa(model, ["0", "2", "4"], r=8, alpha=8)
    before, after = train(model, x, y, lr=1e-2, penalty=kasa_penalty)
    report("kasa (r = 8, with its regulariser) on 3 layers", model, before, after)
    report_merge(model, x, merge_lora)


if __name__ == "__main__":
    demo()
