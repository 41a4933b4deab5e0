"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel. "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning." NeurIPS 2022. arXiv:2205.05638. (The paper's full
recipe, T-Few, adds unlikelihood and length-normalised losses on top of T0; this module is the
parameter-efficient part, (IA)³.)

Three learned vectors rescale activations inside each Transformer block, elementwise:

    attention:      softmax(Q (l_k ⊙ K)ᵀ / √d_k) (l_v ⊙ V)
    feed-forward:   W₂ (l_ff ⊙ γ(W₁ x))

So the keys' and values' projections have their *outputs* scaled (l_k, l_v ∈ ℝ^{d_out}), and the
feed-forward's second projection has its *input* scaled (l_ff ∈ ℝ^{d_ff}). All vectors start at 1,
so the model is unchanged at the start, and each can be folded into its weight afterwards:

    output scaling:   W ← diag(l) W,  b ← l ⊙ b          input scaling:   W ← W diag(l)

Trainable parameters per block: d_k + d_v + d_ff (2·d_model + d_ff for standard attention).
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

FAMILY = "Activation scaling"

IMPLEMENTS = ("ia3",)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("adapters-library", "hf-peft", "scaling-down-to-scale-up", "peft-ref", "peft-survey-han-2024")


class IA3Linear(nn.Module):
    """A frozen nn.Linear whose output (or, for feed-forward layers, input) is rescaled by l."""

    def __init__(self, base: nn.Linear, scale_input: bool = False):
        super().__init__()
        self.base, self.scale_input = base, scale_input
        size = base.in_features if scale_input else base.out_features
        self.l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.scale_input:
            return self.base(x * self.l.to(x.dtype))
        h = self.base(x)
        return h * self.l.to(h.dtype)

    @torch.no_grad()
    def _fold(self, op) -> None:
        """Apply op (Tensor.mul_ to merge, Tensor.div_ to unmerge) with l along the scaled axis:
        W's columns for scaled inputs, W's rows and the bias for scaled outputs."""
        if self.scale_input:
            op(self.base.weight, self.l.unsqueeze(0))
        else:
            op(self.base.weight, self.l.unsqueeze(1))
            if self.base.bias is not None:
                op(self.base.bias, self.l)

    def merge(self) -> None:
        if not self.merged:
            self._fold(torch.Tensor.mul_)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(torch.Tensor.div_)
            self.merged = False


def inject_ia3(model: nn.Module, target_names: list[str], feedforward_names: list[str] = ()) -> list[str]:
    """Rescale the named layers: outputs for keys/values, inputs for those also in feedforward_names."""
    targets = find_targets(model, target_names)
    feedforward = set(feedforward_names)
    for name in targets:
        scale_input = name in feedforward or name.rsplit(".", 1)[-1] in feedforward
        replace_module(model, name, IA3Linear(model.get_submodule(name), scale_input))
    freeze_all_but(model, IA3Linear, ("l",))
    return targets


def merge_ia3(model: nn.Module) -> None:
    set_merged(model, IA3Linear, True)


def unmerge_ia3(model: nn.Module) -> None:
    set_merged(model, IA3Linear, False)


def demo() -> None:
    """Learn activation scales: the new task is the same frozen MLP with its hidden units and
    outputs rescaled by unknown factors, exactly what (IA)³ can express."""
    x, _ = toy_task()
    teacher = toy_model()
    inject_ia3(teacher, ["2", "4"], feedforward_names=["2"])
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, IA3Linear):
                module.l.uniform_(0.2, 2.0)
        y = teacher(x)
    model = toy_model()
    inject_ia3(model, ["2", "4"], feedforward_names=["2"])
    before, after = train(model, x, y, lr=3e-2)
    report("(IA)³ on 2 layers", model, before, after)
    report_merge(model, x, merge_ia3)


if __name__ == "__main__":
    demo()
