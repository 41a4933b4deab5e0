"""LoRA started from data: EVA (A from the principal directions of each layer's inputs, ranks
redistributed by explained variance), CorDA (the weight decomposed in the light of its inputs'
covariance) and LoRA-GA (A and B from the singular vectors of the full fine-tuning gradient). Each
runs the frozen model on a few batches first; training is then plain LoRA.

**EVA.** Paischer, Hauzenberger, Schmied, et al. "One Initialization to Rule them All: Fine-tuning via
Explained Variance Adaptation." 2024. arXiv:2410.07170. For each layer, the inputs X ∈ ℝ^{n×d_in} of
a stream of batches are decomposed incrementally (an incremental PCA) until their top components
stop moving (cosine similarity ≥ τ between consecutive batches). With X − x̄ = U S Vᵀ,

    A = V_{:k}ᵀ,        B = 0,        k_ℓ from the explained variance ratios σᵢ² / ‖X − x̄‖²_F

where the total rank budget Σ r is handed out to the largest explained-variance ratios of all layers
together (each layer offers at most ρ r of them), so layers whose inputs are spread wide get more.
A layer given k ≠ r keeps its scale s = α/r by taking α·k/r; a layer given 0 is left without
LoRA. The model computes W₀x at the start. Layers that receive the same input (q, k, v of one
attention) share one decomposition. Trained parameters: Σ_ℓ k_ℓ (d_in + d_out).

**CorDA.** Yang, Li, Zhou, et al. "CorDA: Context-Oriented Decomposition Adaptation of Large
Language Models for Task-Aware Parameter-Efficient Fine-tuning." NeurIPS 2024. arXiv:2406.05223.
With C the mean covariance XᵀX of the layer's inputs on sample data (each batch scaled by its
largest value, as the official code does; damped until invertible), the SVD is of W C, not W:

    W C = U S Vᵀ,    W = U S (C⁻¹ V)ᵀ,    B = U_r (S_r / s)^½,    A = (S_r / s)^½ (C⁻¹ V_r)ᵀ,    W₀ ← W − s·B A

"ipm" (instruction-previewed) takes the r largest components, the ones the task's inputs excite
most, to adapt; "kpm" (knowledge-preserved) takes the r smallest and keeps the rest, which the
inputs of the knowledge to keep use, frozen. The model computes W x at the start.

**LoRA-GA.** Wang, Zhu, Ding, et al. "LoRA-GA: Low-Rank Adaptation with Gradient Approximation."
2024. arXiv:2407.05000. With G the gradient of the loss with respect to W, averaged over a few
batches, and its SVD G = U S Vᵀ, A and B are disjoint slices of it, so that LoRA's first step moves
s·BA along G as closely as rank r allows:

    A = V_{:, :r}ᵀ,    B = U_{:, r:2r} diag(S_{r:2r}) · γ_s,    W₀ ← W − s·B A

("ArB2r", the recommended split; "A2rBr" swaps the halves, "ArBr" alternates them). The stable
scale γ_s = d_out^¼ / √γ keeps the update's size independent of the width; "weight_svd" scales B so
its largest singular value is W's, "gd_scale" divides both by s, "unit" leaves them. Needs 2r ≤
min(d_in, d_out).

All three add nothing to LoRA's count, r (d_in + d_out) per layer, and merge as LoRA does. They equal
PEFT 0.21's `init_lora_weights` "eva" (`get_eva_state_dict`, `initialize_lora_eva_weights`),
"corda" (`preprocess_corda`) and "lora_ga" (`preprocess_loraga`): the same factors and residual
weights from the same batches (tested). Two differences, both in how the SVD is computed: EVA's
incremental PCA uses a randomised SVD (2k columns, 4 power iterations, seed 42), as PEFT's does, so
the same batches give the same components; LoRA-GA takes the exact SVD of G as the paper does, where
PEFT takes a randomised one from the global random generator (4r columns, 4 iterations): the two
agree up to that approximation and the signs of the singular vectors (tested with PEFT's call made
exact). A CorDA or LoRA-GA checkpoint holds A and B but not the residual base, which only the
calibration data can rebuild: PEFT's own loading of one is not faithful, so save it with
`path_initial_model_for_weight_conversion` (a plain LoRA of rank 2r, which loads).
"""

from collections import Counter
from itertools import cycle

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
from reference_impls.lora_inits import set_factors

FAMILY = "Low-rank updates"

IMPLEMENTS = ("eva", "corda", "lora-ga")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def record_inputs(model: nn.Module, names: list[str], run) -> dict[str, list[torch.Tensor]]:
    """The 2-D inputs (rows = tokens) each named layer receives while `run()` runs the model."""
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: inputs[name].append(args[0].detach().flatten(0, -2))
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


# ---- EVA ----------------------------------------------------------------------------------------


class IncrementalPCA:
    """The top k principal components of a stream of batches (Ross et al. 2008, the algorithm of
    scikit-learn's IncrementalPCA): each batch's SVD is of [S Vᵀ so far; the centred batch; one row
    correcting for the moved mean]. Means and the total variance are kept in float64."""

    def __init__(self, k: int, seed: int = 42):
        self.k, self.seed = k, seed
        self.seen, self.mean, self.total_variance = 0, None, 0.0
        self.components = self.singular_values = self.explained_variance_ratio = None

    def update(self, X: torch.Tensor) -> None:
        X = X.float()
        n = X.shape[0]
        batch_mean = X.double().mean(0)
        batch_variance = (X.double() - batch_mean).square().sum()
        if self.mean is None:
            stacked = (X - batch_mean).float()
            mean, total_variance = batch_mean, batch_variance
        else:
            m = self.seen
            float_mean = X.mean(0)  # the batch centred by its fp32 mean (the running sums stay in fp64)
            correction = (m * n / (m + n)) ** 0.5 * (self.mean - float_mean)
            stacked = torch.vstack([self.singular_values[:, None] * self.components, X - float_mean, correction])
            mean = (m * self.mean + n * batch_mean) / (m + n)
            between = m * n / (m + n) * (self.mean - batch_mean).square().sum()  # the two means' spread
            total_variance = self.total_variance + batch_variance + between
        with torch.random.fork_rng():  # a randomised SVD, reproducible
            torch.manual_seed(self.seed)
            _, S, V = torch.svd_lowrank(stacked, q=2 * self.k, niter=4)
        Vt = V.T
        signs = torch.sign(Vt[torch.arange(Vt.shape[0]), Vt.abs().argmax(1)])  # largest entry of each positive
        self.components, self.singular_values = (signs[:, None] * Vt)[: self.k], S[: self.k]
        self.seen, self.mean, self.total_variance = self.seen + n, mean, total_variance
        self.explained_variance_ratio = S[: self.k] ** 2 / total_variance


def eva_components(
    model: nn.Module,
    target_names: list[str],
    batches: list,
    r: int = 8,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    forward=None,
    max_batches: int = 1000,
) -> dict[str, torch.Tensor]:
    """EVA's A for every named layer (a k × d_in matrix, k from the shared rank budget; k = 0 drops
    the layer), from the frozen model run on `batches` (cycled until every layer's components have
    converged, at most `max_batches` times) by `forward(model, batch)` (default model(batch))."""
    forward = forward or (lambda m, batch: m(batch))
    names = find_targets(model, target_names)
    if rho > 1000:  # as PEFT: more components than any weight has make no sense
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // r)
    offered = round(r * rho)
    # Layers fed the same tensor share one PCA (its owner, the first of them); owners come first
    # in the order the budget is handed out, as in PEFT, so ties fall the same way.
    first = record_inputs(model, names, lambda: forward(model, batches[0]))
    owner = {}
    for name in names:
        owner[name] = next((o for o in dict.fromkeys(owner.values()) if torch.equal(first[o][0], first[name][0])), name)
    owners = [name for name in names if owner[name] == name]
    order = owners + [name for name in names if owner[name] != name]
    pcas = {name: IncrementalPCA(offered) for name in owners}
    converged = {name: torch.zeros(offered, dtype=torch.bool) for name in owners}
    ranks = {name: offered for name in names}
    for seen, batch in enumerate(cycle(batches)):
        active = [name for name in owners if not converged[name][: ranks[name]].all()]
        if not active:
            break
        if seen == max_batches:
            raise ValueError(
                f"EVA: the input components of {', '.join(active)} did not converge in {max_batches} batches "
                f"(cosine similarity τ = {tau}); give more batches or a lower τ"
            )
        for name, inputs in record_inputs(model, active, lambda batch=batch: forward(model, batch)).items():
            X = inputs[0]
            if X.shape[0] < offered:
                continue  # too few rows for k components: this batch is skipped for the layer, as in PEFT
            previous = pcas[name].components
            pcas[name].update(X)
            if previous is not None:
                converged[name] = torch.cosine_similarity(pcas[name].components, previous, dim=1) >= tau
        if all(pca.components is not None for pca in pcas.values()):
            ranks = distribute_ranks({n: pcas[owner[n]].explained_variance_ratio for n in order}, owner, r * len(names))
    components = {}
    for name in names:
        pca = pcas[owner[name]]
        A = pca.components[: ranks[name]]
        if whiten:
            A = A / pca.singular_values[: ranks[name]].sqrt()[:, None]
        components[name] = A.float()
    return components


def distribute_ranks(ratios: dict[str, torch.Tensor], owner: dict[str, str], budget: int) -> dict[str, int]:
    """The budget's components go to the largest explained-variance ratios over all layers; of layers
    sharing a PCA, its owner takes the largest count (its components are the ones computed)."""
    names, values = zip(*[(name, value) for name, layer_ratios in ratios.items() for value in layer_ratios])
    best = torch.stack(values).argsort(descending=True)[:budget]
    counts = Counter(names[i] for i in best.tolist())
    ranks = {name: counts.get(name, 0) for name in ratios}
    for name, first in owner.items():
        if ranks[first] < ranks[name]:
            ranks[first], ranks[name] = ranks[name], ranks[first]
    return ranks


def inject_eva(
    model: nn.Module,
    components: dict[str, torch.Tensor],
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
    adjust_scaling: bool = True,
) -> list[str]:
    """LoRA on the layers of `components` (from `eva_components`), A = the components, B = 0; a layer
    of rank k ≠ r takes α·k/r (keeping s = α/r) unless `adjust_scaling` is off; rank 0: no LoRA."""
    targets = []
    for name, A in components.items():
        k = A.shape[0]
        if k == 0:
            continue
        layer_alpha = alpha * k / r if adjust_scaling else alpha
        layer = LoRALinear(model.get_submodule(name), k, layer_alpha, dropout, use_rslora)
        with torch.no_grad():
            layer.A.copy_(A.to(layer.A.dtype))
        replace_module(model, name, layer)
        targets.append(name)
    freeze_all_but(model, LoRALinear, ("A", "B"))
    return targets


# ---- CorDA --------------------------------------------------------------------------------------


def corda_covariances(model: nn.Module, target_names: list[str], run) -> dict[str, torch.Tensor]:
    """The mean over the model's calls in `run()` of each named layer's XᵀX, every batch X first
    scaled by its largest value (so batches weigh alike), in fp32."""
    covariances = {}
    for name, inputs in record_inputs(model, find_targets(model, target_names), run).items():
        batches = [X.float() / X.float().max().abs() for X in inputs]
        covariances[name] = sum(X.T @ X for X in batches) / len(batches)
    return covariances


@torch.no_grad()
def corda_init(layer: LoRALinear, covariance: torch.Tensor, mode: str = "ipm") -> None:
    """A, B from the SVD of W C (its r largest components for "ipm", smallest for "kpm"), the base
    left as W − s·BA."""
    C = covariance.float()
    eye = torch.eye(C.shape[0])
    damp = 0.01  # C + damp · mean(diag C) · I, the damping doubled until its inverse is accurate
    while True:
        damped = C + damp * C.diagonal().mean() * eye
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye) < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(layer.base.weight.float() @ damped, full_matrices=False)
    V = (Vh @ inverse).T  # W = U S Vᵀ with V = (Vh C⁻¹)ᵀ
    kept = slice(None, layer.r) if mode == "ipm" else slice(-layer.r, None)
    root = (S[kept] / layer.scale).sqrt()
    set_factors(layer, A=root[:, None] * V[:, kept].T, B=U[:, kept] * root)


def inject_corda(
    model: nn.Module, covariances: dict[str, torch.Tensor], mode: str = "ipm", **lora_options
) -> list[str]:
    """LoRA (options as `lora.inject_lora`) on the layers of `covariances` (from `corda_covariances`),
    started by CorDA: "ipm" adapts the components the task's inputs use most, "kpm" the least."""
    if mode not in ("ipm", "kpm"):
        raise ValueError(f"CorDA's mode is 'ipm' or 'kpm', got {mode!r}")
    targets = inject_lora(model, list(covariances), **lora_options)
    for name in targets:
        corda_init(model.get_submodule(name), covariances[name], mode)
    return targets


# ---- LoRA-GA ------------------------------------------------------------------------------------


def full_gradients(model: nn.Module, target_names: list[str], train_step) -> dict[str, torch.Tensor]:
    """The gradient of each named layer's weight, summed over the backward passes `train_step()` runs
    (in training mode, nothing else taking gradients) and divided by their number (the passes that
    reached the weight, as PEFT counts its layer's backward calls)."""
    names = find_targets(model, target_names)
    layers = [model.get_submodule(name) for name in names]
    was_training, wanted = model.training, {p: p.requires_grad for p in model.parameters()}
    passes = Counter()
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = []
    for name, layer in zip(names, layers):
        layer.weight.requires_grad_(True)
        layer.weight.grad = None
        hooks.append(layer.weight.register_hook(lambda grad, name=name: passes.update([name])))
    try:
        model.train()
        with torch.enable_grad():
            train_step()
    finally:
        for hook in hooks:
            hook.remove()
        for p, requires_grad in wanted.items():
            p.requires_grad_(requires_grad)
        model.train(was_training)
    gradients = {}
    for name, layer in zip(names, layers):
        gradients[name] = layer.weight.grad.detach() / max(passes[name], 1)
        layer.weight.grad = None
    return gradients


@torch.no_grad()
def lora_ga_init(
    layer: LoRALinear, gradient: torch.Tensor, direction: str = "ArB2r", scale: str = "stable", gamma: float = 16
) -> None:
    """A, B from disjoint slices of the gradient's top 2r singular triplets, the base left as W − s·BA."""
    r, d_out = layer.r, layer.base.out_features
    if 2 * r > min(gradient.shape):
        raise ValueError(f"LoRA-GA takes 2r = {2 * r} singular vectors of a {tuple(gradient.shape)} gradient")
    U, S, Vh = torch.linalg.svd(gradient.float(), full_matrices=False)
    a, b = {"ArB2r": (slice(0, r), slice(r, 2 * r)), "A2rBr": (slice(r, 2 * r), slice(0, r))}.get(
        direction,
        (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),  # "ArBr": A odd, B even indices
    )
    A, B, S_B = Vh[a], U[:, b] * S[b], S[b]
    if scale == "stable":
        B = B * d_out**0.25 / gamma**0.5
    elif scale == "weight_svd" and S_B[0] > 0:  # B's largest singular value becomes W's
        B = B * torch.linalg.matrix_norm(layer.base.weight.float(), ord=2) / S_B[0]
    elif scale == "gd_scale":
        A, B = A / layer.scale, B / layer.scale
    set_factors(layer, A=A, B=B)


LORA_GA_DIRECTIONS, LORA_GA_SCALES = ("ArB2r", "A2rBr", "ArBr"), ("stable", "weight_svd", "gd_scale", "unit")


def inject_lora_ga(
    model: nn.Module,
    gradients: dict[str, torch.Tensor],
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: float = 16,
    **lora_options,
) -> list[str]:
    """LoRA (options as `lora.inject_lora`) on the layers of `gradients` (from `full_gradients`),
    started by LoRA-GA with the given split of the singular vectors and scaling."""
    if direction not in LORA_GA_DIRECTIONS or scale not in LORA_GA_SCALES:
        raise ValueError(
            f"LoRA-GA direction must be one of {LORA_GA_DIRECTIONS} and scale one of {LORA_GA_SCALES}, "
            f"got {direction!r}, {scale!r}"
        )
    targets = inject_lora(model, list(gradients), **lora_options)
    for name in targets:
        lora_ga_init(model.get_submodule(name), gradients[name], direction, scale, gamma)
    return targets


def demo() -> None:
    """LoRA, EVA, CorDA (ipm) and LoRA-GA (rank 8, the same steps) on the toy task, each started from 64 samples."""
    x, y = toy_task()
    sample = x[:64]
    for name in ("lora", "eva", "corda", "lora-ga"):
        model, layers = toy_model(), ["0", "2", "4"]
        if name == "lora":
            inject_lora(model, layers, r=8, alpha=8)
        elif name == "eva":
            inject_eva(model, eva_components(model, layers, [sample[:32], sample[32:]], r=8), r=8, alpha=8)
        elif name == "corda":
            inject_corda(model, corda_covariances(model, layers, lambda: model(sample)), r=8, alpha=8)
        else:
            gradients = full_gradients(model, layers, lambda: nn.functional.mse_loss(model(sample), y[:64]).backward())
            inject_lora_ga(model, gradients, r=8, alpha=8)
        before, after = train(model, x, y, lr=1e-2)
        report(f"{name} (r = 8) on 3 layers", model, before, after)
        report_merge(model, x, merge_lora)


if __name__ == "__main__":
    demo()
