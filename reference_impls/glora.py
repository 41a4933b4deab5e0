"""GLoRA: one generalised update that scales and shifts the weight, the bias and (through W₀C) the input.

Chavan, Liu, Gupta, et al. "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning."
2023. arXiv:2306.07967.

GLoRA writes many PEFT methods as one layer with five trained "support tensors":

    W = W₀ + W₀ ⊙ A + B,        b′ = b + b ⊙ D + E + W₀ C,        h = W x + b′

A scales the weight (as (IA)³ scales activations), B shifts it (as LoRA does), C is a prompt-like
shift of the input seen through W₀, D and E scale and shift the bias. Each support is chosen per
layer as a low-rank product ("lora": A = A_d A_u of rank r), a vector ("vector": one number per
output, broadcast along the row, or per input for C), a scalar ("constant"), or absent ("none");
the paper searches these choices per layer by evolution, and PEFT (and this module) fixes one
choice for all layers. Every support starts at 0 (a low-rank one with A_d = 0), so the model starts
as the base model, and everything folds into W and b′. C, D and E need a layer with a bias.

Parameters per layer, for PEFT's default ("lora" A and B, "lora" C, "constant" D and E):
2 r (d_in + d_out) + r (d_in + 1) + 2.

Equal to PEFT 0.21 `glora`; `reference_impls.interop` loads its checkpoints.
"""

import math

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

FAMILY = "Unified designs and search"

IMPLEMENTS = ("glora",)

# The frameworks that provide the method.
COVERED_BY = ("hf-peft",)


class Support(nn.Module):
    """One support tensor of shape (rows × columns), as a rank-r product, a vector, a scalar or nothing."""

    def __init__(self, kind: str, rows: int, columns: int, r: int = 4, vector_shape: tuple[int, ...] | None = None):
        super().__init__()
        if kind not in ("lora", "vector", "constant", "none"):
            raise ValueError(f"a GLoRA support is 'lora', 'vector', 'constant' or 'none', got {kind!r}")
        self.kind = kind
        if kind == "lora":
            self.down = nn.Parameter(torch.zeros(rows, r))  # A_d, 0 at the start
            self.up = nn.Parameter(torch.empty(r, columns))  # A_u
            nn.init.kaiming_uniform_(self.up, a=math.sqrt(5))
        elif kind == "vector":
            self.value = nn.Parameter(torch.zeros(vector_shape or (rows, 1)))
        elif kind == "constant":
            self.value = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor | float:
        if self.kind == "lora":
            return self.down @ self.up
        if self.kind == "none":
            return 0.0
        return self.value if self.kind == "vector" else self.value[0]


class GLoRALinear(ReplacingMerge, nn.Module):
    """A frozen nn.Linear with W = W₀ + W₀ ⊙ A + B and b′ = b + b ⊙ D + E + W₀ C."""

    def __init__(
        self, base: nn.Linear, r: int = 4, weight_supports: str = "lora", prompt: str = "lora", bias_supports="constant"
    ):
        super().__init__()
        d_out, d_in = base.out_features, base.in_features
        has_bias = base.bias is not None
        self.base = base
        self.A = Support(weight_supports, d_out, d_in, r)
        self.B = Support(weight_supports, d_out, d_in, r)
        self.C = Support(prompt if has_bias else "none", d_in, 1, r)
        self.D = Support(bias_supports if has_bias else "none", d_out, 1, vector_shape=(d_out,))
        self.E = Support(bias_supports if has_bias else "none", d_out, 1, vector_shape=(d_out,))
        self.to(device=base.weight.device, dtype=base.weight.dtype)
        self.merged = False

    def merged_weight(self) -> torch.Tensor:
        W0 = self.base.weight
        return W0 + W0 * self.A() + self.B()

    def merged_bias(self) -> torch.Tensor | None:
        b, W0 = self.base.bias, self.base.weight
        if b is None:
            return None
        C = self.C()
        prompt = (W0 @ C).squeeze(-1) if isinstance(C, torch.Tensor) else 0.0
        return b + b * self.D() + self.E() + prompt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return F.linear(x, self.merged_weight(), self.merged_bias())


def inject_glora(model: nn.Module, target_names: list[str], r: int = 4, **supports) -> list[str]:
    """GLoRA on the named layers; `supports` chooses weight_supports (A, B), prompt (C) and
    bias_supports (D, E), one choice for every layer."""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, GLoRALinear(model.get_submodule(name), r, **supports))
    freeze_all_but(model, GLoRALinear, ("A", "B", "C", "D", "E"))
    return targets


def merge_glora(model: nn.Module) -> None:
    set_merged(model, GLoRALinear, True)


def unmerge_glora(model: nn.Module) -> None:
    set_merged(model, GLoRALinear, False)


def demo() -> None:
    """GLoRA with PEFT's default supports at ranks 4 and 1 on the toy task, and how little a
    vectors-only GLoRA (close to (IA)³ plus BitFit) trains."""
    x, y = toy_task()
    for r in (4, 1):
        model = toy_model()
        inject_glora(model, ["0", "2", "4"], r=r)
        before, after = train(model, x, y, lr=1e-2)
        report(f"glora (rank-{r} supports, constant bias supports) on 3 layers", model, before, after)
        report_merge(model, x, merge_glora)
    model = toy_model()
    inject_glora(model, ["0", "2", "4"], weight_supports="vector", prompt="vector", bias_supports="vector")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"  vectors only: {trainable} trained numbers, for a toy task that needs a low-rank change")


if __name__ == "__main__":
    demo()
