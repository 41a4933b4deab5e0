"""LoRA's optimisers: LoRA+ (B learns faster than A).

**LoRA+.** Hayou, Ghosh, Yu. "LoRA+: Efficient Low Rank Adaptation of Large Models." ICML 2024.
arXiv:2402.12354. In LoRA's h = W₀x + s·BAx, A and B play different roles as the width n grows:
with one learning rate for both, either B learns too slowly or A too fast, and feature learning is
inefficient. LoRA+ gives B a learning rate λ times A's:

    η_B = λ · η_A,        λ ≫ 1 (the paper suggests λ = 2⁴)

Nothing else changes: the same parameters, the same optimiser (Adam in the paper), two parameter
groups. As PEFT's `create_loraplus_optimizer` does, every trained vector (a bias on B, DoRA's
magnitude m) goes with B, and biases get no weight decay.

Equal to PEFT 0.21 `peft.optimizers.create_loraplus_optimizer`: the same steps on the same
gradients (tested with AdamW, LoRA and DoRA).
"""

import torch
from torch import nn

from reference_impls._plumbing import report, toy_model, toy_task, train
from reference_impls.lora import inject_lora

FAMILY = "Low-rank updates"

IMPLEMENTS = ("lora-plus",)

# The frameworks that provide the method.
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


def demo() -> None:
    """LoRA with one learning rate and with LoRA+'s λ = 16 for B, the same steps, on the toy task."""
    x, y = toy_task()
    for name, ratio in [("lora, one learning rate", 1.0), ("lora+ (λ = 16)", 16.0)]:
        model = toy_model()
        inject_lora(model, ["0", "2", "4"], r=8, alpha=16)
        optimizer = lambda parameters, lr: create_loraplus_optimizer(model, torch.optim.Adam, lr=lr, ratio=ratio)  # noqa: E731
        before, after = train(model, x, y, steps=100, lr=1e-3, optimizer=optimizer)
        report(f"{name}, 100 steps", model, before, after)


if __name__ == "__main__":
    demo()
