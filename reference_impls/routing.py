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

Yang, Muhtar, Shen, et al. "MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning." AAAI 2025.
arXiv:2410.09437 (MTL-LoRA). One low-rank space for all tasks, entered through a shared A; inside it,
each task t has its own r × r transform Λ_t (here diagonal: r numbers, AdapterHub's
"singular_values"), and n shared up-projections B_k are mixed by task-specific weights, a softmax
of temperature τ:

    h = W₀ x + s · Σ_k softmax_k(w_t / τ) B_k Λ_t A x,        Λ_t = diag(λ_t),  λ_t = 1,  w_t = 1 at the start

Trainable per layer: r·K + n·N·r + T·(r + n). Equal to AdapterHub 1.3's `MTLLoRAConfig` (one
adapter per task, `share_parameters`, `MultiTask` with `task_ids`); its "linear" task matrix fails
to build in 1.3 (its module skips nn.Module's constructor), so only the diagonal one is compared.

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

Lei, Bai, Brahma, Ainslie, Lee, Zhou, Du, Zhao, Wu, Li, Zhang, Chang. "Conditional Adapters:
Parameter-efficient Transfer Learning with Fast Inference." NeurIPS 2023. arXiv:2304.04947 (CoDA).
Routing tokens rather than modules: in each adapted residual sublayer x + F(x), a router scores the
n tokens, s = x w, and only k of them go through the frozen, heavy F; every token goes through a
light parallel adapter A. A soft top-k turns the scores into weights λ ∈ [0, 1]ⁿ with Σλ = k,

    λ = argmax_λ  s·λ + ε H(λ),    H(λ) = −Σ_i λ_i log λ_i        (0 ≤ λ_i ≤ 1, Σ_i λ_i = k)

whose solution is λ_i = min(1, exp((s_i + a)/ε)) with a set so that Σλ = k; it is computed here exactly,
by sorting (the paper iterates a dual algorithm to the same point). The k tokens of largest λ are the
selected set S:

    x_i ← x_i + A(x_i) + [i ∈ S] · λ_i · F(x_S)_i                  (F sees only the selected tokens)

so the heavy branch costs k/n of the dense one, and λ carries the router's gradient. With k = n every
λ_i = 1 and CoDA is exactly the dense parallel adapter x + F(x) + A(x) (tested). Trainable per
adapted sublayer: 2·d·m + d + m (the adapter) + d (the router). The authors' code is not public;
the paper's variants for attention (which tokens are keys and values) are not reproduced: F here is
any module over the selected tokens, and ε = 0.03 is our choice.
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
from reference_impls.bottleneck import Adapter

FAMILY = "Mixtures and routing"

IMPLEMENTS = ("polytropon", "multi-head-routing", "mtl-lora", "mixture-of-vectors", "adamix", "coda")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("hf-peft", "adapters-library", "modular-deep-learning")


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


class MTLLoRALinear(nn.Module):
    """A frozen nn.Linear, a shared A and n shared B_k, and per task a diagonal Λ_t and mixing weights w_t."""

    def __init__(
        self, base: nn.Linear, tasks: int, r: int = 8, alpha: float = 8.0, up_projections: int = 1, sharpness=0.05
    ):
        super().__init__()
        K, N = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base, self.r, self.scale, self.sharpness = base, r, alpha / r, sharpness
        self.A = nn.Parameter(torch.empty(r, K, **factory))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        self.B = nn.Parameter(torch.zeros(up_projections, N, r, **factory))  # B = 0: the base model at first
        self.task_values = nn.Parameter(torch.ones(tasks, r, **factory))  # λ_t, the diagonal of Λ_t
        self.task_weights = nn.Parameter(torch.ones(tasks, up_projections, **factory))  # w_t
        self.task_ids: torch.Tensor | None = None  # set by use_tasks() for a batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task_ids is None:
            raise ValueError("which task is each row? Call the model inside `with use_tasks(model, task_ids):`")
        batch = x.shape[0]
        values = self.task_values[self.task_ids].reshape(batch, *[1] * (x.dim() - 2), self.r)  # (batch, …, r)
        mix = torch.softmax(self.task_weights[self.task_ids] / self.sharpness, dim=-1)  # (batch, n)
        inner = (x.to(self.A.dtype) @ self.A.T) * values  # Λ_t A x
        per_projection = torch.einsum("b...r,knr->bk...n", inner, self.B)  # B_k Λ_t A x, (batch, n, …, N)
        update = torch.einsum("bk,bk...n->b...n", mix, per_projection)
        return self.base(x) + (self.scale * update).to(x.dtype)


def inject_mtl_lora(
    model: nn.Module, target_names: list[str], tasks: int, r: int = 8, alpha: float = 8.0, up_projections: int = 1,
    sharpness: float = 0.05,
) -> list[str]:  # fmt: skip
    """MTL-LoRA on the named nn.Linear layers for `tasks` tasks; everything else frozen."""
    targets = find_targets(model, target_names)
    for name in targets:
        layer = MTLLoRALinear(model.get_submodule(name), tasks, r, alpha, up_projections, sharpness)
        replace_module(model, name, layer)
    freeze_all_but(model, MTLLoRALinear, ("A", "B", "task_values", "task_weights"))
    return targets


def use_tasks(model: nn.Module, task_ids: torch.Tensor):
    """`with use_tasks(model, task_ids):` every PolyLoRALinear and MTLLoRALinear reads the task of each
    row of the batch."""
    return setting(model, (PolyLoRALinear, MTLLoRALinear), "task_ids", task_ids)


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


# ---- CoDA ------------------------------------------------------------------------------------------


def soft_top_k(scores: torch.Tensor, k: int, epsilon: float = 0.03) -> torch.Tensor:
    """λ ∈ [0, 1]^n per row of scores (…, n), Σλ = k: the exact solution of the entropy-regularised
    top-k, λ_i = min(1, exp((s_i + a)/ε)). With the scores sorted, the j largest saturate at 1 and
    a = ε (log(k − j) − log Σ_{i≥j} exp(s_i/ε)); the j that is consistent (s_{j−1} + a ≥ 0 ≥ s_j + a)
    is found among 0 … k−1 at once."""
    n = scores.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k must be between 1 and the number of tokens ({n}), not {k}")
    ordered = scores.sort(dim=-1, descending=True).values[..., :k]  # only the first k can be the j-th
    tail = torch.logcumsumexp((scores.sort(dim=-1).values / epsilon), dim=-1).flip(-1)[..., :k]  # log Σ_{i≥j}
    j = torch.arange(k, device=scores.device, dtype=scores.dtype)
    a = epsilon * (torch.log(k - j) - tail)  # (…, k): the candidate for each j
    above = torch.cat([torch.full_like(ordered[..., :1], float("inf")), ordered[..., :-1]], dim=-1)
    consistent = (above + a >= 0) & (ordered + a <= 1e-6 * epsilon)
    chosen = consistent.to(torch.int8).argmax(dim=-1, keepdim=True)  # the first consistent j
    a = a.gather(-1, chosen)
    return torch.exp(torch.clamp((scores + a) / epsilon, max=0.0))  # exp ≤ 1; clamped before exp: no inf


class ConditionalAdapter(nn.Module):
    """CoDA in place of a residual function F: A(x) for every token, plus λ_i F(x_S)_i for the k selected."""

    def __init__(self, heavy: nn.Module, d: int, m: int, keep: float = 0.25, epsilon: float = 0.03):
        super().__init__()
        weight = next(heavy.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.heavy, self.keep, self.epsilon = heavy, keep, epsilon
        self.adapter = Adapter(d, m, "relu", **factory)  # up-projection zero: only F at the start
        self.router = nn.Linear(d, 1, bias=False, **factory)
        nn.init.zeros_(self.router.weight)  # equal scores at the start
        self.heavy_tokens = 0  # tokens the heavy branch processed in the last forward (for cost reports)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, n, d) → what the residual stream adds: A(x) + the routed F."""
        n = x.shape[-2]
        k = max(1, min(n, round(self.keep * n)))
        lam = soft_top_k(self.router(x).squeeze(-1), k, self.epsilon)  # (batch, n)
        selected = lam.topk(k, dim=-1).indices.sort(dim=-1).values  # keep the tokens in their order
        rows = selected.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        heavy = self.heavy(x.gather(-2, rows)) * lam.gather(-1, selected).unsqueeze(-1)
        self.heavy_tokens = selected.numel()
        return self.adapter(x).scatter_add(-2, rows, heavy.to(x.dtype))


def inject_coda(model: nn.Module, target_names: list[str], m: int = 16, keep: float = 0.25) -> list[str]:
    """CoDA in place of each named residual function F (a module the model uses as x + F(x), taking and
    returning (batch, tokens, d)); everything but the adapters and routers frozen."""
    targets = find_targets(model, target_names, kind=nn.Module)
    for name in targets:
        heavy = model.get_submodule(name)
        replace_module(model, name, ConditionalAdapter(heavy, output_width(heavy), m, keep))
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, ConditionalAdapter):
            module.adapter.requires_grad_(True)
            module.router.requires_grad_(True)
    return targets


class TokenMixer(nn.Module):
    """The CoDA demo's frozen model: tokens through residual FFN blocks, then pooled to a vector."""

    def __init__(self, d: int = 32, depth: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(depth)
        )
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.out(x.mean(dim=-2))


def demo() -> None:
    """Polytropon on two tasks that share structure; MoV and AdaMix on one; CoDA on token sequences."""
    x, y1 = toy_task(seed=1)
    _, y2 = toy_task(seed=2)
    model = toy_model()
    inject_poly(model, ["0", "2", "4"], tasks=2, skills=3, r=4)
    task_ids = torch.arange(2).repeat_interleave(len(x))
    inputs, targets = torch.cat([x, x]), torch.cat([y1, y2])  # every batch mixes the two tasks
    with use_tasks(model, task_ids):
        before, after = train(model, inputs, targets)
    report("Polytropon, 3 skills for 2 tasks, r=4", model, before, after)
    model = toy_model()
    inject_mtl_lora(model, ["0", "2", "4"], tasks=2, r=4, alpha=4, up_projections=3)
    with use_tasks(model, task_ids):
        before, after = train(model, inputs, targets)
    report("MTL-LoRA, 3 up-projections shared by 2 tasks, r=4", model, before, after)

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

    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(128, 16, 32, generator=generator)  # 128 sequences of 16 tokens
    target = TokenMixer(seed=5)(tokens).detach()  # the new task: what another network computes
    model = TokenMixer()
    inject_coda(model, ["blocks.0", "blocks.1"], m=8, keep=0.25)
    before, after = train(model, tokens, target, steps=200)
    report("CoDA, 4 of 16 tokens through each heavy block, m=8", model, before, after)
    heavy = sum(module.heavy_tokens for module in model.modules() if isinstance(module, ConditionalAdapter))
    print(
        f"  heavy blocks ran on {heavy:,} of {2 * tokens.shape[0] * tokens.shape[1]:,} token positions: "
        f"{2 * tokens.shape[0] * tokens.shape[1] / heavy:.1f}x fewer heavy FLOPs than the dense model"
    )


if __name__ == "__main__":
    demo()
