"""LoReFT: low-rank linear subspace representation fine-tuning.

Wu, Arora, Wang, Geiger, Jurafsky, Manning, Potts. "ReFT: Representation Finetuning for Language
Models." NeurIPS 2024. arXiv:2404.03592.

Instead of changing weights, ReFT edits hidden representations. LoReFT replaces a layer's output
h ∈ ℝ^d, at chosen positions, by

    Φ(h) = h + Rᵀ (W h + b − R h),      R ∈ ℝ^{r×d} with orthonormal rows, W ∈ ℝ^{r×d}, b ∈ ℝ^r

that is: inside the r-dimensional subspace spanned by R's rows, the representation R h is moved to
the learned target W h + b; everything orthogonal to it is left alone. The paper intervenes on the
first p and last s positions of the prompt, in chosen layers, with separate (or tied) parameters
for the two groups. R stays orthonormal through PyTorch's orthogonal parametrisation.

Trainable parameters per intervention: 2·r·d + r (R, W and b); per layer 2·(2·r·d + r), or half
with tied weights. W = R, b = 0 would be the identity; we follow the paper's random start.
"""

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from reference_impls._plumbing import find_targets, freeze_all_but, replace_module, report, toy_model, toy_task, train

FAMILY = "Representation fine-tuning"

IMPLEMENTS = ("reft",)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("adapters-library",)


class LoReFT(nn.Module):
    """Φ(h) = h + Rᵀ(W h + b − R h)."""

    def __init__(self, d: int, r: int):
        super().__init__()
        self.R = orthogonal(nn.Linear(d, r, bias=False))  # .weight is R, rows kept orthonormal
        self.source = nn.Linear(d, r)  # W h + b

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.R.weight.to(h.dtype)
        return h + (self.source(h) - h @ R.T) @ R

    def _apply(self, fn, recurse=True):
        # The orthogonal parametrisation has no half-precision kernels on the CPU: R stays in fp32
        # whatever the model is cast to, and is cast where it is used.
        super()._apply(fn, recurse)
        self.R.float()
        return self


class InterventionLayer(nn.Module):
    """A layer whose output is edited at its first `prefix` and last `suffix` positions."""

    def __init__(self, layer: nn.Module, d: int, r: int, prefix: int, suffix: int, tied: bool = False):
        super().__init__()
        self.layer, self.prefix, self.suffix = layer, prefix, suffix
        self.first = LoReFT(d, r) if prefix else None
        self.last = (self.first if tied and prefix else LoReFT(d, r)) if suffix else None

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """h: (batch, positions, d). Edits a copy; the two groups may overlap in short sequences."""
        out = h.clone()
        p, s = min(self.prefix, h.shape[1]), min(self.suffix, h.shape[1])
        if p:
            out[:, :p] = self.first(h[:, :p])
        if s:
            out[:, -s:] = self.last(h[:, -s:])
        return out

    def forward(self, *args, **kwargs):
        output = self.layer(*args, **kwargs)
        if isinstance(output, tuple):  # many Hugging Face layers return (hidden_states, ...)
            return (self.edit(output[0]),) + output[1:]
        return self.edit(output)


def inject_loreft(
    model: nn.Module, target_names: list[str], d: int, r: int = 4, prefix: int = 3, suffix: int = 0, tied: bool = False
) -> list[str]:
    """Intervene on the outputs (width d) of the named layers; freeze the model."""
    targets = find_targets(model, target_names, kind=nn.Module)
    for name in targets:
        replace_module(model, name, InterventionLayer(model.get_submodule(name), d, r, prefix, suffix, tied))
    freeze_all_but(model, LoReFT, ("R", "source"))
    return targets


class OnePosition(nn.Module):
    """The toy task has no positions: run each sample as a sequence of length one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.unsqueeze(1)).squeeze(1)


def demo() -> None:
    """Edit the frozen MLP's middle representation in an 8-dimensional subspace."""
    model = OnePosition(toy_model())
    x, y = toy_task()
    inject_loreft(model, ["model.2"], d=64, r=8, prefix=1)
    before, after = train(model, x, y, lr=1e-2)
    report("LoReFT r=8 on the middle layer", model, before, after)


if __name__ == "__main__":
    demo()
