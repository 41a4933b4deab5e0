"""Training in less memory: VeLoRA (LoRA's backward pass from inputs compressed to one number per
sub-token) and GaLore (full-parameter training whose gradients, and so Adam's moments, live in a
rank-r subspace). Neither changes what the trained model computes; they change what training keeps.

**VeLoRA.** Miles, Reddy, Elezi, Deng. "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
Projections." NeurIPS 2024. arXiv:2405.17991. The gradient of A needs the layer's input x, which
autograd keeps from the forward pass: for a long sequence, more memory than the weights. VeLoRA
splits each token x ∈ ℝ^{d_in} into G sub-tokens of g = ⌈d_in / G⌉ features (zero-padded) and keeps
only their projections onto one unit vector v ∈ ℝ^g; the backward pass rebuilds the input from them:

    c_{t,k} = ⟨x_{t,k}, v⟩,        x̂_{t,k} = λ · c_{t,k} v,        ∇_A = (∂L/∂(A x))ᵀ x̂

so the saved activations shrink from d_in to G numbers per token. The forward pass and the gradient
sent on to earlier layers are LoRA's, exactly. v is the normalised mean of the first batch's
sub-tokens, then kept fixed (the paper's choice, `init="batch_average_once"`); PEFT 0.21's default,
"batch_average", recomputes it from every training batch, and "random" draws it once. No parameter
is added: LoRA's r (d_in + d_out) per layer. Equal to PEFT's `VeloraConfig`: the same gradients
of A and B, and of the input, on the same batches, in all three modes (tested; "random" with the
vector copied, PEFT drawing it from the global generator).

**GaLore.** Zhao, Zhang, Chen, et al. "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection." 2024. arXiv:2403.03507. Every weight W ∈ ℝ^{m×n} trains, but its gradient G is
projected onto the r leading singular vectors of a recent gradient before Adam sees it, and Adam's
step is projected back:

    P = U_{:, :r} (for m < n) or V_{:, :r} (for m ≥ n),  from the SVD of the gradient G_t every T steps
    R = Pᵀ G (or G P),        N = Adam(R),        W ← W − η · α · P N (or N Pᵀ)

so Adam's two moments take 2 r n (or 2 m r) numbers instead of 2 m n. Weight decay is decoupled
(W ← W − η λ W after the step); vectors (biases, norms) take plain AdamW. Nothing is added to the
model. Equal to the `galore-torch` package's `GaLoreAdamW` (the paper's code): the same weights
after the same steps, including a refresh of P (tested).
"""

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
from reference_impls.lora import LoRALinear, inject_lora
from reference_impls.lora_optim import adamw_direction, decay_weight

FAMILY = "Low-rank updates"

IMPLEMENTS = ("velora", "galore")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


# ---- VeLoRA -------------------------------------------------------------------------------------


def sub_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(tokens, G, g): every token cut into G pieces of g = ⌈d_in / G⌉ features, the last zero-padded."""
    width = -(-x.shape[-1] // groups)
    x = nn.functional.pad(x, (0, groups * width - x.shape[-1]))
    return x.reshape(-1, groups, width)


def unit(vector: torch.Tensor) -> torch.Tensor:
    """The vector scaled to length 1, in fp32 (all ones, normalised, if it is 0)."""
    vector = vector.float()
    norm = torch.linalg.vector_norm(vector)
    return vector / norm if norm > 0 else torch.full_like(vector, vector.numel() ** -0.5)


class CompressedInputLinear(torch.autograd.Function):
    """y = x Aᵀ, keeping for the backward pass only ⟨sub-token, v⟩ instead of x."""

    @staticmethod
    def forward(ctx, x, A, v, groups: int, rebuild_scale: float):
        ctx.save_for_backward(torch.einsum("tgd,d->tg", sub_tokens(x, groups), v.to(x.dtype)), A, v)
        ctx.input_shape, ctx.input_dtype, ctx.rebuild_scale = x.shape, x.dtype, rebuild_scale
        return x @ A.T

    @staticmethod
    def backward(ctx, grad_output):
        compressed, A, v = ctx.saved_tensors
        grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_output @ A.to(grad_output.dtype)).reshape(ctx.input_shape).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (compressed.to(grad_output.dtype)[..., None] * v.to(grad_output.dtype)).flatten(1)
            rebuilt = rebuilt[:, : ctx.input_shape[-1]] * ctx.rebuild_scale  # x̂ = λ c v, unpadded
            grad_A = (grad_output.T @ rebuilt).to(A.dtype)
        return grad_x, grad_A, None, None, None


class VeLoRALinear(LoRALinear):
    """LoRA whose A learns from sub-token projections of its inputs (the forward pass is LoRA's)."""

    INITS = ("batch_average_once", "batch_average", "random")

    def __init__(
        self, base: nn.Linear, r=8, alpha=16.0, dropout=0.0, use_rslora=False, groups=64, rebuild_scale=1.0, init=None
    ):
        super().__init__(base, r, alpha, dropout, use_rslora)
        init = init or "batch_average_once"
        if init not in self.INITS or groups <= 0 or rebuild_scale <= 0:
            raise ValueError(f"VeLoRA needs init in {self.INITS}, groups > 0 and a positive scale")
        self.groups, self.rebuild_scale, self.init = groups, rebuild_scale, init
        width = -(-base.in_features // groups)
        vector = unit(torch.randn(width)) if init == "random" else torch.zeros(width)
        self.register_buffer("v", vector.to(base.weight.dtype))
        self.v_ready = init == "random"

    def takes_kernel(self, x: torch.Tensor) -> bool:
        return False  # the compressed backward is its own function

    @torch.no_grad()
    def update_projection(self, x: torch.Tensor) -> None:
        if self.init == "random" or (self.init == "batch_average_once" and self.v_ready):
            return
        self.v.copy_(unit(sub_tokens(x.detach(), self.groups).reshape(-1, self.v.numel()).mean(0)).to(self.v.dtype))
        self.v_ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        x = self.dropout(x).to(self.A.dtype)
        if self.training and torch.is_grad_enabled():
            self.update_projection(x)
            after_A = CompressedInputLinear.apply(x, self.A, self.v, self.groups, self.rebuild_scale)
        else:
            after_A = x @ self.A.T
        return h + (self.scale * (after_A @ self.B.T)).to(h.dtype)


def inject_velora(
    model: nn.Module,
    target_names: list[str],
    r: int = 8,
    alpha: float = 16.0,
    groups: int = 64,
    rebuild_scale: float = 1.0,
    init: str = "batch_average_once",
) -> list[str]:
    """LoRA with VeLoRA's compressed backward on the named layers; A and B train."""
    targets = find_targets(model, target_names)
    for name in targets:
        layer = VeLoRALinear(model.get_submodule(name), r, alpha, groups=groups, rebuild_scale=rebuild_scale, init=init)
        replace_module(model, name, layer)
    freeze_all_but(model, VeLoRALinear, ("A", "B"))
    return targets


# ---- GaLore -------------------------------------------------------------------------------------


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose matrices step in a rank-r projection of their gradients, refreshed every
    `update_gap` steps; vectors, and groups without a "rank", step as plain AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=None, update_gap=200,
                 scale=1.0):  # fmt: skip
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        defaults |= {"rank": rank, "update_gap": update_gap, "scale": scale}
        super().__init__(params, defaults)

    @staticmethod
    def projection(G: torch.Tensor, rank: int) -> torch.Tensor:
        """P from G's r leading singular vectors: V_rᵀ (r × n) for a tall or square G, U_r (m × r) for a wide one."""
        U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
        return (Vh[:rank] if G.shape[0] >= G.shape[1] else U[:, :rank]).to(G.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad, state = parameter.grad, self.state[parameter]
                state.setdefault("step", 0)
                low_rank = group["rank"] is not None and grad.ndim == 2
                if low_rank:
                    tall = grad.shape[0] >= grad.shape[1]
                    if state["step"] % group["update_gap"] == 0:
                        state["P"] = self.projection(grad, group["rank"])
                    P = state["P"]
                    grad = grad @ P.T if tall else P.T @ grad  # R = G V_r (m × r) or U_rᵀ G (r × n)
                direction, step_size = adamw_direction(state, grad, group)  # moments at R's shape
                if low_rank:  # back to m × n, scaled by α
                    direction = group["scale"] * (direction @ P if tall else P @ direction)
                parameter.add_(direction, alpha=-step_size)
                decay_weight(parameter, group)
        return loss


def galore_groups(model: nn.Module, rank: int, update_gap: int = 200, scale: float = 0.25) -> list[dict]:
    """Parameter groups: every trained matrix with GaLore's rank, the rest without."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim == 2]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim != 2]
    return [{"params": matrices, "rank": rank, "update_gap": update_gap, "scale": scale}, {"params": others}]


def optimiser_state_numbers(optimizer: torch.optim.Optimizer) -> int:
    return sum(state[k].numel() for state in optimizer.state.values() for k in ("m", "v") if k in state)


def demo() -> None:
    """VeLoRA against LoRA on the toy task (the same steps), then GaLore against full AdamW, with the
    optimiser memory each takes."""
    x, y = toy_task()
    for name in ("lora", "velora (32 sub-tokens)"):
        model = toy_model()
        if name == "lora":
            inject_lora(model, ["0", "2", "4"], r=8, alpha=8)
        else:
            inject_velora(model, ["0", "2", "4"], r=8, alpha=8, groups=32)
        before, after = train(model, x, y, lr=1e-2)
        report(f"{name} (r = 8) on 3 layers", model, before, after)
    for name, groups in (("full AdamW", None), ("GaLore AdamW (r = 8)", 8)):
        model = toy_model()
        optimiser = GaLoreAdamW(galore_groups(model, groups) if groups else model.parameters(), lr=3e-3)
        before, after = train(model, x, y, optimizer=lambda parameters, lr, optimiser=optimiser: optimiser)
        trained, total = count_parameters(model)
        print(f"{name}: all {trained:,} parameters trained; Adam's moments hold {optimiser_state_numbers(optimiser):,}")
        print(f"loss on the new task: {before:.4g} before, {after:.4g} after training")


if __name__ == "__main__":
    demo()
