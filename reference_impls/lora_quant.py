"""LoRA for quantised models: LoftQ (the quantised base and the adapter's start chosen together, so
that Q + BA is closer to W than Q alone) and QA-LoRA (the update pooled over the quantisation groups
of the input, so that it merges into the groups' offsets and the merged model stays quantised).

**LoftQ.** Li, Yu, Liang, et al. "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language
Models." ICLR 2024. arXiv:2310.08659. QLoRA quantises W and starts LoRA at BA = 0, so fine-tuning
begins from the quantisation error W − Q. LoftQ alternates T times between quantising what the
adapter does not cover and fitting the adapter to what the quantisation lost:

    Q_t = q(W − B_{t−1} A_{t−1}),        B_t A_t = SVD_r(W − Q_t),        B₀ A₀ = 0

with q NF4 (blocks of 64, fp32 block maxima, as bitsandbytes' 4-bit) or 8-bit (row-wise absmax,
LLM.int8's), and SVD_r the rank-r truncation split as B = U_r S_r^½, A = S_r^½ V_rᵀ. The model
starts at Q + BA ≈ W; the base is Q (stored dequantised here; quantising it again gives Q back).
Trained parameters: LoRA's, r (d_in + d_out) per layer.

The paper writes the start as Q + BA, with no LoRA scale. PEFT 0.21 (`init_lora_weights="loftq"`,
`LoftQConfig`) sets B = U_r S_r^½ whatever α is, so its model starts at Q + s·BA, which is the
paper's only for α = r; the reference divides B by s so that any α starts at the paper's Q + BA
(with α = r the two are equal, tested against PEFT's `loftq_init` run on the CPU; other α differ
by exactly that factor on B). Loading a LoftQ checkpoint, PEFT runs the initialisation again on the
original weight to rebuild Q; `reference_impls.interop` does the same.

**QA-LoRA.** Xu, et al. "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models."
2023. arXiv:2309.14717. A group-wise quantised weight has, per output row o and group
g of `group_size` consecutive inputs, a scale and an offset: W̃_{o,j} = α_{o,g} q_{o,j} + β_{o,g}. A
LoRA update BA has a different value at every (o, j), so merging it breaks the quantisation; QA-LoRA
makes the update constant within each group by pooling the input per group before A ∈ ℝ^{r×L}
(L = d_in / group_size groups):

    h = W̃ x + b + s · B A (L · x̄),        x̄_g = mean of x over group g

so ΔW_{o,j} = s · (L / group_size) · (BA)_{o,g(j)} is one number per (o, g), and merging only moves the
offsets, β ← β + ΔW_{o,g}, leaving the 4-bit codes and scales as they were. The factor L on the
means is PEFT's choice (its GPTQ variant); any constant there is absorbed by A's learning (a sum
over each group would be the means times the group size). The reference follows PEFT, whose forward
it equals (tested). Trained parameters: r (d_in / group_size + d_out) per layer.
"""

import torch
from torch import nn

from reference_impls._plumbing import (
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
from reference_impls.kernels.nf4 import round_trip_nf4
from reference_impls.lora import LoRALinear, inject_lora, merge_lora

FAMILY = "Low-rank updates"

IMPLEMENTS = ("loftq", "qa-lora")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


# ---- LoftQ --------------------------------------------------------------------------------------


def round_trip_int8(weight: torch.Tensor) -> torch.Tensor:
    """The values LLM.int8 stores for `weight`: per row, round(w · 127 / max|w|) · max|w| / 127
    (computed from the fp16 weight, as bitsandbytes' Int8Params does), in fp32."""
    half = weight.half()
    row_max = half.abs().amax(dim=1).float()
    codes = torch.round(half * (127.0 / row_max[:, None]))
    return codes * row_max[:, None] * (1 / 127)


QUANTISERS = {4: round_trip_nf4, 8: round_trip_int8}


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, bits: int = 4, iterations: int = 1):
    """(Q, B, A) after `iterations` rounds of LoftQ's alternation, in fp32: Q the quantised base,
    Q + BA ≈ W."""
    if bits not in QUANTISERS or iterations < 1:
        raise ValueError(f"LoftQ takes bits 4 (NF4) or 8 (int8) and at least one iteration, got {bits}, {iterations}")
    W = weight.float()
    covered = torch.zeros_like(W)  # B A, 0 before the first round
    for _ in range(iterations):
        Q = QUANTISERS[bits](W - covered)
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        root = S[:r].sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        covered = B @ A
    return Q, B, A


@torch.no_grad()
def loftq_init(layer: LoRALinear, bits: int = 4, iterations: int = 1, scaled: bool = True) -> None:
    """The layer's base becomes Q and its factors B, A start where LoftQ puts them; `scaled` divides
    B by s so that the model starts at Q + BA (the paper); scaled=False is PEFT's (Q + s·BA)."""
    Q, B, A = loftq(layer.base.weight, layer.r, bits, iterations)
    dtype = layer.base.weight.dtype
    layer.base.weight.copy_(Q.to(dtype))
    layer.A.copy_(A.to(dtype))
    layer.B.copy_((B / layer.scale if scaled else B).to(dtype))


def inject_loftq(
    model: nn.Module, target_names: list[str], bits: int = 4, iterations: int = 1, scaled: bool = True, **lora_options
) -> list[str]:
    """LoRA (options as `lora.inject_lora`) on the named layers, each base weight replaced by its LoftQ
    quantisation Q and the factors started so that the model computes Q + BA ≈ W (scaled=False: PEFT's
    Q + s·BA)."""
    targets = inject_lora(model, target_names, **lora_options)
    for name in targets:
        loftq_init(model.get_submodule(name), bits, iterations, scaled)
    return targets


# ---- QA-LoRA ------------------------------------------------------------------------------------


@torch.no_grad()
def quantise_groupwise(weight: torch.Tensor, group_size: int, bits: int = 4):
    """Asymmetric min-max quantisation per row and group of `group_size` inputs: (codes, scales,
    offsets) with W̃ = scale · code + offset, codes in 0 … 2^bits − 1 (int8), scales and offsets
    (d_out × L) in fp32."""
    d_out, d_in = weight.shape
    if d_in % group_size:
        raise ValueError(f"group_size {group_size} must divide the layer's {d_in} inputs")
    groups = weight.float().reshape(d_out, d_in // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 2**bits - 1)
    return codes.to(torch.uint8).reshape(d_out, d_in), scales, low


class QALoRALinear(nn.Module):
    """A group-wise quantised frozen linear layer plus s·B A over the group-pooled input; merging
    moves only the groups' offsets."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, group_size: int = 16, bits: int = 4):
        super().__init__()
        d_out, d_in = base.weight.shape
        codes, scales, offsets = quantise_groupwise(base.weight, group_size, bits)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("original_offsets", offsets.clone())  # for an exact unmerge
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.group_size, self.groups = group_size, d_in // group_size
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        dtype = base.weight.dtype
        self.A = nn.Parameter(torch.empty(r, self.groups, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)  # as LoRA's A (an nn.Linear's init)
        self.B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype))
        self.merged = False

    def weight(self) -> torch.Tensor:
        """The dequantised weight W̃, in the adapter's dtype."""
        expand = lambda t: t.repeat_interleave(self.group_size, dim=1)  # noqa: E731 (one value per group → per input)
        return (expand(self.scales) * self.codes.float() + expand(self.offsets)).to(self.A.dtype)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """L · (the mean of each group of inputs)."""
        return x.unflatten(-1, (self.groups, self.group_size)).mean(-1) * self.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.merged:
            return h
        update = (self.pooled(x.to(self.A.dtype)) @ self.A.T) @ self.B.T
        return h + (self.scale * update).to(h.dtype)

    def group_delta(self) -> torch.Tensor:
        """ΔW per (row, group): s · (L / group_size) · B A."""
        return self.scale * self.groups / self.group_size * (self.B.float() @ self.A.float())

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.offsets += self.group_delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.offsets.copy_(self.original_offsets)
            self.merged = False


def inject_qalora(
    model: nn.Module, target_names: list[str], r: int = 8, alpha: float = 16.0, group_size: int = 16, bits: int = 4
) -> list[str]:
    """Quantise the named layers group-wise and add QA-LoRA to each; only A and B train."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, QALoRALinear(model.get_submodule(name), r, alpha, group_size, bits))
    freeze_all_but(model, QALoRALinear, ("A", "B"))
    return targets


def merge_qalora(model: nn.Module) -> None:
    set_merged(model, QALoRALinear, True)


def unmerge_qalora(model: nn.Module) -> None:
    set_merged(model, QALoRALinear, False)


def demo() -> None:
    """LoftQ's error against NF4 alone, then QLoRA-style LoRA on an NF4 base, LoftQ, and QA-LoRA."""
    model = toy_model()
    W = model[0].weight.detach()
    nf4_error = (W - round_trip_nf4(W)).norm() / W.norm()
    for iterations in (1, 5):
        Q, B, A = loftq(W, r=8, iterations=iterations)
        error = (W - Q - B @ A).norm() / W.norm()
        print(f"LoftQ r = 8, {iterations} round(s): ‖W − Q − BA‖ / ‖W‖ = {error:.4f} (NF4 alone: {nf4_error:.4f})")
    x, y = toy_task()
    for name in ("nf4 + lora", "loftq"):
        model = toy_model()
        if name == "loftq":
            inject_loftq(model, ["0", "2", "4"], r=8, alpha=16, iterations=5)
        else:
            inject_lora(model, ["0", "2", "4"], r=8, alpha=16)
            for layer in model.modules():
                if isinstance(layer, LoRALinear):
                    with torch.no_grad():
                        layer.base.weight.copy_(round_trip_nf4(layer.base.weight))
        before, after = train(model, x, y, lr=1e-2)
        report(f"{name} (r = 8) on 3 layers", model, before, after)
        report_merge(model, x, merge_lora)
    model = toy_model()
    inject_qalora(model, ["0", "2", "4"], r=8, alpha=16, group_size=2)
    layers = [layer for layer in model.modules() if isinstance(layer, QALoRALinear)]
    before, after = train(model, x, y, lr=1e-2)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"qa-lora (r = 8, 4-bit groups of 2) on 3 layers: {trained:,} trained parameters over a base of")
    print(f"{sum(layer.codes.numel() for layer in layers):,} 4-bit codes (each group of 2 with a scale and an offset)")
    print(f"loss on the new task: {before:.4g} before, {after:.4g} after training")
    codes = [layer.codes.clone() for layer in layers]
    report_merge(model, x, merge_qalora)
    unchanged = all(torch.equal(before, layer.codes) for before, layer in zip(codes, layers))
    print(f"  after merging, the 4-bit codes are unchanged: {unchanged} (only the offsets moved)")


if __name__ == "__main__":
    demo()
