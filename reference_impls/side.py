"""Ladder side-tuning: a narrow side network learns from the frozen backbone's activations, and no
gradient ever flows through the backbone.

Sung, Cho, Bansal. "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning."
NeurIPS 2022. arXiv:2206.06522. Adapters and LoRA sit inside the backbone, so training them still
back-propagates through every backbone layer and keeps its activations. LST moves all trainable
weights into a separate side network of width d/r (r the reduction factor) that reads the
backbone's hidden states h_i through "ladder" down-projections, mixed in by learned gates:

    s_0 = D_0 x                                              (x: the backbone's input, e.g. embeddings)
    μ_i = σ(α_i / T),   s_i = f_i( μ_i s_{i−1} + (1 − μ_i) D_i h_i )      for each backbone block i
    y   = head( U · LN(s_L) )                                 (U: d/r → d, the backbone's own head)

with T = 0.1 and α_i = 0 at the start (μ_i = ½), f_i a side block (the backbone's block type at
width d/r in the paper). The backbone runs once, without autograd, so its activations are not kept:
memory for training falls with the side network's size. Trainable: d·d_s (D_0) + L·d·d_s (D_i)
+ L (α) + the side blocks + 2·d_s (LN) + d_s·d + d (U), with d_s = d/r (+ d_s per D with biases).
The paper initialises each side block from its backbone block by structural pruning (keeping the
dimensions Fisher information ranks highest); here side blocks start at random. The authors' code
also offers gating after the side block and a final gate with the backbone's output; neither is here.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from reference_impls._plumbing import report, toy_model, toy_task, train

IMPLEMENTS = ("ladder-side-tuning",)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = (
    "scaling-down-to-scale-up",
    "peft-survey-han-2024",
)


class LadderSideNetwork(nn.Module):
    """Frozen backbone blocks (and head), and a trainable side network reading them through gated ladders."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        side_blocks: Sequence[nn.Module],
        d: int,
        d_side: int,
        head: nn.Module | None = None,
        temperature: float = 0.1,
    ):
        super().__init__()
        if len(blocks) != len(side_blocks):
            raise ValueError(f"one side block per backbone block: {len(side_blocks)} for {len(blocks)}")
        self.blocks, self.head = nn.ModuleList(blocks), head if head is not None else nn.Identity()
        self.blocks.requires_grad_(False)
        self.head.requires_grad_(False)
        weight = next(self.blocks.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.first_down = nn.Linear(d, d_side, **factory)
        self.downs = nn.ModuleList(nn.Linear(d, d_side, **factory) for _ in blocks)
        self.side_blocks = nn.ModuleList(side_blocks)
        self.gates = nn.Parameter(torch.zeros(len(blocks), **factory))  # α_i = 0: μ_i = ½
        self.norm = nn.LayerNorm(d_side, **factory)
        self.up = nn.Linear(d_side, d, **factory)
        self.temperature = temperature

    def backbone_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """h_1 … h_L, computed without autograd: nothing of the backbone is kept for the backward pass."""
        states = []
        with torch.no_grad():
            h = x
            for block in self.blocks:
                h = block(h)
                h = h[0] if isinstance(h, tuple) else h  # transformers' layers return tuples
                states.append(h)
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.first_down(x)
        for h, down, block, alpha in zip(self.backbone_states(x), self.downs, self.side_blocks, self.gates):
            mu = torch.sigmoid(alpha / self.temperature)
            side = block(mu * side + (1 - mu) * down(h))
        return self.head(self.up(self.norm(side)))


def ladder_side_tuning(
    blocks: Sequence[nn.Module],
    d: int,
    reduction: int = 8,
    make_side_block: Callable[[int], nn.Module] | None = None,
    head: nn.Module | None = None,
) -> LadderSideNetwork:
    """An LST model around a backbone given as its blocks (and head). make_side_block(d_side) builds
    one side block; by default a small MLP (Linear, GELU) of width d/reduction."""
    d_side = max(1, d // reduction)
    make = make_side_block or (lambda width: nn.Sequential(nn.Linear(width, width), nn.GELU()))
    weight = next(iter(blocks[0].parameters()))
    side_blocks = [make(d_side).to(device=weight.device, dtype=weight.dtype) for _ in blocks]
    return LadderSideNetwork(blocks, side_blocks, d, d_side, head)


def demo() -> None:
    """The toy MLP's first two layers as the frozen backbone, its last as the frozen head."""
    x, y = toy_task()
    backbone = toy_model()
    blocks = [nn.Sequential(backbone[0], backbone[1]), nn.Sequential(backbone[2], backbone[3])]
    model = ladder_side_tuning(blocks, d=64, reduction=4, head=backbone[4])
    before, after = train(model, x, y)
    report("Ladder side-tuning, side width 16", model, before, after)
    mu = torch.sigmoid(model.gates / model.temperature)
    print(
        f"  gates μ after training (1: the side network's own state, 0: the backbone's): "
        f"{', '.join(f'{value:.2f}' for value in mu.tolist())}"
    )


if __name__ == "__main__":
    demo()
