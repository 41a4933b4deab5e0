"""Gated combinations of PEFT modules: UniPELT's learned gates over LoRA, prefix tuning and an
adapter, and VL-PET's granularity-controlled gates over adapters.

UniPELT: Mao, Mathias, Hou, Almahairi, Ma, Han, Yih, Khabsa. "UniPELT: A Unified Framework for
Parameter-Efficient Language Model Tuning." ACL 2022. arXiv:2110.07577. Three methods at once in
every layer of an encoder, each behind a gate computed from what its place reads, so that training
learns which to use where:

    G(x) = mean over tokens of σ(W_G x + b_G)             one number per example and gate

    LoRA on the query and value projections:   h = W₀ x + b + G_L(x) · B A x
    prefix tuning in self-attention:           keys [G_P(x)·P_K; K], values [G_P(x)·P_V; V]
    Pfeiffer's adapter after the FFN:          LN(y + G_A(u) · A(u) + r),   u = LN(y + r)

with x the sublayer's input, y the FFN's output and r its residual. The gates start near 1/2
(W_G ~ N(0, 0.02²), b_G = 0). Trainable parameters per layer of width d (LoRA rank r, adapter m):
2·(2·d·r + d + 1) + (d + 1) + (2·d·m + d + m + d + 1), plus the prefixes' (prompts.py: n·d + d·k + k
+ k·2·L·d + 2·L·d through the reparameterisation MLP of width k). As AdapterHub's UniPELTConfig (the
oracle in the tests), a gated LoRA update is not also scaled by α/r and the prefix gate is one number
for keys and values; the defaults are AdapterHub's: r = 8, n = 10, k = 512, m = d/16 (ReLU).

VL-PET: Hu, Li, Lyu, Wang. "VL-PET: Vision-and-Language Parameter-Efficient Tuning via Granularity
Control." ICCV 2023. arXiv:2308.09804. An adapter modifies a sublayer's output h, u = h + A(h), and a
granularity-controlled matrix G rescales the result before the residual and the block's LayerNorm:

    out = LN(r + G ⊙ u),    r the sublayer's input

    large:     G = σ(W_u GELU(W_d r))          one value per token and feature (N × d; W_d: d → r_g)
    middle X:  G = σ(w · (r + u))              one value per token (N × 1)
    middle Y:  G = 1 + g                       one value per feature (1 × d), g ~ N(0, 0.02²)
    small:     G = mean_t σ(w · [r; u])        one value per example (1 × 1)

These are the paper's four instantiations VL-PET-large, -middleX, -middleY and -small, as the
authors' code computes them for the encoder's attention and FFN blocks (their adapter's multi-head
down-projection is, as a map, one d → m linear layer with its heads' rows stacked: here a plain
one). The encoder's LayerNorms are trained too. Trainable parameters per adapted block: the
adapter's 2·d·m + d + m, the LayerNorm's 2·d, and the gate's 2·d·r_g + r_g + d (large), d + 1
(middle X), d (middle Y) or 2·d + 1 (small). The authors' decoders keep a plain parallel adapter on
the cross-attention's value projection, without a gate (bottleneck.py's parallel placement); the
encoders' modules are what this file implements. As the gates do not start at one, neither method
computes exactly the frozen model at the start.
"""

import torch
from torch import nn

from reference_impls._plumbing import (
    count_parameters,
    find_targets,
    replace_module,
    tiny_encoder,
    toy_sequence_task,
    train_classifier,
)
from reference_impls.bottleneck import Adapter, AddNormAdapter, is_add_norm_block
from reference_impls.prefixes import PrefixSelfAttention, inject_encoder_prefix

FAMILY = "Unified designs and search"

IMPLEMENTS = ("unipelt", "vl-pet")

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("adapters-library",)


# ---- UniPELT -------------------------------------------------------------------------------------


class Gate(nn.Module):
    """G(x) = mean over tokens of σ(W_G x + b_G), shaped (batch, 1, outputs) to scale a whole sequence."""

    def __init__(self, d: int, outputs: int = 1, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(d, outputs, device=device, dtype=dtype)
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x)).mean(dim=-2, keepdim=True)


class GatedLoRALinear(nn.Module):
    """h = W₀ x + b + G_L(x) · B A x: LoRA behind a gate, on a frozen nn.Linear."""

    def __init__(self, base: nn.Linear, r: int = 8):
        super().__init__()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base
        self.A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, **factory))  # B = 0: no change at the start
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        self.gate = Gate(base.in_features, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.gate(x) * ((x @ self.A.T) @ self.B.T)


class GatedPrefixSelfAttention(PrefixSelfAttention):
    """Prefix tuning in an encoder's self-attention, the prefix scaled by G_P of the layer's input."""

    def __init__(self, attention: nn.Module, prefixes, layer: int):
        super().__init__(attention, prefixes, layer)
        weight = attention.key.weight  # (query and value may already be gated LoRA layers)
        self.gate = Gate(weight.shape[1], device=weight.device, dtype=weight.dtype)

    def prefix_scale(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.gate(hidden_states).unsqueeze(1)  # (batch, 1, 1, 1): every head, position and feature


class GatedAdapter(nn.Module):
    """G_A(u) · A(u): a bottleneck adapter behind a gate computed from what it reads."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        weight = adapter.down.weight
        self.adapter, self.gate = adapter, Gate(weight.shape[1], device=weight.device, dtype=weight.dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.gate(u) * self.adapter(u)


def inject_unipelt(
    model: nn.Module, r: int = 8, n: int = 10, prefix_hidden: int | None = 512, m: int | None = None
) -> list[str]:
    """UniPELT in every layer of a BERT-style encoder (`model.encoder.layer[i]` with `attention.self`
    holding query/key/value and post-norm `output` blocks): gated LoRA on query and value, gated
    prefix tuning, a gated Pfeiffer adapter (width m, default d/16) after the FFN. Freezes all else;
    returns the names of the adapted modules."""
    layers = model.encoder.layer
    d = model.config.hidden_size
    m = m or max(1, d // 16)
    adapted = []
    for index, layer in enumerate(layers):
        attention = layer.attention.self
        for name in ("query", "value"):
            setattr(attention, name, GatedLoRALinear(getattr(attention, name), r))
            adapted.append(f"encoder.layer.{index}.attention.self.{name}")
        if not is_add_norm_block(layer.output):
            raise ValueError(f"encoder.layer.{index}.output is not a post-norm Add & Norm block")
        weight = layer.output.dense.weight
        adapter = Adapter(d, m, "relu", device=weight.device, dtype=weight.dtype)
        layer.output = AddNormAdapter(layer.output, GatedAdapter(adapter), "after_norm")
        adapted.append(f"encoder.layer.{index}.output")
    inject_encoder_prefix(model, n=n, hidden=prefix_hidden, attention_type=GatedPrefixSelfAttention)  # freezes all
    for module in model.modules():
        if isinstance(module, GatedLoRALinear):
            for part in (module.A, module.B, module.gate):
                part.requires_grad_(True)
        elif isinstance(module, GatedPrefixSelfAttention):
            module.gate.requires_grad_(True)
        elif isinstance(module, GatedAdapter):
            module.requires_grad_(True)
    model.prefixes.requires_grad_(True)
    return adapted + [f"encoder.layer.{index}.attention.self" for index in range(len(layers))]


def unipelt_parameters(d: int, layers: int, r: int = 8, n: int = 10, k: int = 512, m: int | None = None) -> int:
    """The trainable-parameter formula of the module docstring."""
    m = m or max(1, d // 16)
    per_layer = 2 * (2 * d * r + d + 1) + (d + 1) + (2 * d * m + d + m + d + 1)
    return layers * per_layer + n * d + d * k + k + k * 2 * layers * d + 2 * layers * d


# ---- VL-PET ---------------------------------------------------------------------------------------

GRANULARITIES = ("large", "middle_x", "middle_y", "small")


class GranularityGate(nn.Module):
    """G(r, u) at one of the four granularities; r the block's input, u = h + A(h)."""

    def __init__(self, d: int, granularity: str, rank: int = 96, device=None, dtype=None):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity is one of {', '.join(GRANULARITIES)}, not {granularity!r}")
        factory = {"device": device, "dtype": dtype}
        self.granularity = granularity
        if granularity == "large":  # σ(W_u GELU(W_d r)): N × d
            self.down, self.up = nn.Linear(d, rank, **factory), nn.Linear(rank, d, **factory)
        elif granularity == "middle_x":  # σ(w · (r + u)): N × 1
            self.score = nn.Linear(d, 1, **factory)
        elif granularity == "middle_y":  # 1 + g: 1 × d
            self.g = nn.Parameter(torch.empty(d, **factory).normal_(0, 0.02))
        else:  # small, mean_t σ(w · [r; u]): 1 × 1
            self.score = nn.Linear(2 * d, 1, **factory)

    def forward(self, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.granularity == "large":
            return torch.sigmoid(self.up(nn.functional.gelu(self.down(r), approximate="tanh")))
        if self.granularity == "middle_x":
            return torch.sigmoid(self.score(r + u))
        if self.granularity == "middle_y":
            return 1 + self.g
        return torch.sigmoid(self.score(torch.cat([r, u], dim=-1))).mean(dim=-2, keepdim=True)


class VLPETBlock(nn.Module):
    """A post-norm Add & Norm block (BERT's SelfOutput or Output) with VL-PET: LN(r + G ⊙ (h + A(h)))."""

    def __init__(self, block: nn.Module, adapter: Adapter, gate: GranularityGate):
        super().__init__()
        self.block, self.adapter, self.gate = block, adapter, gate

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = self.block.dense(hidden_states)
        u = h + self.adapter(h)
        return self.block.LayerNorm(self.block.dropout(self.gate(residual, u) * u) + residual)


def inject_vl_pet(
    model: nn.Module, target_names: list[str], m: int = 96, granularity: str = "large", gate_rank: int = 96
) -> list[str]:
    """VL-PET in each named post-norm Add & Norm block (the encoder's attention and FFN output
    blocks); trains the adapters, gates and those blocks' LayerNorms, freezes all else."""
    targets = find_targets(model, target_names, kind=nn.Module)
    for name in targets:
        block = model.get_submodule(name)
        if not is_add_norm_block(block):
            raise ValueError(f"{name}: VL-PET goes into a post-norm Add & Norm block, not a {type(block).__name__}")
        d, weight = block.dense.out_features, block.dense.weight
        adapter = Adapter(d, m, "gelu_tanh", device=weight.device, dtype=weight.dtype)
        gate = GranularityGate(d, granularity, gate_rank, device=weight.device, dtype=weight.dtype)
        replace_module(model, name, VLPETBlock(block, adapter, gate))
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, VLPETBlock):
            for part in (module.adapter, module.gate, module.block.LayerNorm):
                part.requires_grad_(True)
    return targets


def vl_pet_parameters(d: int, m: int, granularity: str, gate_rank: int = 96) -> int:
    """Trainable parameters per adapted block (adapter, LayerNorm, gate), as in the module docstring."""
    gate = {"large": 2 * d * gate_rank + gate_rank + d, "middle_x": d + 1, "middle_y": d, "small": 2 * d + 1}
    return 2 * d * m + d + m + 2 * d + gate[granularity]


# The paper's four instantiations, as arguments of inject_vl_pet (m = 96 for BART-base in the paper).
VL_PET_LARGE = dict(granularity="large", gate_rank=96)
VL_PET_MIDDLE_X = dict(granularity="middle_x")
VL_PET_MIDDLE_Y = dict(granularity="middle_y")
VL_PET_SMALL = dict(granularity="small")


# ---- the demo ----------------------------------------------------------------------------------------


def demo() -> None:
    """UniPELT and the four VL-PET instantiations on a frozen tiny BERT, each with a new linear head."""
    ids, labels = toy_sequence_task()
    targets = ["attention.output", "output"]  # every layer's attention and FFN Add & Norm blocks
    runs = [("UniPELT (r=8, n=10, m=2)", lambda model: inject_unipelt(model, r=8, n=10, prefix_hidden=64))]
    for name, config in (
        ("large", {**VL_PET_LARGE, "gate_rank": 8}),
        ("middleX", VL_PET_MIDDLE_X),
        ("middleY", VL_PET_MIDDLE_Y),
        ("small", VL_PET_SMALL),
    ):
        runs.append((f"VL-PET-{name} (m=8)", lambda model, config=config: inject_vl_pet(model, targets, m=8, **config)))
    for name, inject in runs:
        model = tiny_encoder()
        inject(model)
        before, after, _ = train_classifier(model, ids, labels)
        trainable, total = count_parameters(model)
        print(
            f"{name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%), plus the head"
        )
        print(f"loss on the new task: {before:.4g} before, {after:.4g} after training")


if __name__ == "__main__":
    demo()
