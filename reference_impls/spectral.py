"""Updates in a transformed domain: FourierFT (a few trained Fourier coefficients) and C3A (block-circulant ΔW).

Both write ΔW through a Fourier transform, so a few trained numbers give a dense update of full
rank; both add ΔW to the frozen weight and merge into it.

**FourierFT.** Gao, Wang, Chen, et al. "Parameter-Efficient Fine-Tuning with Discrete Fourier
Transform." ICML 2024. arXiv:2405.03003. n entries of a d_out × d_in spectrum F, at positions drawn
once at random (the same for every layer of a shape: one seed), are trained; the update is the
real part of its inverse 2-D DFT, scaled:

    ΔW = α · Re(IDFT₂(F)),        F[eⱼ] = cⱼ (j = 1…n),   F = 0 elsewhere

Parameters: n per layer (PEFT's default 1000, α = 150). c = 0 at the start, so ΔW = 0. The positions
are not saved: they follow from the seed, `torch.randperm(d_out · d_in)` under a generator seeded
with it (as PEFT draws them).

**C3A.** Chen, Cheng, Liu, et al. "Parameter-Efficient Fine-Tuning via Circular Convolution."
Findings of ACL 2025. arXiv:2407.19342. ΔW is made of (d_out/b) × (d_in/b) circulant blocks of
size b, each defined by one vector w_{ij} ∈ ℝ^b, and applied by FFTs (a circular correlation
per block), never as a matrix:

    ΔW_{ij}[s, t] = w_{ij}[(t − s) mod b] / d_in,        (ΔW x)ᵢ = Σⱼ Re(FFT(IFFT(xⱼ) ⊙ FFT(w_{ij}))) / d_in

Parameters: d_out · d_in / b. w = 0 at the start. A circulant block has rank up to b, so ΔW's rank
is not bounded by the parameter count as LoRA's is.

Both equal PEFT 0.21 (`fourierft`, `c3a`); `reference_impls.interop` loads their checkpoints.
"""

import torch
from torch import nn
from torch.nn import functional as F

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
from reference_impls.lora import LoRALinear

FAMILY = "Transformed-domain updates"

IMPLEMENTS = ("fourierft", "c3a")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def spectral_positions(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """(2 × n) rows and columns of the n trained spectrum entries, drawn from the seed."""
    flat = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // d_in, flat % d_in])


class FourierFTLinear(nn.Module):
    """A frozen nn.Linear plus ΔW = α · Re(IDFT₂(F)), F holding n trained coefficients."""

    def __init__(self, base: nn.Linear, n: int = 1000, alpha: float = 150.0, seed: int = 777):
        super().__init__()
        d_out, d_in = base.out_features, base.in_features
        if not 0 < n <= d_out * d_in:
            raise ValueError(f"FourierFT trains 1..{d_out * d_in} coefficients of this layer, got n = {n}")
        self.base, self.alpha = base, alpha
        if base.weight.is_meta:  # counting parameters only: no need to draw the positions
            positions = torch.empty(2, n, dtype=torch.long, device="meta")
        else:
            positions = spectral_positions(d_out, d_in, n, seed)
        self.register_buffer("positions", positions)
        self.c = nn.Parameter(torch.zeros(n, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        spectrum = torch.zeros(self.base.weight.shape, device=self.c.device)  # fp32: no half-precision FFT here
        spectrum[self.positions[0], self.positions[1]] = self.c.float()
        return (torch.fft.ifft2(spectrum).real * self.alpha).to(self.c.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        delta = self.delta_weight()
        return h + F.linear(x.to(delta.dtype), delta).to(h.dtype)

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


def circular_correlation(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σⱼ corr(w_{ij}, xⱼ) for blocks xⱼ of x (…, n·b) and kernels w (m × n × b): (…, m·b), by FFT."""
    m, n, b = w.shape
    blocks = torch.fft.ifft(x.unflatten(-1, (n, b)))
    mixed = torch.einsum("...nb,mnb->...mb", blocks, torch.fft.fft(w))  # sum over input blocks j
    return torch.fft.fft(mixed).real.flatten(-2)


class C3ALinear(nn.Module):
    """A frozen nn.Linear plus a block-circulant ΔW (blocks of size b), applied by FFT."""

    def __init__(self, base: nn.Linear, block_size: int = 8):
        super().__init__()
        d_out, d_in, b = base.out_features, base.in_features, block_size
        if b <= 0 or d_in % b or d_out % b:
            raise ValueError(f"C3A's block size must divide d_in = {d_in} and d_out = {d_out}, got {b}")
        self.base, self.b = base, b
        # Kept in fp32 whatever the base's dtype (PEFT too): the FFTs run in fp32.
        self.w = nn.Parameter(torch.zeros(d_out // b, d_in // b, b, device=base.weight.device))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The circulant blocks written out: block (i, j) has w_{ij}[(t − s) mod b] at row s, column t."""
        b = self.b
        shift = (torch.arange(b)[None, :] - torch.arange(b)[:, None]) % b  # (t − s) mod b
        blocks = self.w[:, :, shift]  # (m, n, b, b)
        delta = blocks.permute(0, 2, 1, 3).reshape(self.base.out_features, self.base.in_features)
        return (delta / self.base.in_features).to(self.base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        if self.merged:
            return h
        update = circular_correlation(x.float(), self.w.float()) / x.shape[-1]
        return h + update.to(h.dtype)

    merge, unmerge = LoRALinear.merge, LoRALinear.unmerge


LAYERS = {"fourierft": (FourierFTLinear, ("c",)), "c3a": (C3ALinear, ("w",))}


def inject_spectral(model: nn.Module, target_names: list[str], method: str = "fourierft", **options) -> list[str]:
    """Wrap the named nn.Linear layers with the method's layer ("fourierft" or "c3a"; options go to
    its constructor) and freeze everything else."""
    layer_type, trained = LAYERS[method]
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, layer_type(model.get_submodule(name), **options))
    freeze_all_but(model, layer_type, trained)
    return targets


def merge_spectral(model: nn.Module) -> None:
    set_merged(model, (FourierFTLinear, C3ALinear), True)


def unmerge_spectral(model: nn.Module) -> None:
    set_merged(model, (FourierFTLinear, C3ALinear), False)


def demo() -> None:
    """FourierFT and C3A on the toy task, and the rank of the updates they learn."""
    x, y = toy_task()
    for method, options, lr in [("fourierft", {"n": 400, "alpha": 100.0}, 1e-2), ("c3a", {"block_size": 8}, 0.5)]:
        model = toy_model()
        inject_spectral(model, ["0", "2", "4"], method, **options)
        before, after = train(model, x, y, lr=lr)
        report(f"{method} on 3 layers", model, before, after)
        with torch.no_grad():
            rank = torch.linalg.matrix_rank(model[0].delta_weight().float()).item()
        print(f"  rank of the first layer's update: {rank} of 64")
        report_merge(model, x, merge_spectral)


if __name__ == "__main__":
    demo()
