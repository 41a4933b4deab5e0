"""What a trained LoRA update did to the weight: intruder dimensions, and their mitigation.

Shuttleworth, Andreas, Torralba, Sharma. "LoRA vs Full Fine-tuning: An Illusion of Equivalence."
2024. arXiv:2410.21228. Full fine-tuning and LoRA can reach the same accuracy with different
weights: LoRA's fine-tuned W = W₀ + s·BA has singular vectors that none of W₀'s resembles. With
W₀ = U S Vᵀ and W = U′ S′ V′ᵀ, the i-th singular vector of W is an *intruder dimension* when

    max_j |⟨u′ᵢ, u_j⟩| < ε        among W's top k (i < k),

and the paper ties such dimensions to forgetting of the pre-training distribution. Its mitigation
scales them down after training, by λ < 1, and refits the rank-r factors:

    W̃ = W + (λ − 1) Σ_{i intruder} s′ᵢ u′ᵢ v′ᵢᵀ,        s·B̃Ã = the rank-r truncation of W̃ − W₀

trading some of the new task for less forgetting. Nothing is trained; a layer without intruders
keeps its factors. Equal to PEFT 0.21's `reduce_intruder_dimension` (its defaults k = 10, ε = 0.5,
λ = 0.75).
"""

import copy

import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import toy_model, toy_task, train
from reference_impls.lora import LoRALinear, inject_lora

FAMILY = "Low-rank updates"

# An analysis and a post-processing step, not a method to train: the paper uses LoRA.
IMPLEMENTS = ()
COVERED_BY = ("hf-peft", "lora-vs-full-finetuning")


def intruder_dimensions(W0: torch.Tensor, W: torch.Tensor, top_k: int = 10, epsilon: float = 0.5) -> list[int]:
    """Indices i < top_k of W's left singular vectors whose largest |cosine| with any of W0's is below ε."""
    U0 = torch.linalg.svd(W0.float(), full_matrices=False)[0]
    U = torch.linalg.svd(W.float(), full_matrices=False)[0]
    similarity = (U.T @ U0).abs().max(dim=1).values
    return torch.where(similarity[:top_k] < epsilon)[0].tolist()


@torch.no_grad()
def reduce_intruders(layer: LoRALinear, top_k: int = 10, epsilon: float = 0.5, lam: float = 0.75) -> int:
    """Scale the layer's intruder dimensions by λ and refit its rank-r factors; returns how many it had."""
    W0 = layer.base.weight.float()
    W = W0 + layer.delta_weight().float()
    intruders = intruder_dimensions(W0, W, top_k, epsilon)
    if not intruders:
        return 0
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W_reduced = W + (lam - 1) * (U[:, intruders] * S[intruders]) @ Vh[intruders]
    U, S, Vh = torch.linalg.svd((W_reduced - W0) / layer.scale, full_matrices=False)
    root = S[: layer.r].sqrt()
    layer.B.copy_((U[:, : layer.r] * root).to(layer.B.dtype))
    layer.A.copy_((root[:, None] * Vh[: layer.r]).to(layer.A.dtype))
    return len(intruders)


def reduce_intruder_dimensions(model: nn.Module, top_k: int = 10, epsilon: float = 0.5, lam: float = 0.75):
    """`reduce_intruders` on every LoRA layer of the model; returns {layer: intruders found}."""
    return {
        name: reduce_intruders(layer, top_k, epsilon, lam)
        for name, layer in model.named_modules()
        if isinstance(layer, LoRALinear)
    }


def demo() -> None:
    """Train LoRA on the toy task, find its intruder dimensions, and trade some of the task for less
    change on the old one (the frozen model's own outputs)."""
    x, y = toy_task()
    model = toy_model()
    frozen = copy.deepcopy(model)
    inject_lora(model, ["0", "2", "4"], r=8, alpha=16)
    train(model, x, y, lr=1e-2)
    with torch.no_grad():
        task, drift = F.mse_loss(model(x), y).item(), F.mse_loss(model(x), frozen(x)).item()
        found = reduce_intruder_dimensions(model, top_k=10, epsilon=0.5, lam=0.5)
        task_after, drift_after = F.mse_loss(model(x), y).item(), F.mse_loss(model(x), frozen(x)).item()
    print(f"intruder dimensions among the top 10 per layer: {found}")
    print(f"after scaling them by 0.5: new task loss {task:.4g} → {task_after:.4g}, ", end="")
    print(f"change from the pre-trained outputs {drift:.4g} → {drift_after:.4g}")


if __name__ == "__main__":
    demo()
