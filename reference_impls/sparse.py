"""Sparse fine-tuning: train a small subset of the existing weights (BitFit, Diff pruning, LT-SFT).

BitFit: Ben Zaken, Ravfogel, Goldberg. "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models." ACL 2022. arXiv:2106.10199. Train only the bias terms
(θ = θ₀ except b); the paper's smaller variant trains only the query bias b_q and the bias of the
FFN's second layer b_m2. Trainable parameters: the number of bias entries.

Diff pruning: Guo, Rush, Kim. "Parameter-Efficient Transfer Learning with Diff Pruning." ACL 2021.
arXiv:2012.07463. A task is a sparse difference added to the frozen weights, θ = θ₀ + δ, with
δ = z ⊙ w and a mask z relaxed by the hard-concrete distribution (Louizos, Welling, Kingma 2018),
so that the number of non-zeros (the L0 norm) can be penalised with gradients:

    u ~ U(0,1),  s = σ((log u − log(1−u) + log α) / β),  z = min(1, max(0, s·(ζ − γ) + γ))
    E[‖δ‖₀] = Σ σ(log α − β·log(−γ/ζ))                      (β = 2/3, γ = −0.1, ζ = 1.1)

After training, δ is projected to a target sparsity by keeping its largest entries. Trainable
parameters while training: 2 per adapted weight entry (w and log α); stored: the non-zeros of δ.
(The paper also uses a group penalty over weight matrices; this module keeps the basic L0 form.)

LT-SFT: Ansell, Ponti, Korhonen, Vulić. "Composable Sparse Fine-Tuning for Cross-Lingual Transfer."
ACL 2022. arXiv:2110.07560. A lottery-ticket procedure: (1) fine-tune everything, θ₁; (2) keep the
K entries with the largest |θ₁ − θ₀|; (3) reset to θ₀ and fine-tune only those K entries, giving a
sparse difference φ. Differences compose by addition: θ = θ₀ + φ_language + φ_task.
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
    toy_model,
    toy_task,
    train,
)

FAMILY = "Sparse fine-tuning"

IMPLEMENTS = ("bitfit", "diff-pruning", "lt-sft")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("opendelta", "modular-deep-learning", "scaling-down-to-scale-up", "peft-survey-han-2024", "delta-tuning")


# ---- BitFit -----------------------------------------------------------------------------------


def bitfit(model: nn.Module, only: tuple[str, ...] = ()) -> list[str]:
    """Train only the biases (or only those whose module path contains one of `only`); returns their names."""
    trainable = []
    for name, parameter in model.named_parameters():
        is_bias = name.endswith("bias")
        chosen = is_bias and (not only or any(part in name.removesuffix(".bias") for part in only))
        parameter.requires_grad_(chosen)
        if chosen:
            trainable.append(name)
    if not trainable:
        raise ValueError("no bias matched: the model has none, or `only` names no module with one")
    return trainable


# ---- Diff pruning -----------------------------------------------------------------------------

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


class DiffLinear(nn.Module):
    """A frozen nn.Linear plus a hard-concrete-gated difference: W = W₀ + z ⊙ w."""

    def __init__(self, base: nn.Linear, init_keep: float = 0.5):
        super().__init__()
        self.base = base
        self.w = nn.Parameter(torch.zeros_like(base.weight))  # δ starts at zero: the base model exactly
        # log α such that a fresh mask is open with probability about init_keep.
        self.log_alpha = nn.Parameter(torch.full_like(base.weight, math.log(init_keep / (1 - init_keep))))

    def mask(self) -> torch.Tensor:
        if self.training:  # a stochastic, differentiable sample
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + self.log_alpha) / BETA)
        else:  # its deterministic value at test time
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def delta(self) -> torch.Tensor:
        return self.mask() * self.w

    def expected_l0(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.base.weight + self.delta(), self.base.bias)

    @torch.no_grad()
    def project(self, keep: int) -> None:
        """Keep the `keep` largest entries of δ as a fixed sparse difference (the paper's final step)."""
        self.eval()
        delta = self.delta()
        threshold = delta.abs().flatten().kthvalue(max(1, delta.numel() - keep)).values if keep < delta.numel() else -1
        self.w.copy_(torch.where(delta.abs() > threshold, delta, torch.zeros_like(delta)))
        self.log_alpha.fill_(1e4)  # mask fully open: δ = w from now on


def inject_diff_pruning(model: nn.Module, target_names: list[str], init_keep: float = 0.5) -> list[str]:
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, DiffLinear(model.get_submodule(name), init_keep))
    freeze_all_but(model, DiffLinear, ("w", "log_alpha"))
    return targets


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """E[‖δ‖₀] summed over the model's diff-pruned layers; add λ times it to the loss."""
    return torch.stack([module.expected_l0() for module in model.modules() if isinstance(module, DiffLinear)]).sum()


# ---- LT-SFT -----------------------------------------------------------------------------------


def lottery_ticket_masks(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """Masks of the k entries (over all tensors) that moved most in a full fine-tuning, |θ₁ − θ₀|."""
    moved = torch.cat([(after[name] - before[name]).abs().flatten() for name in before])
    threshold = torch.topk(moved, k).values[-1]
    masks, budget = {}, k
    for name in before:  # ties at the threshold are broken in file order, so exactly k are chosen
        change = (after[name] - before[name]).abs()
        mask = change > threshold
        ties = (change == threshold).flatten().nonzero().flatten()
        room = budget - int(mask.sum())
        if room > 0 and len(ties):
            mask.view(-1)[ties[:room]] = True
        budget -= int(mask.sum())
        masks[name] = mask
    return masks


def restrict_training(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Let gradients through only where the mask is set (hooks on the parameters); returns the hooks."""
    hooks = []
    for name, parameter in model.named_parameters():
        if name in masks:
            parameter.requires_grad_(True)
            hooks.append(parameter.register_hook(lambda grad, mask=masks[name]: grad * mask))
        else:
            parameter.requires_grad_(False)
    return hooks


def sparse_difference(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """φ = θ − θ₀, stored sparsely (only its non-zero entries)."""
    return {
        name: (parameter.detach() - before[name]).to_sparse()
        for name, parameter in model.named_parameters()
        if name in before and (parameter.detach() != before[name]).any()
    }


@torch.no_grad()
def compose(model: nn.Module, *differences: dict[str, torch.Tensor]) -> None:
    """θ ← θ + Σ φ: apply sparse differences (e.g. a language one and a task one) by addition."""
    parameters = dict(model.named_parameters())
    for difference in differences:
        for name, phi in difference.items():
            parameters[name].add_(phi.to_dense())


def demo() -> None:
    """BitFit, diff pruning and LT-SFT on the frozen MLP's new task."""
    x, y = toy_task()

    model = toy_model()
    bitfit(model)
    report("BitFit (all biases)", model, *train(model, x, y, lr=3e-2))

    model = toy_model()
    inject_diff_pruning(model, ["0", "2", "4"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        start = nn.functional.mse_loss(model.eval()(x), y).item()
    model.train()
    for _ in range(300):
        optimizer.zero_grad()
        (nn.functional.mse_loss(model(x), y) + 1e-4 * l0_penalty(model)).backward()
        optimizer.step()
    for module in model.modules():
        if isinstance(module, DiffLinear):
            module.project(keep=200)
    with torch.no_grad():
        end = nn.functional.mse_loss(model.eval()(x), y).item()
    print(
        f"Diff pruning: δ kept at 600 of {3 * 64 * 64:,} weights; loss on the new task: {start:.4g} before, "
        f"{end:.4g} after training"
    )

    model = toy_model()
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, x, y, steps=100, lr=1e-2)  # (1) full fine-tuning
    masks = lottery_ticket_masks(theta0, {name: p.detach() for name, p in model.named_parameters()}, k=600)
    with torch.no_grad():  # (2) back to θ₀
        for name, parameter in model.named_parameters():
            parameter.copy_(theta0[name])
    hooks = restrict_training(model, masks)  # (3) train only the ticket
    before, after = train(model, x, y, lr=1e-2)
    for hook in hooks:
        hook.remove()
    phi = sparse_difference(model, theta0)
    nonzero = sum(int(p.values().count_nonzero()) for p in phi.values())
    print(
        f"LT-SFT: {nonzero} of {count_parameters(model)[1]:,} parameters differ; "
        f"loss on the new task: {before:.4g} before, {after:.4g} after training"
    )


if __name__ == "__main__":
    demo()
