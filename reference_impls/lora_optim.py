"""LoRA's optimisers: LoRA+ (B learns faster than A) and Riemannian preconditioning (each factor's
gradient rescaled by the other's r × r Gram matrix).

**LoRA+.** Hayou, Ghosh, Yu. "LoRA+: Efficient Low Rank Adaptation of Large Models." ICML 2024.
arXiv:2402.12354. In LoRA's h = W₀x + s·BAx, A and B play different roles as the width n grows:
with one learning rate for both, either B learns too slowly or A too fast, and feature learning is
inefficient. LoRA+ gives B a learning rate λ times A's:

    η_B = λ · η_A,        λ ≫ 1 (the paper suggests λ = 2⁴)

Nothing else changes: the same parameters, the same optimiser (Adam in the paper), two parameter
groups. As PEFT's `create_loraplus_optimizer` does, every trained vector (a bias on B, DoRA's
magnitude m) goes with B, and biases get no weight decay.

**Riemannian preconditioning.** Zhang, Pilanci. "Riemannian Preconditioned LoRA for Fine-Tuning
Foundation Models." 2024. arXiv:2402.02347. The product BA lives on the manifold of rank-r matrices;
a metric on it gives each factor's gradient an r × r preconditioner built from the other factor:

    ∇_A ← (BᵀB + δI)⁻¹ ∇_A,        ∇_B ← ∇_B (AAᵀ + δI)⁻¹

(δ a small damping, for factors near rank deficiency: B starts at 0), after which any optimiser
takes its step (SGD gives the paper's scaled gradient descent, AdamW its scaled AdamW). The cost is
two r × r inverses per layer.

Both equal PEFT 0.21 (`peft.optimizers.create_loraplus_optimizer`, `create_riemannian_optimizer`):
the same steps on the same gradients (tested with AdamW and SGD, LoRA and DoRA).
"""

import torch
from torch import nn

from reference_impls._plumbing import report, toy_model, toy_task, train
from reference_impls.lora import LoRALinear, inject_lora

FAMILY = "Low-rank updates"

IMPLEMENTS = ("lora-plus", "riemannian-lora")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def loraplus_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for any torch optimiser: B and every trained vector at ratio · lr, the rest at lr;
    no weight decay for biases and LayerNorm parameters."""
    in_norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups = {"A": [], "B": [], "B, no decay": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.endswith(".B") or parameter.ndim == 1:
            no_decay = "bias" in name or id(parameter) in in_norm
            groups["B, no decay" if no_decay else "B"].append(parameter)
        else:
            groups["A"].append(parameter)
    return [
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": groups["B, no decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls=torch.optim.AdamW, lr: float = 1e-3, ratio: float = 16.0, **options
) -> torch.optim.Optimizer:
    """`optimizer_cls` over the model's trained parameters with LoRA+'s two learning rates."""
    weight_decay = options.pop("weight_decay", 0.0)
    return optimizer_cls(loraplus_groups(model, lr, ratio, weight_decay), lr=lr, **options)


@torch.no_grad()
def precondition(pairs: list[tuple[nn.Parameter, nn.Parameter]], damping: float) -> None:
    """Replace each (A, B)'s gradients by their Riemannian directions, in fp32 at least."""
    for A, B in pairs:
        dtype = torch.promote_types(A.dtype, torch.float32)
        a, b = A.detach().to(dtype), B.detach().to(dtype)
        eye = torch.eye(A.shape[0], dtype=dtype, device=A.device)
        if A.grad is not None:
            A.grad.copy_(torch.linalg.pinv(b.T @ b + damping * eye) @ A.grad.to(dtype))
        if B.grad is not None:
            B.grad.copy_(B.grad.to(dtype) @ torch.linalg.pinv(a @ a.T + damping * eye))


def create_riemannian_optimizer(
    model: nn.Module, optimizer_cls=torch.optim.AdamW, lr: float = 1e-3, damping: float = 1e-2, **options
) -> torch.optim.Optimizer:
    """`optimizer_cls` over the trained parameters, each step preceded by preconditioning every trained
    LoRA pair; other parameters (DoRA's m, a bias on B) step unchanged."""
    pairs = [
        (layer.A, layer.B)
        for layer in model.modules()
        if isinstance(layer, LoRALinear) and layer.A.requires_grad and layer.B.requires_grad
    ]
    if not pairs:
        raise ValueError("Riemannian preconditioning needs trained LoRA layers (A and B), and the model has none")

    class Preconditioned(optimizer_cls):
        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:  # a closure would recompute the gradients after they were preconditioned
                raise ValueError("the Riemannian-preconditioned optimiser takes no closure")
            precondition(pairs, damping)
            return super().step()

    return Preconditioned([p for p in model.parameters() if p.requires_grad], lr=lr, **options)


def demo() -> None:
    """LoRA with one learning rate and with LoRA+'s λ = 16 for B, the same steps, on the toy task; then
    Riemannian-preconditioned SGD."""
    x, y = toy_task()
    for name, ratio in [("lora, one learning rate", 1.0), ("lora+ (λ = 16)", 16.0)]:
        model = toy_model()
        inject_lora(model, ["0", "2", "4"], r=8, alpha=16)
        optimizer = lambda parameters, lr: create_loraplus_optimizer(model, torch.optim.Adam, lr=lr, ratio=ratio)  # noqa: E731
        before, after = train(model, x, y, steps=100, lr=1e-3, optimizer=optimizer)
        report(f"{name}, 100 steps", model, before, after)
    model = toy_model()
    inject_lora(model, ["0", "2", "4"], r=8, alpha=16)
    optimizer = lambda parameters, lr: create_riemannian_optimizer(model, torch.optim.SGD, lr=lr)  # noqa: E731
    before, after = train(model, x, y, steps=100, lr=0.05, optimizer=optimizer)
    report("lora, Riemannian-preconditioned SGD, 100 steps", model, before, after)


if __name__ == "__main__":
    demo()
