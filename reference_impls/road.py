"""RoAd: 2D rotations (and scalings) of pairs of output features, cheap enough to batch many adapters.

Liao, Monz. "3-in-1: 2D Rotary Adaptation for Efficient Finetuning, Efficient Batching and
Composability." NeurIPS 2024. arXiv:2409.00119.

A frozen layer's output z = W₀ x + b is split into groups of g features; within a group feature i
is paired with feature j = i + g/2, and every pair is turned by a learned 2 × 2 matrix:

    z′ᵢ = fᵢ zᵢ − sᵢ z_j,        z′_j = f_j z_j + s_j zᵢ

In the code `h = f ⊙ z + s ⊙ rotate_half(z)`, where `rotate_half` maps each pair (zᵢ, z_j) to
(−z_j, zᵢ). The three variants differ in how many numbers make f and s:

    RoAd₁:  fᵢ = f_j = α cos θ,   sᵢ = s_j = α sin θ        (one angle and scale per pair: a scaled rotation)
    RoAd₂:  fᵢ = αᵢ cos θᵢ,   sᵢ = αᵢ sin θᵢ        (one per feature)
    RoAd₄:  fᵢ = α_{1,i} cos θ_{1,i},   sᵢ = α_{2,i} sin θ_{2,i}        (two per feature)

Parameters per adapted layer: d_out (RoAd₁: d_out/2 angles and d_out/2 scales), 2 d_out (RoAd₂)
and 4 d_out (RoAd₄). θ = 0, α = 1 is the identity. The update is R (W₀ x + b) with R block-sparse,
so it merges into the weight and the bias (`W ← R W₀`, `b ← R b`).

**Batching.** f and s act elementwise on the output, so a batch whose rows use *different* adapters
costs one gather of f and s per row, where LoRA would need a separate B A x per adapter. A layer
holds `adapters` sets of (θ, α); `reference_impls._plumbing.setting(model, RoAdLinear,
"adapter_index", index)` picks the set of each row of the batch. The demo trains two adapters on
two tasks in one mixed batch, then serves them together. (PEFT calls this `adapter_names=` and
loops over the distinct adapters of the batch; the result is the same.)

Equal to PEFT 0.21 `road` (all three variants); `reference_impls.interop` loads its checkpoints.
"""

import torch
from torch import nn

from reference_impls._plumbing import (
    ReplacingMerge,
    count_parameters,
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    report_merge,
    set_merged,
    setting,
    toy_model,
    toy_task,
    train,
)

FAMILY = "Orthogonal and rotational updates"

IMPLEMENTS = ("road",)

# The frameworks that provide the method.
COVERED_BY = ("hf-peft",)

VARIANTS = {"road_1": 1, "road_2": 2, "road_4": 4}  # parameters per output feature


def rotate_half(z: torch.Tensor, g: int) -> torch.Tensor:
    """Within each group of g features, the pair (zᵢ, z_{i+g/2}) becomes (−z_{i+g/2}, zᵢ)."""
    first, second = z.unflatten(-1, (-1, 2, g // 2)).unbind(-2)
    return torch.stack((-second, first), dim=-2).flatten(-3)


class RoAdLinear(ReplacingMerge, nn.Module):
    """h = f ⊙ z + s ⊙ rotate_half(z), z = W₀ x + b; one (θ, α) set per adapter, chosen per row."""

    def __init__(self, base: nn.Linear, variant: str = "road_1", group_size: int = 64, adapters: int = 1):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"RoAd adapts nn.Linear layers, got {type(base).__name__}")
        if variant not in VARIANTS:
            raise ValueError(f"RoAd variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        d_out, g = base.out_features, group_size
        if g <= 0 or g % 2 or d_out % g:
            raise ValueError(f"RoAd group size must be even and divide d_out = {d_out}, got {g}")
        self.base, self.variant, self.g = base, variant, g
        # RoAd₁: one (θ, α) per pair; RoAd₂: per feature; RoAd₄: two per feature (cos and sin terms).
        shape = {"road_1": (d_out // 2,), "road_2": (d_out,), "road_4": (2, d_out)}[variant]
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.theta = nn.Parameter(torch.zeros(adapters, *shape, **factory))
        self.alpha = nn.Parameter(torch.ones(adapters, *shape, **factory))
        self.adapter_index: torch.Tensor | None = None  # the adapter of every row of the batch; None: adapter 0
        self.merged = False

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """f and s of every adapter (adapters × d_out)."""
        theta, alpha = self.theta, self.alpha
        if self.variant == "road_1":  # a pair's angle and scale serve both its features
            pairs = lambda t: t.unflatten(-1, (-1, 1, self.g // 2)).expand(-1, -1, 2, -1).flatten(-3)  # noqa: E731
            theta, alpha = pairs(theta), pairs(alpha)
        if self.variant == "road_4":
            return alpha[:, 0] * theta[:, 0].cos(), alpha[:, 1] * theta[:, 1].sin()
        return alpha * theta.cos(), alpha * theta.sin()

    def rotate(self, z: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        f, s = self.coefficients()
        if index is None:
            f, s = f[0], s[0]
        else:  # one row of f and s per batch row, broadcast over the sequence
            f, s = (c[index].reshape(len(index), *[1] * (z.dim() - 2), -1) for c in (f, s))
        return f * z + s * rotate_half(z, self.g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        if self.merged:
            return z
        return self.rotate(z.to(self.theta.dtype), self.adapter_index).to(z.dtype)

    # Merging: W ← R W₀ and b ← R b (R rotates the output axis), W₀ and b₀ kept; one adapter only.
    def merged_weight(self) -> torch.Tensor:
        return self.rotate(self.base.weight.T.to(self.theta.dtype)).T.to(self.base.weight.dtype)

    def merged_bias(self) -> torch.Tensor | None:
        if self.base.bias is None:
            return None
        return self.rotate(self.base.bias.to(self.theta.dtype)).to(self.base.bias.dtype)

    def merge(self) -> None:
        if self.theta.shape[0] != 1:
            raise ValueError("a RoAd layer with several adapters cannot merge: every row may use another one")
        super().merge()


def inject_road(model: nn.Module, target_names: list[str], **options) -> list[str]:
    """Wrap the named nn.Linear layers with RoAdLinear (options go to its constructor) and freeze
    everything but θ and α."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, RoAdLinear(model.get_submodule(name), **options))
    freeze_all_but(model, RoAdLinear, ("theta", "alpha"))
    return targets


def merge_road(model: nn.Module) -> None:
    set_merged(model, RoAdLinear, True)


def unmerge_road(model: nn.Module) -> None:
    set_merged(model, RoAdLinear, False)


def demo() -> None:
    """Each variant on a rotated copy of the toy model; then two RoAd₂ adapters trained on two tasks
    in one mixed batch, and served together."""
    x, _ = toy_task()
    teacher = toy_model()
    inject_road(teacher, ["0", "2", "4"], variant="road_4", group_size=8)
    with torch.no_grad():
        for layer in teacher.modules():
            if isinstance(layer, RoAdLinear):
                layer.theta.normal_(0, 0.3)
                layer.alpha.uniform_(0.8, 1.2)
        y_rotated = teacher(x)
    for variant in VARIANTS:
        model = toy_model()
        inject_road(model, ["0", "2", "4"], variant=variant, group_size=8)
        before, after = train(model, x, y_rotated, lr=1e-2)
        report(f"{variant} on 3 layers", model, before, after)
        report_merge(model, x, merge_road)

    # Two tasks, one batch: rows of task 0 use adapter 0, rows of task 1 adapter 1.
    y_other = 0.5 * y_rotated.roll(1, dims=-1)
    task = torch.arange(len(x)) % 2
    target = torch.where(task[:, None] == 0, y_rotated, y_other)
    model = toy_model()
    inject_road(model, ["0", "2", "4"], variant="road_2", group_size=8, adapters=2)
    with setting(model, RoAdLinear, "adapter_index", task):
        before, after = train(model, x, target, lr=1e-2)
        mixed = model(x)
    report("road_2, two adapters trained in one mixed batch", model, before, after)
    with torch.no_grad():
        one_by_one = torch.empty_like(mixed)
        for adapter in (0, 1):
            rows = task == adapter
            with setting(model, RoAdLinear, "adapter_index", task[rows]):
                one_by_one[rows] = model(x[rows])
    trainable, _ = count_parameters(model)
    print(
        f"  {trainable:,} parameters for both adapters; the mixed batch equals each adapter's own rows "
        f"to {(mixed - one_by_one).abs().max().item():.1e}"
    )


if __name__ == "__main__":
    demo()
