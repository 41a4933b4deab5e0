"""NF4 with double quantisation against bitsandbytes (bit for bit), the kernel against its twin, QLoRALinear."""

import pytest
import torch

from reference_impls._plumbing import count_parameters
from reference_impls.kernels.nf4 import (
    NF4_LEVELS,
    NF4Weight,
    QLoRALinear,
    dequantize_nf4,
    dynamic_map,
    inject_qlora,
    quantize_nf4,
    reference_dequantize_nf4,
    storage_bytes,
)

from helpers import demo_losses, run_demo, spy

try:  # the oracle; CI installs it, the GPU machine has none (its tests of the kernel still run there)
    import bitsandbytes.functional as bnb
except ImportError:
    bnb = None
needs_bitsandbytes = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_bitsandbytes
def test_code_tables_equal_bitsandbytes():
    assert torch.equal(NF4_LEVELS, bnb.get_4bit_type("nf4", device="cpu").cpu())
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map(signed=True))


def from_bitsandbytes(packed, state) -> NF4Weight:
    return NF4Weight(packed.flatten(), state.absmax, state.state2.absmax, float(state.offset), tuple(state.shape))


@pytest.mark.parametrize("shape", [(64, 64), (37, 51), (3, 7), (300, 257), (512, 512)])
@needs_bitsandbytes
def test_quantisation_matches_bitsandbytes(shape):
    W = torch.randn(*shape) * torch.rand(shape[0], 1) * 3  # rows of different scales
    packed, state = bnb.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(W)
    # Bit for bit: the 4-bit codes, the second-level scales and the offset.
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax_scales, state.state2.absmax)
    assert ours.absmax_mean == float(state.offset)
    # The 8-bit codes of the block maxima: equal, except where bitsandbytes' approximate search took
    # a neighbour (one step, or two among the dense codes near zero); there ours is strictly nearer.
    code = dynamic_map()
    block_max = torch.stack([W.reshape(-1)[i : i + 64].abs().max() for i in range(0, W.numel(), 64)])
    target = (block_max - ours.absmax_mean) / ours.absmax_scales.repeat_interleave(256)[: len(block_max)]
    differ = (ours.absmax_codes != state.absmax).nonzero().flatten()
    assert len(differ) <= max(2, len(block_max) // 20)
    for i in differ.tolist():
        mine, theirs = int(ours.absmax_codes[i]), int(state.absmax[i])
        assert abs(mine - theirs) <= 2 and (code[mine] - code[theirs]).abs() < 0.02
        assert (target[i] - code[mine]).abs() < (target[i] - code[theirs]).abs()


@pytest.mark.parametrize("shape", [(64, 64), (37, 51), (3, 7), (300, 257)])
@needs_bitsandbytes
def test_dequantisation_is_bit_for_bit_bitsandbytes_on_its_own_state(shape):
    W = torch.randn(*shape) * 2
    packed, state = bnb.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    expected = bnb.dequantize_4bit(packed, state)
    stored = from_bitsandbytes(packed, state)
    assert torch.equal(reference_dequantize_nf4(stored), expected)
    assert torch.equal(dequantize_nf4(stored, torch.float32, blocks_per_program=4), expected)  # the kernel


@pytest.mark.parametrize("shape", [(37, 51), (130, 64), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_equals_reference(shape, dtype):
    q = quantize_nf4(torch.randn(*shape, device=DEVICE))
    out = dequantize_nf4(q, dtype, blocks_per_program=8)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, reference_dequantize_nf4(q, dtype))


def test_quantisation_error_is_small_and_zero_is_exact():
    W = torch.randn(128, 96)
    W[0, :64] = 0  # a whole block of zeros stays zero
    restored = reference_dequantize_nf4(quantize_nf4(W))
    assert torch.equal(restored[0, :64], torch.zeros(64))
    assert ((restored - W).norm() / W.norm()).item() < 0.12  # 4 bits per weight


def test_qlora_linear_trains_only_the_adapter_and_computes_lora_on_nf4(monkeypatch):
    from reference_impls.kernels import fused_lora, nf4

    launches = spy(monkeypatch, fused_lora, "lora_gemm")
    fallbacks = [
        spy(monkeypatch, nf4, "reference_dequantize_nf4"),
        spy(monkeypatch, fused_lora, "reference_fused_lora"),
    ]
    base = torch.nn.Linear(48, 40).to(DEVICE)
    layer = QLoRALinear(base, r=4, alpha=8, compute_dtype=torch.float32)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(6, 48, device=DEVICE)
    W = reference_dequantize_nf4(layer.weight)
    expected = x @ W.T + base.bias + 2.0 * (x @ layer.A.T) @ layer.B.T
    y = layer(x)
    assert ((y - expected).norm() / expected.norm()).item() < 1e-4
    # Both kernels ran (on CUDA, or in the interpreter): the GEMM was launched, no PyTorch twin was called.
    assert len(launches) == 1 and fallbacks == [[], []]
    y.sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None and not layer.bias.requires_grad
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["A", "B"]


class Block(torch.nn.Module):
    """Odd widths, a layer that stays in full precision, and one without bias."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(37, 70), torch.nn.Linear(70, 37, bias=False)
        self.head = torch.nn.Linear(37, 5)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def test_inject_qlora_quantises_the_targets_and_trains_only_the_adapters():
    torch.manual_seed(0)
    model = Block().to(DEVICE)
    with torch.no_grad():  # what the model computes with its weights rounded to NF4 (B = 0 at the start)
        rounded = Block().to(DEVICE)
        rounded.load_state_dict(model.state_dict())
        for name in ("up", "down"):
            layer = getattr(rounded, name)
            layer.weight.copy_(reference_dequantize_nf4(quantize_nf4(layer.weight)))
    assert inject_qlora(model, ["up", "down"], r=3, alpha=6, compute_dtype=torch.float32) == ["up", "down"]
    assert count_parameters(model)[0] == 3 * (37 + 70) + 3 * (70 + 37)  # r (K + N) per layer
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"up.A", "up.B", "down.A", "down.B"}
    x = torch.randn(11, 37, device=DEVICE)
    torch.testing.assert_close(model(x), rounded(x))
    # 4 bits per weight, plus one 8-bit code per 64 weights and an fp32 scale and mean per layer.
    assert storage_bytes(model) == (37 * 70 // 2 + 41 + 4 + 4 + 37 * 70 // 2 + 41 + 4 + 4, 2 * 2 * 37 * 70)

    with torch.no_grad():
        model.up.B.normal_()
    fresh = Block().to(DEVICE)  # other random weights: everything must come from the state_dict
    inject_qlora(fresh, ["up", "down"], r=3, alpha=6, compute_dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


def test_demo_runs_and_learns():
    output = run_demo("reference_impls.kernels.nf4")
    ((before, after),) = demo_losses(output)
    assert after < 0.1 * before
