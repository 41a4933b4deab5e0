"""Updates in a transformed domain: FourierFT (a few trained Fourier coefficients), WaveFT (a few
trained wavelet coefficients) and C3A (block-circulant ΔW).

Each writes ΔW through a transform, so a few trained numbers give a dense update of high rank; each
adds ΔW to the frozen weight and merges into it.

**FourierFT.** Gao, Wang, Chen, et al. "Parameter-Efficient Fine-Tuning with Discrete Fourier
Transform." ICML 2024. arXiv:2405.03003. n entries of a d_out × d_in spectrum F, at positions drawn
once at random (the same for every layer of a shape: one seed), are trained; the update is the
real part of its inverse 2-D DFT, scaled:

    ΔW = α · Re(IDFT₂(F)),        F[eⱼ] = cⱼ (j = 1…n),   F = 0 elsewhere

Parameters: n per layer (PEFT's default 1000, α = 150). c = 0 at the start, so ΔW = 0. The positions
are not saved: they follow from the seed, `torch.randperm(d_out · d_in)` under a generator seeded
with it (as PEFT draws them).

**WaveFT.** Bilican, Yılmaz, Tekalp, et al. "Exploring Sparsity for Parameter Efficient Fine Tuning
Using Wavelets." 2025. arXiv:2505.12532. As FourierFT, but the n trained coefficients (at positions
drawn from a seed the same way) sit in the one-level 2-D wavelet transform of ΔW, and ΔW is its
inverse. The coefficient matrix, padded to P × Q (P = d_out + L − 2 rounded up to even, Q likewise
for d_in, the positions centred in it, L the filter length), has four quadrants, PyWavelets'
approximation and details [[A, H], [V, D]], and

    ΔW = s · (Pₗ A Qₗᵀ + Pₕ H Qₗᵀ + Pₗ V Qₕᵀ + Pₕ D Qₕᵀ)

where Pₗ, Pₕ (d_out × P/2) and Qₗ, Qₕ (d_in × Q/2) are one-level synthesis by the wavelet's
low-pass and high-pass reconstruction filters (upsample by 2, convolve, keep the centred samples).
With the Haar wavelet (db1, PEFT's default) every coefficient touches a 2 × 2 block of ΔW; longer
filters spread it further. Without the inverse transform (PEFT's `use_idwt=False`) ΔW = s · C, the
coefficients themselves: a sparse update. Parameters: n per layer (PEFT's default 2592, s = 25).
c = 0 at the start, so ΔW = 0. Implemented for the wavelets db1 (Haar) and db2 (= sym2).

**C3A.** Chen, Cheng, Liu, et al. "Parameter-Efficient Fine-Tuning via Circular Convolution."
Findings of ACL 2025. arXiv:2407.19342. ΔW is made of (d_out/b) × (d_in/b) circulant blocks of
size b, each defined by one vector w_{ij} ∈ ℝ^b, and applied by FFTs (a circular correlation
per block), never as a matrix:

    ΔW_{ij}[s, t] = w_{ij}[(t − s) mod b] / d_in,        (ΔW x)ᵢ = Σⱼ Re(FFT(IFFT(xⱼ) ⊙ FFT(w_{ij}))) / d_in

Parameters: d_out · d_in / b. w = 0 at the start. A circulant block has rank up to b, so ΔW's rank
is not bounded by the parameter count as LoRA's is.

All three equal PEFT 0.21 (`fourierft`, `waveft`, `c3a`); `reference_impls.interop` loads their
checkpoints.
"""

import math

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

IMPLEMENTS = ("fourierft", "waveft", "c3a")

# The frameworks that provide these methods.
COVERED_BY = ("hf-peft",)


def spectral_positions(d_out: int, d_in: int, n: int, seed: int, meta: bool = False) -> torch.Tensor:
    """(2 × n) rows and columns of the n trained spectrum entries, drawn from the seed (on the meta
    device, where only parameters are counted, nothing is drawn)."""
    if meta:
        return torch.empty(2, n, dtype=torch.long, device="meta")
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
        self.register_buffer("positions", spectral_positions(d_out, d_in, n, seed, base.weight.is_meta))
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


# Reconstruction low-pass filters (PyWavelets' rec_lo); the high-pass one is rec_hi[k] = (−1)ᵏ rec_lo[L−1−k].
ROOT2, ROOT3 = math.sqrt(2), math.sqrt(3)
DAUBECHIES_2 = tuple(value / (4 * ROOT2) for value in (1 + ROOT3, 3 + ROOT3, 3 - ROOT3, 1 - ROOT3))
WAVELETS = {"db1": (1 / ROOT2, 1 / ROOT2), "db2": DAUBECHIES_2, "sym2": DAUBECHIES_2}  # db1 is Haar


def synthesis(taps: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """(size × n) matrix taking n coefficients to `size` samples: upsample by 2, convolve with the
    filter (full length 2n + L − 2), keep the centred `size` samples."""
    L = len(taps)
    full = torch.zeros(2 * n + L - 2, n, dtype=taps.dtype)
    columns = torch.arange(n)
    full[2 * columns[:, None] + torch.arange(L), columns[:, None]] = taps  # column i: the taps from row 2i
    start = (full.shape[0] - size) // 2
    return full[start : start + size]


class WaveFTLinear(nn.Module):
    """A frozen nn.Linear plus ΔW = s · IDWT₂(C), C holding n trained wavelet coefficients."""

    def __init__(
        self,
        base: nn.Linear,
        n: int = 2592,
        scale: float = 25.0,
        wavelet: str = "db1",
        seed: int = 777,
        idwt: bool = True,
    ):
        super().__init__()
        d_out, d_in = base.out_features, base.in_features
        if not 0 < n <= d_out * d_in:
            raise ValueError(f"WaveFT trains 1..{d_out * d_in} coefficients of this layer, got n = {n}")
        if wavelet not in WAVELETS:
            raise ValueError(f"WaveFT wavelet_family {wavelet!r} is not implemented (only {', '.join(WAVELETS)})")
        self.base, self.scale, self.idwt = base, scale, idwt
        low = torch.tensor(WAVELETS[wavelet], dtype=torch.float64)
        high = low.flip(0) * (-1.0) ** torch.arange(len(low))
        L = len(low) if idwt else 2
        self.padded = [size + L - 2 + (size + L - 2) % 2 for size in (d_out, d_in)]  # P, Q: even
        self.offsets = [(padded - size) // 2 for padded, size in zip(self.padded, (d_out, d_in))]
        P, Q = self.padded
        # Fixed by the wavelet and the shape, so not saved.
        synthesise = lambda taps, padded, size: synthesis(taps, padded // 2, size).float().to(base.weight.device)  # noqa: E731
        self.register_buffer("P_low", synthesise(low, P, d_out), persistent=False)
        self.register_buffer("P_high", synthesise(high, P, d_out), persistent=False)
        self.register_buffer("Q_low", synthesise(low, Q, d_in), persistent=False)
        self.register_buffer("Q_high", synthesise(high, Q, d_in), persistent=False)
        self.register_buffer("positions", spectral_positions(d_out, d_in, n, seed, base.weight.is_meta))
        self.c = nn.Parameter(torch.zeros(n, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        if not self.idwt:  # the coefficients are ΔW's own entries
            sparse = torch.zeros(self.base.weight.shape, device=self.c.device, dtype=self.c.dtype)
            sparse[self.positions[0], self.positions[1]] = self.c
            return self.scale * sparse
        (P, Q), (row, column) = self.padded, self.offsets
        C = torch.zeros(P, Q, device=self.c.device)  # in fp32, whatever the model's dtype
        C[self.positions[0] + row, self.positions[1] + column] = self.c.float()
        A, H, V, D = C[: P // 2, : Q // 2], C[: P // 2, Q // 2 :], C[P // 2 :, : Q // 2], C[P // 2 :, Q // 2 :]
        Pl, Ph, Ql, Qh = (m.float() for m in (self.P_low, self.P_high, self.Q_low, self.Q_high))
        delta = Pl @ A @ Ql.T + Ph @ H @ Ql.T + Pl @ V @ Qh.T + Ph @ D @ Qh.T
        return (self.scale * delta).to(self.c.dtype)

    forward = FourierFTLinear.forward
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


LAYERS = {"fourierft": (FourierFTLinear, ("c",)), "waveft": (WaveFTLinear, ("c",)), "c3a": (C3ALinear, ("w",))}


def inject_spectral(model: nn.Module, target_names: list[str], method: str = "fourierft", **options) -> list[str]:
    """Wrap the named nn.Linear layers with the method's layer ("fourierft", "waveft" or "c3a"; options go to
    its constructor) and freeze everything else."""
    layer_type, trained = LAYERS[method]
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, layer_type(model.get_submodule(name), **options))
    freeze_all_but(model, layer_type, trained)
    return targets


def merge_spectral(model: nn.Module) -> None:
    set_merged(model, (FourierFTLinear, WaveFTLinear, C3ALinear), True)


def unmerge_spectral(model: nn.Module) -> None:
    set_merged(model, (FourierFTLinear, WaveFTLinear, C3ALinear), False)


def demo() -> None:
    """FourierFT, WaveFT and C3A on the toy task, and the rank of the updates they learn."""
    x, y = toy_task()
    for method, options, lr in [
        ("fourierft", {"n": 400, "alpha": 100.0}, 1e-2),
        ("waveft", {"n": 400, "scale": 10.0, "wavelet": "db2"}, 1e-2),
        ("c3a", {"block_size": 8}, 0.5),
    ]:
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
