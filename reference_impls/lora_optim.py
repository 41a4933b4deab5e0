"""LoRA's optimisers: LoRA+ (B learns faster than A), Riemannian preconditioning (each factor's
gradient rescaled by the other's r × r Gram matrix) and LoRA-FA (A frozen, B's gradient projected).

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

**LoRA-FA.** Zhang, Zhang, Shi, et al. "LoRA-FA: Memory-efficient Low-rank Adaptation for Large
Language Models Fine-tuning." 2023. arXiv:2308.03303. A stays frozen at its random start and only B
trains, so the backward pass needs the r-wide activations A x, not the full inputs x. As PEFT's
optimiser has it, B's gradient is first mapped to the one that makes s·BA follow full fine-tuning's
gradient as closely as rank r allows,

    ∇_B ← (1/s²) ∇_B (AAᵀ + δI)⁺        (δ = 10⁻⁸)

then AdamW steps (Hugging Face's variant: ε = 10⁻⁶, the decay applied after the step). Trained
parameters: r · d_out per layer. PEFT computes that product under bfloat16 autocast wherever
bfloat16 is available (on every CPU), so its fp32 steps carry bfloat16 rounding there; the
reference computes in the parameters' dtype (tested both ways).

All three equal PEFT 0.21 (`peft.optimizers.create_loraplus_optimizer`, `create_riemannian_optimizer`,
`create_lorafa_optimizer`): the same steps on the same gradients (tested with AdamW and SGD, LoRA and
DoRA where PEFT allows it).
"""

import torch
from torch import nn

from reference_impls._plumbing import report, toy_model, toy_task, train
from reference_impls.lora import LoRALinear, inject_lora

FAMILY = "Low-rank updates"

IMPLEMENTS = ("lora-plus", "riemannian-lora", "lora-fa")

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


def adamw_direction(state: dict, grad: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
    """One step of Hugging Face's AdamW moments, kept in `state` at the gradient's shape: returns the
    direction m / (√v + ε) and the bias-corrected step size lr · √(1 − β₂ᵗ) / (1 − β₁ᵗ)."""
    beta1, beta2 = group["betas"]
    if "m" not in state:
        state["m"], state["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
    state["step"] = state.get("step", 0) + 1
    state["m"].mul_(beta1).add_(grad, alpha=1 - beta1)
    state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t = state["step"]
    return state["m"] / state["v"].sqrt().add_(group["eps"]), group["lr"] * (1 - beta2**t) ** 0.5 / (1 - beta1**t)


def decay_weight(parameter: torch.Tensor, group: dict) -> None:
    """Decoupled weight decay, applied after the step (Hugging Face's AdamW): w ← w − lr · λ · w."""
    if group["weight_decay"] > 0:
        parameter.add_(parameter, alpha=-group["lr"] * group["weight_decay"])


class LoRAFA(torch.optim.Optimizer):
    """Hugging Face's AdamW over the trained parameters, each frozen-A LoRA layer's B gradient projected first."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, betas=(0.9, 0.999), eps=1e-6):
        self.projected = {
            id(layer.B): layer for layer in model.modules() if isinstance(layer, LoRALinear) and layer.B.requires_grad
        }
        parameters = [p for p in model.parameters() if p.requires_grad]
        super().__init__(parameters, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                if id(parameter) in self.projected:  # ∇_B (AAᵀ + δI)⁺ / s²
                    layer = self.projected[id(parameter)]
                    A = layer.A.detach()
                    gram = A @ A.T + 1e-8 * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
                    grad = (grad @ torch.linalg.pinv(gram) / layer.scale**2).to(parameter.grad.dtype)
                direction, step_size = adamw_direction(self.state[parameter], grad, group)
                parameter.add_(direction, alpha=-step_size)
                decay_weight(parameter, group)
        return loss


def create_lorafa_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> LoRAFA:
    """Freeze A in every LoRA layer and return LoRA-FA's optimiser over what still trains."""
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            layer.A.requires_grad_(False)
    return LoRAFA(model, lr, weight_decay)


def demo() -> None:
    """LoRA with one learning rate and with LoRA+'s λ = 16 for B, the same steps, on the toy task; then
    Riemannian-preconditioned SGD and LoRA-FA."""
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
    model = toy_model()
    inject_lora(model, ["0", "2", "4"], r=8, alpha=16)
    optimizer = lambda parameters, lr: create_lorafa_optimizer(model, lr=lr)  # noqa: E731
    before, after = train(model, x, y, steps=100, lr=1e-2, optimizer=optimizer)
    report("lora-fa (A frozen), 100 steps", model, before, after)


if __name__ == "__main__":
    demo()
