"""QLoRA's 4-bit NormalFloat (NF4) weights with double quantisation, and a LoRA on top.

Dettmers, Pagnoni, Holtzman, Zettlemoyer. "QLoRA: Efficient Finetuning of Quantized LLMs."
NeurIPS 2023. arXiv:2305.14314.

The frozen base weight is stored in 4 bits. Per block of 64 values, the absolute maximum c is
kept and every value x is replaced by the index of the nearest of 16 NF4 levels q_i (quantiles of
a normal distribution, scaled to [−1, 1], with an exact zero) to x / c; two indices share a byte,
the first in the high nibble. Double quantisation stores the block maxima themselves in 8 bits:
their mean μ is subtracted and c − μ is quantised blockwise (256 per block) with the signed 8-bit
dynamic data type, keeping one fp32 maximum per 256 blocks. Dequantisation reverses both:

    c_b = code8[qc_b] · c2_{⌊b/256⌋} + μ,          W_k = NF4[q_k] · c_{⌊k/64⌋}

Storage per weight: 4 bits + 8/64 + 32/(64·256) bits ≈ 4.127 bits. The LoRA adapter stays in 16
bits and is the only thing trained: y = x W_NF4ᵀ + b + s (x Aᵀ) Bᵀ.

`quantize_nf4` (PyTorch, run once) gives bitsandbytes' `quantize_4bit(..., quant_type="nf4",
compress_statistics=True)` bit for bit in the packed 4-bit codes, the block-maximum scales and the
offset. The 8-bit codes of the block maxima are the nearest ones; bitsandbytes' CPU kernel finds
them with an approximate search that sometimes takes the neighbour (measured switch points at 39-50%
of the gap between two codes instead of 50%), so a few of its codes are a step or two from ours.
`dequantize_nf4` is a Triton kernel with a PyTorch twin; both equal bitsandbytes' `dequantize_4bit`
bit for bit on the same stored state.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from reference_impls._plumbing import (
    count_parameters,
    find_targets,
    freeze_all_but,
    replace_module,
    toy_model,
    toy_task,
    train,
)
from reference_impls.kernels.fused_lora import fused_lora, use_kernel

FAMILY = "Kernels and serving systems"

IMPLEMENTS = ("qlora",)

# The frameworks that provide, the surveys that describe and the studies that use these methods.
COVERED_BY = ("hf-peft", "peft-survey-han-2024")

NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
BLOCK, ABSMAX_BLOCK = 64, 256


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic data type (Dettmers 2015): for exponents 10⁻⁶ … 10⁰, evenly spaced
    fractions in [0.1, 1], more of them at larger exponents; plus 0 and 1; 256 sorted values."""
    values = []
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2
        # The products are taken in float32, as bitsandbytes takes them, so the table matches to the bit.
        values += (10 ** (exponent - 6) * means).tolist() + (-(10 ** (exponent - 6)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blockwise_codes(values: torch.Tensor, block: int, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: absmax, then the index of the nearest level to value · (1 / absmax) (midpoint buckets)."""
    n = values.numel()
    padded = torch.nn.functional.pad(values.float().reshape(-1), (0, -n % block))
    blocks = padded.reshape(-1, block)
    absmax = blocks.abs().max(dim=1).values
    # The last, partial block's maximum is over its real values only (the padding is zero, so equal).
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[:n]
    codes = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True)
    return codes, absmax


def _blockwise_codes_8bit(values: torch.Tensor, block: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise codes as bitsandbytes defines them: divide by the block maximum, take the code
    at or left of the value (code[0] read as −1), step right if strictly closer (ties go left); an
    all-zero block (0/0) gets index 0. (Its CPU kernel's search only approximates the first step.)"""
    n = values.numel()
    padded = torch.nn.functional.pad(values.float().reshape(-1), (0, -n % block))
    absmax = padded.reshape(-1, block).abs().max(dim=1).values
    normed = (padded.reshape(-1, block) / absmax[:, None]).reshape(-1)[:n]
    search = code.clone()
    search[0] = -1.0
    left = (torch.searchsorted(search, normed.contiguous(), right=True) - 1).clamp(0, 255)
    right = (left + 1).clamp(max=255)
    closer = ((normed - search[right]).abs() < (normed - search[left]).abs()) & (left < 255)
    codes = torch.where(torch.isnan(normed), torch.zeros_like(left), left + closer.long())
    return codes, absmax


@dataclass(frozen=True)
class NF4Weight:
    packed: torch.Tensor  # (ceil(n / 2),) uint8: two NF4 codes per byte, the first in the high nibble
    absmax_codes: torch.Tensor  # (blocks,) uint8: the block maxima, 8-bit
    absmax_scales: torch.Tensor  # (ceil(blocks / 256),) fp32
    absmax_mean: float
    shape: tuple[int, ...]


def quantize_nf4(weight: torch.Tensor) -> NF4Weight:
    codes, absmax = _blockwise_codes(weight, BLOCK, NF4_LEVELS.to(weight.device))
    if codes.numel() % 2:  # an odd count: the last byte's second half holds the code of 0.0
        codes = torch.nn.functional.pad(codes, (0, 1), value=int((NF4_LEVELS == 0).nonzero()))
    codes = codes.to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    mean = absmax.mean()
    absmax_codes, absmax_scales = _blockwise_codes_8bit(absmax - mean, ABSMAX_BLOCK, dynamic_map().to(weight.device))
    return NF4Weight(packed, absmax_codes.to(torch.uint8), absmax_scales, float(mean), tuple(weight.shape))


def round_trip_nf4(weight: torch.Tensor) -> torch.Tensor:
    """The values NF4 stores for `weight` with the block maxima kept in fp32 (no double quantisation:
    bitsandbytes' compress_statistics=False, as LoftQ uses it), in fp32 and the weight's shape."""
    codes, absmax = _blockwise_codes(weight, BLOCK, NF4_LEVELS.to(weight.device))
    values = NF4_LEVELS.to(weight.device)[codes.long()] * absmax.repeat_interleave(BLOCK)[: weight.numel()]
    return values.reshape(weight.shape)


def reference_dequantize_nf4(q: NF4Weight, dtype=torch.float32) -> torch.Tensor:
    n = int(torch.tensor(q.shape).prod())
    absmax = (
        dynamic_map().to(q.packed.device)[q.absmax_codes.long()]
        * q.absmax_scales.repeat_interleave(ABSMAX_BLOCK)[: len(q.absmax_codes)]
        + q.absmax_mean
    )
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = NF4_LEVELS.to(q.packed.device)[codes] * absmax.repeat_interleave(BLOCK)[:n]
    return values.reshape(q.shape).to(dtype)


@functools.lru_cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 levels and the 8-bit code on a device, copied there once (a copy per call would also
    stop the dequantisation from being captured in a CUDA graph)."""
    return NF4_LEVELS.to(device), dynamic_map().to(device)


@triton.jit
def _dequantize_nf4(
    packed_ptr, absmax_codes_ptr, absmax_scales_ptr, levels_ptr, code8_ptr, out_ptr, n, mean, BLOCKS: tl.constexpr
):
    """Each program expands BLOCKS blocks of 64 values (32 packed bytes each), dequantising their maxima
    on the way; the two halves of each byte are interleaved in registers so that the stores are contiguous."""
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    byte = block[:, None] * 32 + tl.arange(0, 32)[None, :]  # (BLOCKS, 32)
    packed = tl.load(packed_ptr + byte, mask=byte < (n + 1) // 2, other=0).to(tl.int32)
    real = block < tl.cdiv(n, 64)
    code = tl.load(absmax_codes_ptr + block, mask=real, other=0).to(tl.int32)
    absmax = tl.load(code8_ptr + code) * tl.load(absmax_scales_ptr + block // 256, mask=real, other=0.0) + mean
    high = tl.load(levels_ptr + (packed >> 4)) * absmax[:, None]  # element 2i of the block
    low = tl.load(levels_ptr + (packed & 0xF)) * absmax[:, None]  # element 2i + 1
    values = tl.join(high, low).reshape(BLOCKS, 64)
    element = block[:, None] * 64 + tl.arange(0, 64)[None, :]
    tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < n)


def dequantize_nf4(q: NF4Weight, dtype=torch.bfloat16, blocks_per_program: int = 32) -> torch.Tensor:
    """The NF4 weight in `dtype` (the kernel where it can run)."""
    if not use_kernel(q.packed):
        return reference_dequantize_nf4(q, dtype)
    n = math.prod(q.shape)
    out = torch.empty(n, device=q.packed.device, dtype=dtype)
    levels, code8 = _tables(q.packed.device)
    # No fused multiply-add: c = code8 · c2 + μ is rounded twice, as PyTorch and bitsandbytes' CPU
    # code round it, so that the values are equal to the bit.
    _dequantize_nf4[(triton.cdiv(n, 64 * blocks_per_program),)](
        q.packed,
        q.absmax_codes,
        q.absmax_scales,
        levels,
        code8,
        out,
        n,
        q.absmax_mean,
        BLOCKS=blocks_per_program,
        enable_fp_fusion=False,
    )
    return out.reshape(q.shape)


class QLoRALinear(nn.Module):
    """An NF4-quantised frozen linear layer with a 16-bit LoRA adapter on top. The 4-bit state is
    kept as buffers (and the offset μ as extra state), so it moves with .to() and is saved in the
    state_dict, but is never trained.
    There is no merge: s·BA added to W would have to be quantised again, losing the adapter's precision."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 16.0, compute_dtype=torch.bfloat16):
        super().__init__()
        q = quantize_nf4(base.weight.detach())
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax_codes", q.absmax_codes)
        self.register_buffer("absmax_scales", q.absmax_scales)
        self.absmax_mean, self.shape = q.absmax_mean, q.shape
        self.bias = (
            None if base.bias is None else nn.Parameter(base.bias.detach().to(compute_dtype), requires_grad=False)
        )
        self.compute_dtype, self.scale = compute_dtype, alpha / r
        device = base.weight.device
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=compute_dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=compute_dtype))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)

    def get_extra_state(self) -> dict:  # saved in the state_dict beside the buffers
        return {"absmax_mean": self.absmax_mean, "shape": self.shape}

    def set_extra_state(self, state: dict) -> None:
        self.absmax_mean, self.shape = state["absmax_mean"], tuple(state["shape"])

    @property
    def weight(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax_codes, self.absmax_scales, self.absmax_mean, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = dequantize_nf4(self.weight, self.compute_dtype)  # 16-bit for this product only, then dropped
        return fused_lora(x.to(self.compute_dtype), W, self.A, self.B, self.scale, self.bias)


def inject_qlora(
    model: nn.Module, target_names: list[str], r: int = 16, alpha: float = 16.0, compute_dtype=torch.bfloat16
) -> list[str]:
    """Quantise the named nn.Linear layers to NF4, put a LoRA adapter on each, freeze all else.
    (The paper adapts every linear layer of the Transformer blocks.)"""
    targets = find_targets(model, target_names)
    for name in targets:
        replace_module(model, name, QLoRALinear(model.get_submodule(name), r, alpha, compute_dtype))
    freeze_all_but(model, QLoRALinear, ("A", "B"))
    return targets


def storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the NF4 layers' 4-bit state, bytes the same weights take in 16 bits)."""
    layers = [module for module in model.modules() if isinstance(module, QLoRALinear)]
    four_bit = sum(
        sum(buffer.numel() * buffer.element_size() for buffer in layer.buffers()) + 4  # + the fp32 mean
        for layer in layers
    )
    return four_bit, sum(2 * math.prod(layer.shape) for layer in layers)


def demo() -> None:
    """Quantise the toy model's three linear layers to NF4 and train only the LoRA adapters on top (CPU, fp32)."""
    x, y = toy_task()
    model = toy_model()
    with torch.no_grad():
        full_precision = model(x)
    inject_qlora(model, ["0", "2", "4"], r=4, alpha=8, compute_dtype=torch.float32)
    with torch.no_grad():
        error = (model(x) - full_precision).norm() / full_precision.norm()
    four_bit, sixteen_bit = storage_bytes(model)
    print(
        f"NF4 base: {four_bit:,} bytes instead of {sixteen_bit:,} in 16 bits; "
        f"output changed by {100 * error:.1f}% (relative) by the quantisation"
    )
    before, after = train(model, x, y)
    trainable, _ = count_parameters(model)
    frozen = sum(math.prod(layer.shape) for layer in model.modules() if isinstance(layer, QLoRALinear))
    print(
        f"QLoRA r=4: {trainable:,} trainable parameters beside {frozen:,} frozen 4-bit weights "
        f"({100 * trainable / (trainable + frozen):.2f}%)"
    )
    print(f"loss on the new task: {before:.4g} before, {after:.4g} after training")


if __name__ == "__main__":
    demo()
