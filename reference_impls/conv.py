"""Residual adapters for convolutional networks: a 1×1 convolution per domain beside or after each conv.

Rebuffi, Bilen, Vedaldi. "Learning multiple visual domains with residual adapters." NeurIPS 2017.
arXiv:1705.08045. One frozen ResNet serves many visual domains; each domain adds, after a k×k
convolution with output y, a residual adapter, a bank α of 1×1 filters (C × C) behind its own
batch normalisation:

    series:     y + α ∗ BN(y)                         (then the layer's BatchNorm, as before)

Rebuffi, Bilen, Vedaldi. "Efficient parametrization of multi-domain deep neural networks." CVPR
2018. arXiv:1803.10082. The adapter moves beside the convolution, reading its input x (same stride):

    parallel:   f ∗ x + α ∗ x                         (α: C_out × C_in 1×1 filters)

A 1×1 filter at stride s sees exactly the centre tap of a k×k filter padded by (k − 1)/2, so the
parallel adapter folds into the frozen filter: f' = f + α at the centre (`merge`). The series
adapter has a batch normalisation inside and no merge while it trains.

In both papers the batch-normalisation layers are per domain too (train_norms=True trains every
BatchNorm of the model besides the adapters). α starts at zero, so the network starts as it was.
Trainable per adapted convolution: series C² + 2C, parallel C_out · C_in (plus the BatchNorms).

Chen, Tao, Zhang, Wang, Li, Ye, Wang, Hu, Savvides. "Conv-Adapter: Exploring Parameter Efficient
Transfer Learning for ConvNets." CVPR 2024 Workshops. arXiv:2208.07463. A bottleneck made of
convolutions that keep the spatial structure, beside a whole conv block F (in a ResNet bottleneck
block, the 3×3 conv with its BatchNorm and ReLU), reading the block's input at the block's stride:

    F(x) + α ⊙ W_up ∗ ReLU(W_dw ∗ x)

W_dw: a k×k convolution in C_in/γ groups, from C_in down to C_in/γ channels (each output channel
reads γ input channels); W_up: 1×1, back up to C_out; α: a learned scale per output channel, 1 at
first. Trainable: C_in·k² + C_in/γ (W_dw) + (C_in/γ)·C_out + C_out (W_up) + C_out (α). As in the
authors' code the adapter starts at random, not at zero.
"""

from collections import OrderedDict

import torch
from torch import nn

from reference_impls._plumbing import (
    find_targets,
    freeze_all_but,
    replace_module,
    report,
    report_merge,
    set_merged,
    train,
)

FAMILY = "Bottleneck adapters"

IMPLEMENTS = ("residual-adapters", "parallel-residual-adapters", "conv-adapter")


class SeriesResidualAdapter(nn.Module):
    """conv(x) = y, then y + α ∗ BN(y)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.conv = conv
        self.norm = nn.BatchNorm2d(conv.out_channels, **factory)
        self.alpha = nn.Conv2d(conv.out_channels, conv.out_channels, 1, bias=False, **factory)
        nn.init.zeros_(self.alpha.weight)
        self.train(conv.training)  # in the model's mode: a new BatchNorm would otherwise be in training mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + self.alpha(self.norm(y))


class ParallelResidualAdapter(nn.Module):
    """conv(x) + α ∗ x, with α strided like the convolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"a parallel adapter needs an ungrouped convolution, not groups={conv.groups}")
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.conv = conv
        self.alpha = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=False, **factory)
        nn.init.zeros_(self.alpha.weight)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.conv(x)
        return self.conv(x) + self.alpha(x)

    def _centre(self) -> tuple[int, int]:
        """Where the 1×1 filter sits inside the k×k one; only where the padding centres the two."""
        conv = self.conv
        centre = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
        if conv.padding_mode != "zeros" or conv.padding != centre or any(k % 2 == 0 for k in conv.kernel_size):
            raise ValueError(f"cannot fold a 1×1 adapter into {conv}: it needs an odd kernel padded by (k − 1)/2")
        return tuple((k - 1) // 2 for k in conv.kernel_size)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        row, column = self._centre()
        self.conv.weight[:, :, row, column] += sign * self.alpha.weight[:, :, 0, 0]

    def merge(self) -> None:
        if not self.merged:
            self._fold(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1.0)
            self.merged = False


def inject_residual_adapters(
    model: nn.Module, target_names: list[str], placement: str = "parallel", train_norms: bool = True
) -> list[str]:
    """Give the named nn.Conv2d layers a residual adapter; freeze all else but (train_norms) the BatchNorms."""
    if placement not in ("series", "parallel"):
        raise ValueError(f"placement is 'series' or 'parallel', not {placement!r}")
    wrapper = SeriesResidualAdapter if placement == "series" else ParallelResidualAdapter
    targets = find_targets(model, target_names, kind=nn.Conv2d)
    for name in targets:
        replace_module(model, name, wrapper(model.get_submodule(name)))
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (SeriesResidualAdapter, ParallelResidualAdapter)):
            module.alpha.requires_grad_(True)
            if isinstance(module, SeriesResidualAdapter):
                module.norm.requires_grad_(True)
        elif train_norms and isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(True)
    return targets


def merge_residual_adapters(model: nn.Module) -> None:
    set_merged(model, ParallelResidualAdapter, True)


def unmerge_residual_adapters(model: nn.Module) -> None:
    set_merged(model, ParallelResidualAdapter, False)


class ConvAdapter(nn.Module):
    """α ⊙ W_up ∗ ReLU(W_dw ∗ x), W_dw grouped k×k down to C_in/γ channels, W_up 1×1 back up to C_out."""

    def __init__(
        self, c_in: int, c_out: int, reduction: int = 4, kernel_size: int = 3, stride: int = 1, device=None, dtype=None
    ):
        super().__init__()
        if c_in % reduction:
            raise ValueError(f"the reduction {reduction} must divide the {c_in} input channels")
        factory = {"device": device, "dtype": dtype}
        width = c_in // reduction
        self.down = nn.Conv2d(
            c_in, width, kernel_size, stride=stride, padding=kernel_size // 2, groups=width, **factory
        )
        self.up = nn.Conv2d(width, c_out, 1, **factory)
        self.scale = nn.Parameter(torch.ones(1, c_out, 1, 1, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(torch.relu(self.down(x)))


class ConvParallel(nn.Module):
    """F(x) + A(x): a Conv-Adapter beside a conv block, with the block's stride."""

    def __init__(self, block: nn.Module, adapter: ConvAdapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.adapter(x)


def inject_conv_adapters(
    model: nn.Module, target_names: list[str], reduction: int = 4, kernel_size: int = 3
) -> list[str]:
    """Put a Conv-Adapter beside each named conv block (or single convolution); freeze all else."""
    targets = find_targets(model, target_names, kind=nn.Module)
    for name in targets:
        block = model.get_submodule(name)
        convs = [
            module
            for module in ([block] if isinstance(block, nn.Conv2d) else block.modules())
            if isinstance(module, nn.Conv2d)
        ]
        if not convs:
            raise ValueError(
                f"{name}: a Conv-Adapter goes beside a block with convolutions, not {type(block).__name__}"
            )
        first = convs[0]
        adapter = ConvAdapter(
            first.in_channels,
            convs[-1].out_channels,
            reduction,
            kernel_size,
            stride=first.stride[0],
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        replace_module(model, name, ConvParallel(block, adapter))
    freeze_all_but(model, ConvAdapter, ("down", "up", "scale"))
    return targets


def toy_convnet(seed: int = 0) -> nn.Sequential:
    """A small ConvNet standing in for a pre-trained ResNet: two 3×3 conv-BN-ReLU stages and a head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 8),
    )


def demo() -> None:
    """A new visual domain: match what another network computes on random 8×8 images."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(128, 3, 8, 8, generator=generator)
    with torch.no_grad():
        y = toy_convnet(seed=1).eval()(x)  # the new domain's "labels"
    y = (y - y.mean(0)) / y.std(0)  # on the scale the base model's outputs have
    for placement in ("series", "parallel"):
        model = toy_convnet()
        inject_residual_adapters(model, ["0", "3"], placement=placement)
        before, after = train(model, x, y, steps=150)
        report(f"{placement.capitalize()} residual adapters (and the BatchNorms)", model, before, after)
    report_merge(model.eval(), x, merge_residual_adapters)  # the parallel adapters, into the 3×3 filters

    layers = toy_convnet()  # the same network, its conv-BatchNorm-ReLU stages named
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(*layers[:3]),
            stage=nn.Sequential(*layers[3:6]),
            pool=layers[6],
            flatten=layers[7],
            head=layers[8],
        )
    )
    inject_conv_adapters(model, ["stage"], reduction=4)  # beside the 16-channel, stride-2 stage
    before, after = train(model, x, y, steps=150)
    report("Conv-Adapter beside the second stage, γ = 4", model, before, after)


if __name__ == "__main__":
    demo()
