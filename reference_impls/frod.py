"""FRoD: full-rank updates from a basis shared across layers, trained as scalings plus sparse rotations.

Wan, Chen, Feng, Zhou, Xu. "FRoD: Full-Rank Efficient Fine-Tuning with Rotational Degrees for Fast
Convergence." AAAI 2026. arXiv:2512.23485. doi:10.1609/aaai.v40i31.39813.

The layers that play the same role in every block (all query projections, all down-projections)
share one invertible basis V ∈ ℝ^{d_in×d_in}, found jointly from their weights (the paper's
hierarchical joint decomposition, `joint_basis`). Each layer then writes its frozen weight in that
basis, W₀ = U Λ₀ Vᵀ with U's columns of unit norm and Λ₀ = diag(λ₀) their lengths, and trains λ and a
sparse matrix S of "rotational degrees" at a few fixed off-diagonal positions:

    W = U (Λ + S) Vᵀ,        Λ = diag(λ) (starts at Λ₀),        S (starts at 0; nnz entries)

Off-diagonal entries of Λ + S mix the basis directions, so the update W − W₀ = U (Λ − Λ₀ + S) Vᵀ has
full rank although only d_in + nnz numbers per layer are trained, nnz = ⌊ρ d_in²⌋ (at least 1) for
the sparsity ρ; the positions are drawn once per role and shared by its layers.

The joint basis: with the weights of the role's L layers stacked, 𝐖 = [W₁; …; W_L], V holds 𝐖's right
singular vectors when 𝐖 is wide; otherwise, from the QR decomposition 𝐖 = 𝐐 R with the blocks 𝐐ₗ of
𝐐 belonging to the layers,

    V = Rᵀ E,        E = eigenvectors of (1/L) Σₗ (𝐐ₗᵀ 𝐐ₗ + α I)⁻¹

for a small regulariser α. The model starts as the base model (up to rounding: W₀ is recomputed as
U Λ₀ Vᵀ) and the update merges into the weights. In training, `dropout` drops inputs of the update
only: h = W₀ x + b + (W − W₀) dropout(x).

Equal to PEFT 0.21 `frod`, in training too; `reference_impls.interop` loads its checkpoints with their saved bases.
"""

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

FAMILY = "Orthogonal and rotational updates"

IMPLEMENTS = ("frod",)

# The frameworks that provide the method.
COVERED_BY = ("hf-peft",)


def layer_role(path: str) -> str:
    """The role shared by a layer across blocks, from its path: its last two names unless the last but
    one is the block number (`model.layers.3.self_attn.q_proj` → `self_attn_q_proj`; BERT's attention
    output `attention.output.dense` → `attention_output`, apart from the FFN's `output.dense`). This
    is PEFT's naming, so that its saved bases are found by the same keys."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    role = f"{parts[-2]}_{parts[-1]}"
    return "attention_output" if role == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" else role


def joint_basis(weights: list[torch.Tensor], alpha: float = 1e-3) -> torch.Tensor:
    """V (d_in × d_in) shared by the layers whose weights are given (all d_in wide), in fp32."""
    stacked = torch.cat([w.detach().float() for w in weights])
    if stacked.shape[0] < stacked.shape[1]:  # wide: the right singular vectors
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    Q, R = torch.linalg.qr(stacked)
    eye = torch.eye(R.shape[1], device=R.device)
    blocks = Q.split([w.shape[0] for w in weights])
    T = sum(torch.linalg.inv(block.T @ block + alpha * eye) for block in blocks) / len(blocks)
    return R.T @ torch.linalg.eigh(T)[1]


def rotational_positions(d: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """nnz = ⌊rate · d²⌋ (at least 1 when rate > 0) distinct off-diagonal positions of a d × d matrix (2 × nnz)."""
    off_diagonal = d * (d - 1)
    nnz = min(int(d * d * rate), off_diagonal)
    nnz = max(nnz, 1) if rate > 0 and off_diagonal else nnz
    k = torch.randperm(off_diagonal, generator=generator, device="cpu")[:nnz]
    # The k-th off-diagonal position, row by row: row k // (d − 1), skipping the diagonal in that row.
    rows, cols = k // (d - 1), k % (d - 1)
    return torch.stack([rows, cols + (cols >= rows).long()])


class FRoDLinear(ReplacingMerge, nn.Module):
    """h = U (Λ + S) Vᵀ x + b, with W₀ = U Λ₀ Vᵀ in the shared basis V; λ and S's few entries are trained."""

    def __init__(self, base: nn.Linear, V: torch.Tensor, positions: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"FRoD adapts nn.Linear layers, got {type(base).__name__}")
        d_in, dtype = base.in_features, base.weight.dtype
        if V.shape != (d_in, d_in):
            raise ValueError(f"FRoD basis of shape {tuple(V.shape)} does not fit d_in = {d_in}")
        self.base = base
        V = V.to(base.weight.device, dtype)
        # W₀ = B Vᵀ with B = W₀ V⁻ᵀ (in fp64); B's column lengths are λ₀, its unit columns U.
        B = torch.linalg.solve(V.double(), base.weight.detach().double().T).T
        lengths = B.norm(dim=0)
        U = torch.where(lengths > 1e-12, B / lengths.clamp_min(1e-12), torch.zeros_like(B))
        self.register_buffer("V", V)
        self.register_buffer("U", U.to(dtype))
        self.register_buffer("positions", positions.long())
        self.lambda_ = nn.Parameter(lengths.to(dtype))
        self.s = nn.Parameter(torch.zeros(positions.shape[1], device=base.weight.device, dtype=dtype))
        self.merged = False

    def S(self) -> torch.Tensor:
        d = self.V.shape[0]
        return self.s.new_zeros(d, d).index_put(tuple(self.positions), self.s, accumulate=True)

    def weight(self) -> torch.Tensor:
        return self.U @ (torch.diag(self.lambda_) + self.S()) @ self.V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        dropped = self.dropout(x)
        z = dropped.to(self.V.dtype) @ self.V  # coordinates in the shared basis
        # (Λ + S) z: S is sparse; a dense S is clearer here and as exact (a kernel would gather).
        h = F.linear(z * self.lambda_ + z @ self.S().T, self.U, self.base.bias)
        if self.training and not isinstance(self.dropout, nn.Identity):
            # With dropout only the update sees the dropped input: W₀ x + b + (W − W₀) dropout(x).
            h = (
                h
                + F.linear(x.to(self.V.dtype), self.base.weight)
                - F.linear(dropped.to(self.V.dtype), self.base.weight)
            )
        return h.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.weight().to(self.base.weight.dtype)


def inject_frod(
    model: nn.Module,
    target_names: list[str],
    sparse_rate: float = 0.01,
    alpha: float = 1e-3,
    seed: int = 0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap the named nn.Linear layers with FRoDLinear: one joint basis and one set of rotational
    positions per role (`layer_role`), then freeze everything but λ and S."""
    targets = find_targets(model, target_names)
    roles: dict[str, list[str]] = {}
    for name in targets:
        roles.setdefault(layer_role(name), []).append(name)
    generator = torch.Generator().manual_seed(seed)
    for role in sorted(roles):
        names = roles[role]  # in model order; the basis does not depend on the order of the stack
        layers = [model.get_submodule(name) for name in names]
        V = joint_basis([layer.weight for layer in layers], alpha)
        positions = rotational_positions(V.shape[0], sparse_rate, generator)
        for name, layer in zip(names, layers):
            replace_module(model, name, FRoDLinear(layer, V, positions, dropout))
    freeze_all_but(model, FRoDLinear, ("lambda_", "s"))
    return targets


def merge_frod(model: nn.Module) -> None:
    set_merged(model, FRoDLinear, True)


def unmerge_frod(model: nn.Module) -> None:
    set_merged(model, FRoDLinear, False)


def demo() -> None:
    """FRoD on the toy task, with 1% and 5% rotational degrees; the update is of full rank."""
    x, y = toy_task()
    for rate in (0.01, 0.05):
        model = toy_model()
        inject_frod(model, ["0", "2", "4"], sparse_rate=rate)
        before, after = train(model, x, y, lr=0.1)
        report(f"frod ({rate:.0%} rotational degrees) on 3 layers", model, before, after)
        report_merge(model, x, merge_frod)
        layer = model[0]
        with torch.no_grad():
            W0 = layer.W0 if layer.merged else layer.base.weight
            rank = torch.linalg.matrix_rank(layer.weight() - W0).item()
        print(f"  rank of the first layer's update: {rank} of {layer.V.shape[0]}")


if __name__ == "__main__":
    demo()
