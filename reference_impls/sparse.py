"""Sparse fine-tuning: train a small subset of the existing weights (BitFit, Diff pruning, LT-SFT,
Super-Tuning).

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

Super-Tuning: Ilin, Zmushko, Richtárik. "Super-Tuning: From Activation-Aware Pruning to Sparse
Fine-Tuning." 2026. arXiv:2607.09287. The entries a pruning criterion would keep are the ones worth
training: score every entry, keep the k = ⌊(1 − sparsity) d_out d_in⌋ best, and train only those,

    W = W₀ + S,        S = 0 outside supp = top-k of  |W₀ᵢⱼ|  (magnitude)  or  |W₀ᵢⱼ| ‖Xⱼ‖₂  (Wanda)

where ‖Xⱼ‖₂ is the norm of input feature j over calibration data (the activation-aware score of
Wanda, Sun et al. 2023). "Supra" adds a LoRA on top: W = W₀ + S + (α/r) B A (B = 0 at the start).
Parameters: k per layer (plus r (d_in + d_out) for Supra). S = 0 at the start. The data-free
magnitude score came out slightly ahead of Wanda in the paper (79.02% against 78.66% average on
Llama-3-8B, as PEFT's documentation quotes it), and PEFT implements only that one; the reference
offers both (`calibration` picks Wanda), and either end of the score (PEFT's `select_top=False` keeps
the smallest entries, the paper's "-bottom" variants).

Super-Tuning equals PEFT 0.21 `supertuning` (its magnitude score, either end, Supra);
`reference_impls.interop` loads its checkpoints.
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
from reference_impls.lora import LoRALinear

FAMILY = "Sparse fine-tuning"

IMPLEMENTS = ("bitfit", "diff-pruning", "lt-sft", "super-tuning")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = (
    "hf-peft",
    "opendelta",
    "modular-deep-learning",
    "scaling-down-to-scale-up",
    "peft-survey-han-2024",
    "delta-tuning",
)


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


# ---- Super-Tuning -----------------------------------------------------------------------------


def pruning_support(
    weight: torch.Tensor, sparsity: float, top: bool = True, input_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat positions of the ⌊(1 − sparsity) · numel⌋ entries with the largest (top) or smallest scores:
    |W| (magnitude), or |W| times each input feature's norm (Wanda) when input_norms are given."""
    scores = weight.detach().abs()
    if input_norms is not None:
        scores = scores * input_norms.to(scores)[None, :]
    count = int(weight.numel() * (1 - sparsity))
    if not 0 <= sparsity < 1 or count < 1:
        raise ValueError(f"Super-Tuning sparsity {sparsity} leaves no trained entry of a {tuple(weight.shape)} weight")
    return torch.topk(scores.flatten(), count, largest=top).indices


class SuperTuningLinear(nn.Module):
    """h = (W₀ + S) x + b, S trained on the support a pruning score picks; with r > 0 (Supra) + (α/r) B A x."""

    def __init__(
        self,
        base: nn.Linear,
        sparsity: float = 0.99,
        top: bool = True,
        input_norms: torch.Tensor | None = None,
        r: int = 0,
        alpha: float | None = None,
        dropout: float = 0.0,
        positions: torch.Tensor | None = None,
    ):
        super().__init__()
        self.base, self.r = base, r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if positions is None and base.weight.is_meta:  # counting parameters only: no need to score
            positions = torch.empty(int(base.weight.numel() * (1 - sparsity)), dtype=torch.long, device="meta")
        elif positions is None:
            positions = pruning_support(base.weight, sparsity, top, input_norms)
        self.register_buffer("positions", positions.long().to(base.weight.device))
        self.s = nn.Parameter(torch.zeros(positions.shape[0], **factory))
        if r:  # Supra: LoRA beside the sparse support (α = 2r unless given, as PEFT)
            self.scale = (2 * r if alpha is None else alpha) / r
            self.A = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r, base.in_features, **factory), a=5**0.5))
            self.B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # LoRA's input, in training
        self.merged = False

    def sparse_delta(self) -> torch.Tensor:
        return self.s.new_zeros(self.base.weight.numel()).index_add(0, self.positions, self.s).view_as(self.base.weight)

    def delta_weight(self) -> torch.Tensor:
        delta = self.sparse_delta()
        return delta + self.scale * (self.B @ self.A).to(delta.dtype) if self.r else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        h = F.linear(x, self.base.weight + self.sparse_delta().to(self.base.weight.dtype), self.base.bias)
        if self.r:
            h = h + (self.scale * F.linear(F.linear(self.dropout(x).to(self.A.dtype), self.A), self.B)).to(h.dtype)
        return h

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


@torch.no_grad()
def input_norms(model: nn.Module, target_names: list[str], *inputs) -> dict[str, torch.Tensor]:
    """‖Xⱼ‖₂ of every input feature j of each named nn.Linear over one calibration pass model(*inputs)."""
    targets = find_targets(model, target_names)
    squares = {name: 0.0 for name in targets}
    record = lambda name: (
        lambda module, args: squares.__setitem__(  # noqa: E731
            name, squares[name] + args[0].detach().float().pow(2).flatten(0, -2).sum(0)
        )
    )
    hooks = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in targets]
    try:
        model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: total.sqrt() for name, total in squares.items()}


def inject_supertuning(
    model: nn.Module, target_names: list[str], sparsity: float = 0.99, top: bool = True, calibration=None, **supra
) -> list[str]:
    """Super-Tuning on the named layers: the magnitude score, or Wanda's when `calibration` (the inputs of one
    forward pass, a tensor or a tuple) is given; r, alpha, dropout in `supra` add the LoRA."""
    if calibration is not None:
        norms = input_norms(model, target_names, *(calibration if isinstance(calibration, tuple) else (calibration,)))
    targets = find_targets(model, target_names)
    for name in targets:
        norm = norms[name] if calibration is not None else None
        replace_module(model, name, SuperTuningLinear(model.get_submodule(name), sparsity, top, norm, **supra))
    freeze_all_but(model, SuperTuningLinear, ("s", "A", "B") if supra.get("r") else ("s",))
    return targets


def merge_supertuning(model: nn.Module) -> None:
    set_merged(model, SuperTuningLinear, True)


def unmerge_supertuning(model: nn.Module) -> None:
    set_merged(model, SuperTuningLinear, False)


def demo() -> None:
    """BitFit, diff pruning, LT-SFT and Super-Tuning (magnitude and Wanda scores, and Supra) on the
    frozen MLP's new task."""
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

    for name, options in [
        ("super-tuning, magnitude", {}),
        ("super-tuning, Wanda", {"calibration": x[:64]}),
        ("supra (r = 2)", {"r": 2}),
    ]:
        model = toy_model()
        inject_supertuning(model, ["0", "2", "4"], sparsity=0.95, **options)
        before, after = train(model, x, y, lr=1e-2)
        report(f"{name} on 3 layers (5% of each weight)", model, before, after)
        report_merge(model, x, merge_supertuning)


if __name__ == "__main__":
    demo()
