"""Routing among several small modules: skills per task (Polytropon, MHR), experts per token (MoV),
and a random expert per step that is averaged away at the end (AdaMix).

Ponti, Sordoni, Reddy. "Combining Modular Skills in Multitask Learning." 2022. arXiv:2202.13914
(Polytropon). An inventory of S LoRA "skills" (A_s, B_s) per layer, and for every task τ a learned
allocation: logits θ_τs turned into weights z_τs by a Gumbel-sigmoid (a relaxed Bernoulli sample,
temperature 1) while training and a sigmoid at test time, normalised over the skills:

    w_τs = z_τs / Σ_s' z_τs',    A_τ = Σ_s w_τs A_s,    B_τ = Σ_s w_τs B_s,    y = x W₀ᵀ + (1/r) x A_τ B_τ

with A_s ∈ ℝ^{K×r}, B_s ∈ ℝ^{r×N}. Caccia, Ponti, Liu, Pereira, Le Roux, Sordoni. "Multi-Head Adapter
Routing for Data-Efficient Fine-Tuning." 2022. arXiv:2211.03831 (MHR): A's rows and B's columns are
cut into H heads that each mix the skills with their own weights (H = 1 is Polytropon).
Trainable: layers · (S·r·(K + N) + T·H·S).

Zadouri, Üstün, Ahmadian, Ermiş, Locatelli, Hooker. "Pushing Mixture of Experts to the Limit:
Extremely Parameter Efficient MoE for Instruction Tuning." 2023. arXiv:2309.05444 (MoV). E (IA)³
vectors l_e per layer and a router that mixes them for every token x (soft merging, no top-k):

    s = softmax(W_g x),     h = (Σ_e s_e l_e) ⊙ W₀ x          trainable per layer: E·N + E·K

Wang et al. "AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning." EMNLP 2022.
arXiv:2205.12410. A bottleneck adapter with M copies of its down-projection (the up-projection
shared, as in the authors' runs); each training step routes through one copy drawn at random, a
consistency loss makes two such passes agree, and at the end the copies are averaged into one
adapter, so inference costs what a single adapter costs:

    training:  h + U f(D_k h),  k ~ Uniform{1..M};       inference:  h + U f(D̄ h),  D̄ = (1/M) Σ_k D_k
"""

import torch
from torch import nn
from torch.distributions import RelaxedBernoulli
from torch.nn import functional as F

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    output_width,
    replace_module,
    report,
    setting,
    toy_model,
    toy_task,
    train,
)

IMPLEMENTS = ("polytropon", "multi-head-routing", "mixture-of-vectors", "adamix")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("hf-peft", "modular-deep-learning")


# ---- Polytropon and Multi-Head Routing ---------------------------------------------------------


class PolyLoRALinear(nn.Module):
    """A frozen nn.Linear, S LoRA skills cut into H heads, and per-task skill logits (one set per layer)."""

    def __init__(self, base: nn.Linear, tasks: int, skills: int, r: int = 8, heads: int = 1):
        super().__init__()
        K, N = base.in_features, base.out_features
        if K % heads or N % heads:
            raise ValueError(f"{heads} heads must divide the layer's widths {K} and {N}")
        self.base, self.r = base, r
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.A = nn.Parameter(torch.empty(heads, skills, K // heads, r, **factory))
        self.B = nn.Parameter(torch.zeros(heads, skills, r, N // heads, **factory))  # B = 0: the base model at first
        for head in range(heads):
            for skill in range(skills):  # as nn.Linear(K/H, r) would initialise its weight
                nn.init.kaiming_uniform_(self.A.data[head, skill].T, a=5**0.5)
        self.logits = nn.Parameter(torch.empty(tasks, heads, skills, **factory).uniform_(-1e-3, 1e-3))
        self.task_ids: torch.Tensor | None = None  # set by use_tasks() for a batch

    def skill_weights(self, task_ids: torch.Tensor) -> torch.Tensor:
        """w (batch, H, S): a relaxed Bernoulli sample while training, the sigmoid otherwise, normalised."""
        logits = self.logits[task_ids]
        z = RelaxedBernoulli(temperature=1.0, logits=logits).rsample() if self.training else logits.sigmoid()
        return z / (z.sum(dim=-1, keepdim=True) + 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, ..., K); the batch's rows belong to the tasks use_tasks() named."""
        if self.task_ids is None:
            raise ValueError("which task is each row? Call the model inside `with use_tasks(model, task_ids):`")
        w = self.skill_weights(self.task_ids)
        batch = x.shape[0]
        A = torch.einsum("bhs,hskr->bhkr", w, self.A).reshape(batch, -1, self.r)  # heads stacked along K
        B = torch.einsum("bhs,hsrn->bhrn", w, self.B).transpose(1, 2).reshape(batch, self.r, -1)  # along N
        rows = x.reshape(batch, -1, x.shape[-1])
        update = (rows.to(A.dtype) @ A @ B / self.r).reshape(*x.shape[:-1], -1)
        return self.base(x) + update.to(x.dtype)


def inject_poly(
    model: nn.Module, target_names: list[str], tasks: int, skills: int, r: int = 8, heads: int = 1
) -> list[str]:
    """Polytropon (heads=1) or MHR (heads>1) on the named nn.Linear layers; everything else frozen."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, PolyLoRALinear(model.get_submodule(name), tasks, skills, r, heads))
    freeze_all_but(model, PolyLoRALinear, ("A", "B", "logits"))
    return targets


def use_tasks(model: nn.Module, task_ids: torch.Tensor):
    """`with use_tasks(model, task_ids):` every PolyLoRALinear reads the task of each row of the batch."""
    return setting(model, PolyLoRALinear, "task_ids", task_ids)


# ---- Mixture of (IA)³ vectors -------------------------------------------------------------------


class MoVLinear(nn.Module):
    """A frozen nn.Linear whose output is rescaled, token by token, by a router's mix of E vectors."""

    def __init__(self, base: nn.Linear, experts: int = 4):
        super().__init__()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base
        self.router = nn.Linear(base.in_features, experts, bias=False, **factory)
        self.vectors = nn.Parameter(torch.ones(experts, base.out_features, **factory))  # (IA)³ starts at 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.router(x).softmax(dim=-1)  # (..., E)
        return (s @ self.vectors) * self.base(x)


def inject_mov(model: nn.Module, target_names: list[str], experts: int = 4) -> list[str]:
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, MoVLinear(model.get_submodule(name), experts))
    freeze_all_but(model, MoVLinear, ("router", "vectors"))
    return targets


# ---- AdaMix ----------------------------------------------------------------------------------------


class AdaMixAdapter(nn.Module):
    """A sublayer F, then h + U f(D_k h) with D_k one of M down-projections (random while training,
    their average otherwise), U shared."""

    def __init__(self, sublayer: nn.Module, d: int, m: int, copies: int = 4):
        super().__init__()
        weight = next(sublayer.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.sublayer = sublayer
        self.downs = nn.ModuleList(nn.Linear(d, m, **factory) for _ in range(copies))
        self.up = nn.Linear(m, d, **factory)
        nn.init.zeros_(self.up.weight)  # the identity at the start
        nn.init.zeros_(self.up.bias)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        h = self.sublayer(*inputs)
        if self.training:
            down = self.downs[int(torch.randint(len(self.downs), ()))]
            return h + self.up(F.gelu(down(h)))
        weight = torch.stack([down.weight for down in self.downs]).mean(0)  # the merged adapter
        bias = torch.stack([down.bias for down in self.downs]).mean(0)
        return h + self.up(F.gelu(F.linear(h, weight, bias)))


def inject_adamix(model: nn.Module, target_names: list[str], m: int = 16, copies: int = 4) -> list[str]:
    targets = find_targets(model, target_names, kind=nn.Module)
    for name in targets:
        sublayer = model.get_submodule(name)
        replace_module(model, name, AdaMixAdapter(sublayer, output_width(sublayer), m, copies))
    freeze_all_but(model, AdaMixAdapter, ("downs", "up"))
    return targets


def consistency_loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The symmetric KL divergence between the class distributions of two stochastic passes (logits)."""
    p, q = first.log_softmax(-1), second.log_softmax(-1)
    return (
        F.kl_div(q, p, log_target=True, reduction="batchmean") + F.kl_div(p, q, log_target=True, reduction="batchmean")
    ) / 2


def demo() -> None:
    """Polytropon on two tasks that share structure; MoV and AdaMix on one."""
    x, y1 = toy_task(seed=1)
    _, y2 = toy_task(seed=2)
    model = toy_model()
    inject_poly(model, ["0", "2", "4"], tasks=2, skills=3, r=4)
    task_ids = torch.arange(2).repeat_interleave(len(x))
    inputs, targets = torch.cat([x, x]), torch.cat([y1, y2])  # every batch mixes the two tasks
    with use_tasks(model, task_ids):
        before, after = train(model, inputs, targets)
    report("Polytropon, 3 skills for 2 tasks, r=4", model, before, after)

    for name, inject in [
        ("MoV, 4 (IA)³ experts", lambda m: inject_mov(m, ["0", "2", "4"], experts=4)),
        ("AdaMix, 4 down-projections, m=8", lambda m: inject_adamix(m, ["2", "4"], m=8)),
    ]:
        model = toy_model()
        inject(model)
        before, after = train(model, x, y1)
        report(name, model, before, after)
    with torch.no_grad():  # AdaMix at inference: the copies averaged into one adapter
        print(f"  AdaMix merged into one adapter: loss {F.mse_loss(model.eval()(x), y1):.4g}")


if __name__ == "__main__":
    demo()
