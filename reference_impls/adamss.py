"""AdaMSS: the weight's singular subspace, clustered, with one small update per cluster, and the
least useful clusters frozen during training.

Zheng, Lu, Dong, et al. "AdaMSS: Adaptive Multi-Subspace Approach for Parameter-Efficient
Fine-Tuning." NeurIPS 2025 (OpenReview 8ZdWmpYxT0).

Take the weight with its bias as a last column, W̃ = [W | b] ∈ ℝ^{d_out×(d_in+1)}, and its rank-R
truncated SVD W̃ ≈ U Σ Vᵀ. Each output neuron i is a point U[i] ∈ ℝ^R; k-means groups the neurons
into K clusters I₁ … I_K. Cluster k gets its own low-rank update in the frozen input basis Vᵀ:

    ΔW̃[I_k] = B_k A_k Vᵀ,        A_k ∈ ℝ^{r_k×R},   B_k ∈ ℝ^{|I_k|×r_k},        h = W x + b + ΔW̃ [x; 1]

A_k starts as the top r_k right singular vectors of U[I_k] (the directions the cluster's neurons use
most), B_k at 0, so ΔW̃ = 0 at the start. PEFT aims at the same subspace through a randomised SVD of
the Gram matrix U[I_k] U[I_k]ᵀ with q = r_k and two power iterations, which can land far from it (in
our tests the smallest principal cosine between the two was 0.09 for one cluster); the reference
takes the exact directions. Only the start differs: a checkpoint carries A_k. r_k = min(r, |I_k|),
or, with a dynamic rank, the number of singular values of U[I_k] whose square exceeds τ times the
largest one (at most r, at least 1). Parameters: Σ_k r_k (R + |I_k|) per layer, = K r R + r d_out
when every cluster has r neurons or more. The update merges into W and b.

Adaptive subspace allocation (ASA, `SubspaceAllocator`) trains all K clusters of every layer at
first, then, between two steps of training, keeps only the most important ones trainable: each
cluster scores mean(I ⊙ U) over A_k plus the same over B_k, with I an exponential average of
|θ ⊙ ∂L/∂θ| and U one of its change from step to step (AdaLoRA's sensitivity and uncertainty), and
the number kept falls from the total to a target on a polynomial schedule. A frozen cluster keeps
its update. PEFT keeps the clusters that score strictly above the target-th best (one fewer than the
target when no two scores tie); the reference does the same, so that training matches.

The clustering is PEFT's exactly (its SVD seed, scikit-learn's k-means with init="random", one
run of at most 10 iterations, seed 123456789, reimplemented here in NumPy), so that a checkpoint,
which does not store the clusters, loads onto the same rows. Equal to PEFT 0.21 `adamss`;
`reference_impls.interop` loads its checkpoints.
"""

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from reference_impls._plumbing import (
    ReplacingMerge,
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

FAMILY = "Subspace updates"

IMPLEMENTS = ("adamss",)

# The frameworks that provide the method.
COVERED_BY = ("hf-peft",)


def truncated_svd(matrix: torch.Tensor, R: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """U (m × R) and Vᵀ (R × n) of a rank-R randomised SVD (two power iterations) drawn under `seed`."""
    R = min(R, *matrix.shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(matrix.float(), q=R, niter=2)
    return U[:, :R], V[:, :R].T


def kmeans(points: torch.Tensor, k: int, seed: int = 123456789, iterations: int = 10, tol: float = 1e-4):
    """Cluster labels of the rows of `points`, as scikit-learn's KMeans(init="random", n_init=1) finds them:
    k distinct rows drawn as the first centres, then rounds of assigning every row to its nearest centre and
    moving each centre to its rows' mean, until no label changes, the centres move less than tol times the
    mean variance, or `iterations` rounds have run. A centre left without rows takes the row farthest from
    its own centre. In float32 on centred data, as scikit-learn computes it."""
    X = points.detach().cpu().numpy().astype(np.float32)
    n = X.shape[0]
    tolerance = np.mean(np.var(X, axis=0)) * tol
    X = X - X.mean(axis=0)
    weights = np.ones(n, dtype=np.float32)
    centres = X[np.random.RandomState(seed).choice(n, size=k, replace=False, p=weights / weights.sum())]

    def nearest(centres):
        distances = np.einsum("ij,ij->i", centres, centres)[None, :] - 2 * X @ centres.T
        return distances.argmin(axis=1)

    labels, converged = np.full(n, -1), False
    for _ in range(iterations):
        new_labels = nearest(centres)
        sums, counts = np.zeros_like(centres), np.bincount(new_labels, minlength=k).astype(np.float32)
        np.add.at(sums, new_labels, X)
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # each empty cluster takes one of the rows farthest from their centres
            distances = ((X - centres[new_labels]) ** 2).sum(axis=1)
            for cluster, row in zip(empty, np.argpartition(distances, -empty.size)[: -empty.size - 1 : -1]):
                sums[new_labels[row]] -= X[row]
                counts[new_labels[row]] -= 1
                sums[cluster], counts[cluster] = X[row], 1
        new_centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], sums)
        shift = ((new_centres - centres) ** 2).sum()
        centres = new_centres
        if np.array_equal(new_labels, labels):
            converged = True
            break
        labels = new_labels
        if shift <= tolerance:
            break
    if not converged:  # the labels of the final centres
        labels = nearest(centres)
    return torch.from_numpy(labels).long()


class AdaMSSLinear(ReplacingMerge, nn.Module):
    """A frozen nn.Linear plus ΔW̃[I_k] = B_k A_k Vᵀ for the K clusters I_k of its output neurons."""

    def __init__(
        self,
        base: nn.Linear,
        R: int = 100,
        K: int = 5,
        r: int | list[int] = 1,
        dynamic_rank: bool = False,
        threshold: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        self.base = base
        d_out, d_in = base.weight.shape
        with_bias = base.weight if base.bias is None else torch.cat([base.weight, base.bias[:, None]], dim=1)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if base.weight.is_meta:  # counting parameters only: K equal clusters, no SVD
            R = min(R, *with_bias.shape)
            U, Vt = None, torch.empty(R, with_bias.shape[1], device="meta")
            clusters = list(torch.arange(d_out).tensor_split(min(K, d_out)))
        else:
            U, Vt = truncated_svd(with_bias.detach(), R, seed)
            labels = kmeans(U, min(K, d_out))
            clusters = [torch.where(labels == cluster)[0] for cluster in range(int(labels.max()) + 1)]
        ranks = r if isinstance(r, list) else [self.rank(U, rows, r, dynamic_rank, threshold) for rows in clusters]
        self.register_buffer("Vt", Vt.to(**factory))
        order = torch.cat(clusters)  # every output neuron once, cluster by cluster
        self.register_buffer("inverse", torch.argsort(order).to(base.weight.device))
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for rows, rank in zip(clusters, ranks):
            if U is None:
                A = torch.empty(rank, Vt.shape[0], device="meta")
            else:
                A = torch.linalg.svd(U[rows], full_matrices=False)[2][:rank]  # U[I_k]'s top directions
            self.A.append(nn.Parameter(A.to(**factory)))
            self.B.append(nn.Parameter(torch.zeros(len(rows), rank, **factory)))

    @staticmethod
    def rank(U: torch.Tensor | None, rows: torch.Tensor, r: int, dynamic: bool, threshold: float) -> int:
        if not dynamic or U is None:
            return max(1, min(r, len(rows)))
        energy = torch.linalg.svdvals(U[rows]) ** 2  # the singular values of U[I_k] U[I_k]ᵀ
        return max(1, min(int((energy > threshold * energy[0]).sum()), r))

    def delta(self) -> torch.Tensor:
        """ΔW̃ (d_out × (d_in + 1) with a bias, d_out × d_in without)."""
        blocks = [B @ A @ self.Vt.to(A.dtype) for A, B in zip(self.A, self.B)]
        return torch.cat(blocks)[self.inverse]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        x = x.to(self.Vt.dtype)
        if self.base.bias is not None:  # [x; 1]: the update reaches the bias too
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        coefficients = F.linear(x, self.Vt)  # Vᵀ [x; 1], shared by every cluster
        outputs = [F.linear(F.linear(coefficients, A), B) for A, B in zip(self.A, self.B)]
        return h + torch.cat(outputs, dim=-1)[..., self.inverse].to(h.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.delta()[:, : self.base.in_features].to(self.base.weight.dtype)

    def merged_bias(self) -> torch.Tensor | None:
        if self.base.bias is None:
            return None
        return self.base.bias + self.delta()[:, -1].to(self.base.bias.dtype)


def inject_adamss(model: nn.Module, target_names: list[str], R: int = 100, K: int = 5, r: int = 1, **options):
    """AdaMSS on the named layers (options: dynamic_rank, threshold, seed); A and B of every cluster train."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, AdaMSSLinear(model.get_submodule(name), R, K, r, **options))
    freeze_all_but(model, AdaMSSLinear, ("A", "B"))
    return targets


def merge_adamss(model: nn.Module) -> None:
    set_merged(model, AdaMSSLinear, True)


def unmerge_adamss(model: nn.Module) -> None:
    set_merged(model, AdaMSSLinear, False)


class SubspaceAllocator:
    """ASA: call `step(global_step)` after each backward (before the gradients are cleared). Between
    init_warmup and final_warmup it averages every cluster's importance and, every `interval` steps,
    keeps trainable only the clusters of the whole model that score above the scheduled target's."""

    def __init__(
        self,
        model: nn.Module,
        target: int = 50,
        init_warmup: int = 50,
        final_warmup: int = 1000,
        interval: int = 100,
        beta_importance: float = 0.85,
        beta_uncertainty: float = 0.85,
        exponent: float = 3.0,
    ):
        if not 0 <= init_warmup < final_warmup or interval < 1 or target < 1 or exponent <= 0:
            raise ValueError("ASA needs 0 ≤ init_warmup < final_warmup, interval ≥ 1, target ≥ 1 and exponent > 0")
        self.layers = [module for module in model.modules() if isinstance(module, AdaMSSLinear)]
        self.clusters = [(layer, k) for layer in self.layers for k in range(len(layer.A))]
        self.target, self.init_warmup, self.final_warmup, self.interval = target, init_warmup, final_warmup, interval
        self.betas, self.exponent = (beta_importance, beta_uncertainty), exponent
        self.reset()

    def reset(self) -> None:
        self.importance: dict[int, torch.Tensor] = {}  # by id of the parameter
        self.uncertainty: dict[int, torch.Tensor] = {}

    def scheduled(self, step: int) -> int:
        """Clusters to keep: from all of them at init_warmup down to `target` at final_warmup, as (1 − t)^exponent."""
        progress = min(max(1 - (step - self.init_warmup) / (self.final_warmup - self.init_warmup), 0.0), 1.0)
        return int(self.target + (len(self.clusters) - self.target) * progress**self.exponent)

    @torch.no_grad()
    def observe(self, parameter: nn.Parameter) -> None:
        if parameter.grad is None:
            return
        key, beta_i, beta_u = id(parameter), *self.betas
        importance = (parameter * parameter.grad).abs()
        previous = self.importance.get(key, torch.zeros_like(importance))
        self.uncertainty[key] = (
            beta_u * self.uncertainty.get(key, torch.zeros_like(importance))
            + (1 - beta_u) * (importance - previous).abs()
        )
        self.importance[key] = beta_i * previous + (1 - beta_i) * importance

    def score(self, layer: AdaMSSLinear, k: int) -> torch.Tensor | None:
        parts = (layer.A[k], layer.B[k])
        if any(id(p) not in self.importance for p in parts):
            return None
        return sum((self.importance[id(p)] * self.uncertainty[id(p)]).mean() for p in parts)

    @torch.no_grad()
    def step(self, step: int) -> None:
        if not self.init_warmup <= step <= self.final_warmup:
            return
        for layer, k in self.clusters:
            self.observe(layer.A[k])
            self.observe(layer.B[k])
        if step % self.interval:
            return
        scored = [(layer, k, score) for layer, k in self.clusters if (score := self.score(layer, k)) is not None]
        if scored:
            keep = self.scheduled(step)
            scores = torch.stack([score for *_, score in scored])
            threshold = -float("inf") if keep >= len(scored) else torch.topk(scores, keep).values[-1].item()
            for layer, k, score in scored:
                for parameter in (layer.A[k], layer.B[k]):
                    parameter.requires_grad_(score.item() > threshold)
                    if not parameter.requires_grad:
                        parameter.grad = None
        self.reset()


def demo() -> None:
    """AdaMSS on the toy task, then with ASA aiming at 6 of its 15 clusters (the strict threshold keeps 5)."""
    x, y = toy_task()
    model = toy_model()
    inject_adamss(model, ["0", "2", "4"], R=32, K=5, r=4)
    before, after = train(model, x, y, lr=1e-2)
    report("adamss (R = 32, K = 5, r = 4) on 3 layers", model, before, after)
    report_merge(model, x, merge_adamss)

    model = toy_model()
    inject_adamss(model, ["0", "2", "4"], R=32, K=5, r=4)
    allocator = SubspaceAllocator(model, target=6, init_warmup=20, final_warmup=200, interval=20)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = lambda: F.mse_loss(model(x), y)  # noqa: E731
    with torch.no_grad():
        start = loss().item()
    for step in range(300):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        allocator.step(step)
    trained = sum(layer.A[k].requires_grad for layer, k in allocator.clusters)
    print(f"adamss with ASA: {trained} of {len(allocator.clusters)} clusters still trained at the end")
    print(f"loss on the new task: {start:.4g} before, {loss().item():.4g} after training")


if __name__ == "__main__":
    demo()
