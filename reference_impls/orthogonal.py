"""Orthogonal fine-tuning: OFT (with COFT and OFTv2's options), BOFT and HRA rotate the frozen weight.

Instead of adding ΔW, these methods multiply the frozen weight by a learned orthogonal matrix R on
its input side, `h = W₀ R x + b`. An orthogonal R keeps the angles between the weight's neurons
(their "hyperspherical energy"), which the OFT paper argues preserves what pre-training learned.
R starts at the identity, so the adapted model starts as the base model; R folds into the weight
(`W ← W₀ R`), so merging is free at inference.

**OFT.** Qiu, Liu, et al. "Controlling Text-to-Image Diffusion by Orthogonal Finetuning."
NeurIPS 2023. arXiv:2306.07280. R is block-diagonal with r blocks of size b = d_in / r, each the
Cayley transform of a skew-symmetric Q (only its b(b−1)/2 upper entries are trained):

    R = diag(R₁, …, R_r),        Rᵢ = (I + Qᵢ)(I − Qᵢ)⁻¹,        Qᵢ = −Qᵢᵀ

Parameters: r · b(b−1)/2 (b(b−1)/2 with `block_share`, one block for all). Q = 0 gives R = I.
*COFT* (constrained OFT) keeps every block near the identity: after each step Qᵢ is projected back
onto ‖Qᵢ‖_{F} ≤ ε/√r. OFTv2 (Qiu, Liu, Weller, Schölkopf. "Orthogonal Finetuning Made Scalable."
EMNLP 2025. arXiv:2506.19847) adds two options for speed: *input-centric* multiplication (rotate
x, then apply W₀: matrix–vector products, never the full matrix product W₀ R) and the
*Cayley–Neumann* series, which replaces the inverse by k terms of a Neumann series (the form PEFT
uses since 0.18):

    Rᵢ ≈ I + 2 Qᵢ + 2 Qᵢ² + … + 2 Q_i^{k−2} + Q_i^{k−1}

**BOFT.** Liu, Qiu, Feng, et al. "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization." ICLR 2024. arXiv:2311.06243. A block-diagonal R only mixes features within a
block; a product of m block-diagonal factors, each seen through a butterfly permutation Pⱼ,
mixes across blocks as the FFT does:

    R = B₁ B₂ ⋯ B_m,        Bⱼ = Pⱼ diag(R_{j,1}, …, R_{j,n}) Pⱼᵀ,        h = s ⊙ (W₀ R x) + b

with n = d_in / b blocks per factor (Cayley blocks as in OFT), P₁ = I, and Pⱼ interleaving the
halves of neighbouring blocks at the scale 2^{j−1} (`butterfly_permutation`); s ∈ ℝ^{d_out} is a
learned output scale starting at 1. Parameters: m · n · b(b−1)/2 + d_out. With m = 1 BOFT is OFT
plus the scale. In training, `block_dropout` p turns ⌊p·n⌋ random blocks of one random factor
into I (PEFT's multiplicative dropout).

**HRA.** Yuan, Liu, Xu. "Bridging the Gap between Low-rank and Orthogonal Adaptation via
Householder Reflection Adaptation." NeurIPS 2024. arXiv:2405.17484. R is a chain of r Householder
reflections, each defined by one vector uᵢ ∈ ℝ^{d_in}:

    H = H₁ H₂ ⋯ H_r,        Hᵢ = I − 2 ûᵢ ûᵢᵀ,        ûᵢ = uᵢ / ‖uᵢ‖

W₀ H − W₀ is of rank at most r, the bridge to LoRA the title names. Parameters: r · d_in. The
vectors start in equal pairs, so each reflection undoes its neighbour and H = I (r must be even
for that; an odd r starts random, as in PEFT). The paper adds a regulariser pulling the reflection
planes apart, λ ‖I − ÛᵀÛ‖²_F (`orthogonality_penalty`); with `gram_schmidt` the vectors are instead
orthonormalised, U = GS(u₁, …, u_r), and H = I − 2 U Uᵀ, which is never I: that variant starts from
random vectors (PEFT starts it from the pairs, which Gram–Schmidt turns into rounding noise).

**PEFT's conventions.** PEFT 0.21 (`oft`, `boft`, `hra`) multiplies the input as a row vector,
xᵀ R′, with blocks R′ = (I − Q)(I + Q)⁻¹; R′ᵀ is our R, so the same Q gives the same model. Its
Cayley–Neumann path, though, sums the series of (I + Q)(I − Q)⁻¹ for R′, so that the model then
rotates by our Rᵀ: with the same saved Q, turning `use_cayley_neumann` on or off in PEFT rotates
the other way. We follow the paper (both options approximate the same R), and
`reference_impls.interop` negates Q when it loads a Neumann checkpoint (Rᵀ is R with −Q). PEFT's
OFT on a convolution rotates overlapping input patches and sums them back (fold), which is not the
identity at initialisation: we adapt Linear layers only. PEFT's OFT also builds a block dropout for
`module_dropout` but never applies it, so an OFT checkpoint trains the same with or without it;
ours has none.
"""

import torch
from torch import nn

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

IMPLEMENTS = ("oft", "oftv2", "boft", "hra")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


# Cayley blocks ---------------------------------------------------------------------------------


def skew_symmetric(upper: torch.Tensor, b: int) -> torch.Tensor:
    """(n, b(b−1)/2) upper-triangle entries → n skew-symmetric b×b matrices Q = U − Uᵀ."""
    rows, cols = torch.triu_indices(b, b, 1, device=upper.device)
    U = upper.new_zeros(upper.shape[0], b, b)
    U[:, rows, cols] = upper
    return U - U.transpose(1, 2)


def cayley(Q: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """(I + Q)(I − Q)⁻¹ for a batch of skew-symmetric Q (orthogonal), or its k-term Neumann series."""
    identity = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype).expand_as(Q)
    if neumann_terms == 0:  # X (I − Q) = I + Q; half precision is solved in fp32 (no such solver on the CPU)
        wide = torch.float32 if Q.dtype in (torch.float16, torch.bfloat16) else Q.dtype
        return torch.linalg.solve((identity - Q).to(wide), (identity + Q).to(wide), left=False).to(Q.dtype)
    R, power = identity.clone(), identity
    for k in range(1, neumann_terms):
        power = power @ Q
        R = R + (1 if k == neumann_terms - 1 else 2) * power
    return R


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks.unbind(0))


class RotatedLinear(ReplacingMerge, nn.Module):
    """A frozen nn.Linear computing h = W₀ R x + b for the method's `rotation()` R (d_in × d_in).
    Merging writes W₀ R into the weight and keeps W₀ to unmerge exactly (R may be approximate)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"orthogonal fine-tuning adapts nn.Linear layers here, got {type(base).__name__}")
        self.base, self.d_in, self.d_out = base, base.in_features, base.out_features
        self.factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.merged = False

    def rotation(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        R = self.rotation()
        return (self.base.weight.to(R.dtype) @ R).to(self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        weight = self.merged_weight()
        return nn.functional.linear(x.to(weight.dtype), weight, self.base.bias).to(x.dtype)


# OFT -------------------------------------------------------------------------------------------


class OFTLinear(RotatedLinear):
    """h = W₀ R x + b, R block-diagonal with r Cayley blocks (or blocks of `block_size`; one shared
    block with block_share)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        block_size: int = 0,
        block_share: bool = False,
        coft: bool = False,
        eps: float = 6e-5,
        input_centric: bool = True,
        neumann_terms: int = 0,
    ):
        super().__init__(base)
        if block_size:  # the block size given instead of the number of blocks, as PEFT allows
            r = self.d_in // block_size if self.d_in % block_size == 0 else 0
        if r <= 0 or self.d_in % r:
            raise ValueError(f"OFT needs r blocks (or a block size) dividing d_in = {self.d_in}, got {r or block_size}")
        self.r, self.b = r, self.d_in // r
        self.block_share, self.coft, self.eps = block_share, coft, eps
        self.input_centric, self.neumann_terms = input_centric, neumann_terms
        self.Q = nn.Parameter(torch.zeros(1 if block_share else r, self.b * (self.b - 1) // 2, **self.factory))

    @torch.no_grad()
    def project(self) -> None:
        """COFT: pull every block's Q back into the ball ‖Qᵢ‖_F ≤ ε/√(blocks) (a projected step)."""
        Q = skew_symmetric(self.Q, self.b)
        radius = self.eps / self.Q.shape[0] ** 0.5
        norms = Q.flatten(1).norm(dim=1)
        scale = torch.where(norms > radius, radius / norms.clamp_min(1e-30), torch.ones_like(norms))
        self.Q.mul_(scale[:, None])

    def blocks(self) -> torch.Tensor:
        """The r blocks Rᵢ (r × b × b)."""
        if self.coft:
            self.project()
        blocks = cayley(skew_symmetric(self.Q, self.b), self.neumann_terms)
        return blocks.expand(self.r, -1, -1) if self.block_share else blocks

    def rotation(self) -> torch.Tensor:
        return block_diagonal(self.blocks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.input_centric:
            return super().forward(x)
        blocks = self.blocks()
        # R x block by block: (…, r, b) with Rᵢ applied to the i-th slice; W₀ then sees the rotated input.
        rotated = torch.einsum("rij,...rj->...ri", blocks, x.to(blocks.dtype).unflatten(-1, (self.r, self.b)))
        return self.base(rotated.flatten(-2).to(x.dtype))


# BOFT ------------------------------------------------------------------------------------------


def butterfly_permutation(d: int, group: int, half: int) -> torch.Tensor:
    """Indices of the permutation P: within each run of `group` features, take the chunks of
    `half` features in the order 0, 2, 4, …, 1, 3, 5, … (identity when a run holds two chunks)."""
    chunks = torch.arange(group // half)
    order = torch.cat([chunks[0::2], chunks[1::2]])
    within = (order[:, None] * half + torch.arange(half)).flatten()
    return (torch.arange(0, d, group)[:, None] + within).flatten()


class BOFTLinear(RotatedLinear):
    """h = s ⊙ (W₀ B₁ ⋯ B_m x) + b: m butterfly factors of n Cayley blocks of size b, and a scale s."""

    def __init__(self, base: nn.Linear, block_size: int = 8, factors: int = 1, block_dropout: float = 0.0):
        super().__init__(base)
        self.block_dropout = block_dropout
        b, m = block_size, factors
        n = self.d_in // b if b > 0 else 0
        if b <= 0 or self.d_in % b:
            raise ValueError(f"BOFT block size must divide d_in = {self.d_in}, got {b}")
        if m < 1 or (m > 1 and (b % 2 or n % 2 ** (m - 1) or n % 2)):
            raise ValueError(f"BOFT with {m} factors needs an even block size and 2^{m - 1} | {n} blocks")
        self.b, self.n, self.m = b, n, m
        self.Q = nn.Parameter(torch.zeros(m, n, b * (b - 1) // 2, **self.factory))
        self.s = nn.Parameter(torch.ones(self.d_out, **self.factory))
        # Factor j (from 1) interleaves half-blocks across runs of 2^{j−1} blocks: a permutation, kept as indices.
        permutations = [butterfly_permutation(self.d_in, b * 2 ** (j - 1), b // 2) for j in range(1, m + 1)]
        self.register_buffer("P", torch.stack(permutations) if m > 1 else torch.arange(self.d_in)[None], False)

    def rotation(self) -> torch.Tensor:
        R = torch.eye(self.d_in, device=self.Q.device, dtype=self.Q.dtype)
        dropped = None
        if self.training and self.block_dropout > 0:  # ⌊p·n⌋ random blocks of one random factor become I
            factor = torch.randint(0, self.m, (1,)).item()
            dropped = factor, torch.randperm(self.n) < int(self.block_dropout * self.n)
        for j in range(self.m):
            blocks = cayley(skew_symmetric(self.Q[j], self.b))
            if dropped is not None and dropped[0] == j:
                eye = torch.eye(self.b, device=blocks.device, dtype=blocks.dtype)
                blocks = torch.where(dropped[1].to(blocks.device)[:, None, None], eye, blocks)
            D = block_diagonal(blocks)
            p = self.P[j]
            R = R @ D[p][:, p]  # P D Pᵀ, P the permutation matrix with P[a, p_a] = 1
        return R

    def merged_weight(self) -> torch.Tensor:
        R = self.rotation()
        return (self.s[:, None] * (self.base.weight.to(R.dtype) @ R)).to(self.base.weight.dtype)


# HRA -------------------------------------------------------------------------------------------


class HRALinear(RotatedLinear):
    """h = W₀ H x + b, H = H₁ ⋯ H_r a chain of Householder reflections (or I − 2UUᵀ after Gram–Schmidt)."""

    def __init__(self, base: nn.Linear, r: int = 8, gram_schmidt: bool = False):
        super().__init__(base)
        if r <= 0:
            raise ValueError(f"HRA needs r ≥ 1 reflections, got {r}")
        self.r, self.gram_schmidt = r, gram_schmidt
        paired = r % 2 == 0 and not gram_schmidt
        u = torch.empty(self.d_in, r // 2 if paired else r, **self.factory)
        nn.init.kaiming_uniform_(u, a=5**0.5)
        self.u = nn.Parameter(u.repeat_interleave(2, dim=1) if paired else u)  # u₁ = u₂, u₃ = u₄, …

    def unit_vectors(self) -> torch.Tensor:
        if not self.gram_schmidt:
            return self.u / self.u.norm(dim=0)
        columns = []
        for u in self.u.unbind(1):
            for q in columns:
                u = u - (q @ u) * q
            columns.append(u / u.norm())
        return torch.stack(columns, 1)

    def rotation(self) -> torch.Tensor:
        U = self.unit_vectors()
        H = torch.eye(self.d_in, device=U.device, dtype=U.dtype)
        if self.gram_schmidt:
            return H - 2 * U @ U.T
        for u in U.unbind(1):
            H = H - 2 * torch.outer(H @ u, u)  # H ← H (I − 2uuᵀ)
        return H


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """HRA's regulariser: Σ over layers of ‖I − ÛᵀÛ‖²_F (add λ times it to the loss)."""
    terms = [
        (torch.eye(layer.r, device=layer.u.device) - (U := layer.u / layer.u.norm(dim=0)).T @ U).pow(2).sum()
        for layer in model.modules()
        if isinstance(layer, HRALinear)
    ]
    return torch.stack(terms).sum()


# Injection, merge, demo ------------------------------------------------------------------------

LAYERS = {"oft": OFTLinear, "boft": BOFTLinear, "hra": HRALinear}
TRAINED = {OFTLinear: ("Q",), BOFTLinear: ("Q", "s"), HRALinear: ("u",)}


def inject_orthogonal(model: nn.Module, target_names: list[str], method: str = "oft", **options) -> list[str]:
    """Wrap the named nn.Linear layers with the method's layer ("oft", "boft" or "hra"; options
    go to its constructor) and freeze everything but the rotations' parameters."""
    layer_type = LAYERS[method]
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, layer_type(model.get_submodule(name), **options))
    freeze_all_but(model, layer_type, TRAINED[layer_type])
    return targets


def merge_orthogonal(model: nn.Module) -> None:
    set_merged(model, RotatedLinear, True)


def unmerge_orthogonal(model: nn.Module) -> None:
    set_merged(model, RotatedLinear, False)


def demo() -> None:
    """OFT, BOFT and HRA learning a rotated copy of the toy model (the toy task's additive shift is
    far from any rotation), and HRA again with its orthogonality regulariser."""
    x, _ = toy_task()
    teacher = toy_model()
    inject_orthogonal(teacher, ["0", "2", "4"], "oft", r=4)
    with torch.no_grad():
        for layer in teacher.modules():
            if isinstance(layer, OFTLinear):
                layer.Q.normal_(0, 0.2)
        y_rotated = teacher(x)
    for method, options in [("oft", {"r": 4}), ("boft", {"block_size": 4, "factors": 2}), ("hra", {"r": 8})]:
        model = toy_model()
        inject_orthogonal(model, ["0", "2", "4"], method, **options)
        before, after = train(model, x, y_rotated, lr=1e-2)
        report(f"{method} on 3 layers", model, before, after)
        report_merge(model, x, merge_orthogonal)

    model = toy_model()
    inject_orthogonal(model, ["0", "2", "4"], "hra", r=8)
    penalty_before = orthogonality_penalty(model).item()
    before, after = train(model, x, y_rotated, lr=1e-2, penalty=lambda m: 1e-2 * orthogonality_penalty(m))
    report("hra + 0.01·‖I − ÛᵀÛ‖²_F", model, before, after)
    print(f"  orthogonality penalty {penalty_before:.3f} -> {orthogonality_penalty(model).item():.3f}")


if __name__ == "__main__":
    demo()
