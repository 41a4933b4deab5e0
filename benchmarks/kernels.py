"""Check every Triton kernel against its reference, then time it beside PEFT, plain PyTorch and the floor.

    python benchmarks/kernels.py --out FILE    on a GPU: checks in bf16 and fp32, then timings; the
                                               default FILE is benchmarks/results/kernels-<device>.json
    python benchmarks/kernels.py --smoke       on a CPU: the same script end to end, through Triton's
                                               interpreter on tiny shapes (timings printed, not judged)
    --only fused_lora,punica                   some sections only (see SECTIONS)

On the device machine (no network, its own torch, Triton and PEFT; nothing to install), from the
repository root: `PYTHONUNBUFFERED=1 python3 benchmarks/kernels.py --out $OUT/kernels-h100.json`.
The JSON is rewritten after every section, so a run cut short keeps what it measured; a section
that fails is recorded as an error row and the others still run.

Timing (GPU): each variant is captured in a CUDA graph that runs it over several distinct input
sets whose total size exceeds the L2 cache, so every call reads its operands from memory; the
median of the graph's replays, divided by the number of sets, is the time of one call. Variants
that do host work in every call (PEFT's mixed-adapter batch groups rows by name) or cannot be
captured are timed over the same rotating calls with CUDA events instead, host work included; each
row says how each variant was timed. The floor is the larger of bytes moved / measured copy
bandwidth and flops / measured GEMM rate, both measured in this run.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace as Namespace

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import torch  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from catalog.store import write_atomically  # noqa: E402
from reference_impls.kernels import fused_lora as fused_lora_module  # noqa: E402
from reference_impls.kernels.dora import FusedDoRAFunction, reference_dora  # noqa: E402
from reference_impls.kernels.fused_lora import FusedLoRAFunction, lora_gemm, reference_fused_lora  # noqa: E402
from reference_impls.kernels.nf4 import dequantize_nf4, quantize_nf4, reference_dequantize_nf4  # noqa: E402
from reference_impls.kernels.punica import (  # noqa: E402
    bgmv,
    bgmv_table,
    reference_shrink_expand,
    segments_of,
    sgmv,  # noqa: E402
    stacked_table,
)
from reference_impls.kernels.slora import AdapterPool, SLoRALinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
L2_BYTES = 64 * 2**20  # at least an H100/H200's L2 (50-60 MB): rotate through more than this
MAX_SETS = 64


def relative_error(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def tolerance(dtype) -> float:
    return 1e-2 if dtype == torch.bfloat16 else (2e-2 if dtype == torch.float16 else 1e-3)


def check_row(kernel, shape, dtype, error, limit=None) -> dict:
    limit = tolerance(dtype) if limit is None else limit
    return {
        "kernel": kernel,
        "shape": shape,
        "dtype": dtype_name(dtype),
        "max_relative_error": error,
        "limit": limit,
        "ok": error <= limit,
    }


# ---- timing ------------------------------------------------------------------------------------


def input_sets(set_bytes: int) -> int:
    """How many distinct input sets to rotate through so that together they exceed the L2 cache."""
    if DEVICE != "cuda":
        return 1
    return max(2, min(MAX_SETS, L2_BYTES // max(set_bytes, 1) + 1))


def time_variants(build, calls: dict, set_bytes: int, repeats: int, graph: bool = True, eager=()) -> tuple[dict, dict]:
    """Median milliseconds of one call of each variant, and how each was timed.

    build() makes one input set (a namespace), as many distinct ones as rotating past L2 takes;
    calls[name](input_set) runs a variant on one. graph=False for autograd's backward, which
    allocates as it goes; the variants named in `eager` do host-side work in every call, so they
    are timed with events, not captured."""
    sets = [build() for _ in range(input_sets(set_bytes) if graph else 1)]
    times, methods = {}, {}
    for name, call in calls.items():
        bound = [functools.partial(call, input_set) for input_set in sets]
        times[name], methods[name] = _time_calls(bound, repeats, graph and name not in eager)
    return times, methods


def _time_calls(calls, repeats: int, graph: bool) -> tuple[float, str]:
    if DEVICE != "cuda":  # smoke: wall clock, never judged
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            calls[0]()
            samples.append((time.perf_counter() - started) * 1e3)
        return statistics.median(samples), "wall clock (interpreter)"
    for call in calls * 2:  # warm-up: compilation, autotuning, allocator
        call()
    torch.cuda.synchronize()
    if graph:
        try:
            cuda_graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.cuda.graph(cuda_graph):
                for call in calls:
                    call()
            torch.cuda.synchronize()
            return _event_median(cuda_graph.replay, repeats, per_run=len(calls)), "cuda graph"
        except RuntimeError as error:  # e.g. host-side work inside the call
            print(f"    (not capturable, timed with events: {str(error).splitlines()[0][:100]})")
            torch.cuda.synchronize()

    def run_all():
        for call in calls:
            call()

    return _event_median(run_all, repeats, per_run=len(calls)), "cuda events"


def _event_median(run, repeats: int, per_run: int) -> float:
    """Median over `repeats` of run()'s device time between two CUDA events, divided by per_run."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / per_run)
    return statistics.median(samples)


def measure_ceilings(dtype, repeats) -> dict:
    """Copy bandwidth (bytes read + written per second) and GEMM rate, measured now on this device."""
    n = 2**27 if DEVICE == "cuda" else 2**16  # 256 MB of bf16 on a GPU: far larger than L2
    source = torch.randn(n, device=DEVICE, dtype=dtype)
    target = torch.empty_like(source)
    size = 8192 if DEVICE == "cuda" else 128
    a, b = torch.randn(size, size, device=DEVICE, dtype=dtype), torch.randn(size, size, device=DEVICE, dtype=dtype)
    times, _ = time_variants(
        lambda: Namespace(source=source, target=target, a=a, b=b),
        {"copy": lambda s: s.target.copy_(s.source), "gemm": lambda s: s.a @ s.b},
        2 * source.numel() * source.element_size(),
        repeats,
    )
    return {
        "copy_bytes_per_s": 2 * source.numel() * source.element_size() / (times["copy"] / 1e3),
        "gemm_flops_per_s": 2 * size**3 / (times["gemm"] / 1e3),
    }


def floor_ms(bytes_moved: float, flops: float, ceilings: dict) -> float:
    return 1e3 * max(bytes_moved / ceilings["copy_bytes_per_s"], flops / ceilings["gemm_flops_per_s"])


def timing_row(kernel, shape, times, methods, base="base", goal=None, floor=None, **extra) -> dict:
    """ours / base and every other variant / base, the floor / base, the goal and whether it was met."""
    row = {"kernel": kernel, "shape": shape, **{f"{name}_ms": ms for name, ms in times.items()}}
    for name, ms in times.items():
        if name != base:
            row[f"{name}_over_{base}"] = ms / times[base]
    if floor is not None:
        row["floor_ms"], row["floor_over_base"] = floor, floor / times[base]
    row["timed_with"] = methods
    row["goal_ours_over_base"], row["goal_met"] = goal, None if goal is None else times["ours"] / times[base] <= goal
    return {**row, **extra}


# ---- the fused LoRA linear ---------------------------------------------------------------------


def lora_inputs(M, K, N, r, dtype, requires_grad=False):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    W = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
    A = (torch.randn(r, K, device=DEVICE, dtype=dtype) / K**0.5).requires_grad_(requires_grad)
    B = torch.randn(N, r, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
    return x, W, A, B


def peft_lora_layer(W, A, B, r, **config):
    """PEFT's LoRA (or DoRA) around nn.Linear(W), with our A and B."""
    from peft import LoraConfig, inject_adapter_in_model

    base = nn.Sequential(nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype))
    with torch.no_grad():
        base[0].weight.copy_(W)
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["0"], **config), base)
    with torch.no_grad():
        model[0].lora_A["default"].weight.copy_(A)
        model[0].lora_B["default"].weight.copy_(B)
    return model


def check_fused_lora(shapes, dtypes) -> list[dict]:
    rows = []
    for M, K, N, r in shapes:
        for dtype in dtypes:
            x, W, A, B = lora_inputs(M, K, N, r, dtype, requires_grad=True)
            y = FusedLoRAFunction.apply(x, W, A, B, 1.0, None)
            expected = reference_fused_lora(x.double(), W.double(), A.double(), B.double(), 1.0)
            dy = torch.randn_like(y)
            y.backward(dy)
            grads = [t.grad.clone() for t in (x, A, B)]
            xd, Ad, Bd = (t.detach().double().requires_grad_() for t in (x, A, B))
            reference_fused_lora(xd, W.double(), Ad, Bd, 1.0).backward(dy.double())
            errors = [relative_error(y, expected)] + [relative_error(g, e.grad) for g, e in zip(grads, (xd, Ad, Bd))]
            rows.append(check_row("fused_lora (fwd+bwd)", f"M={M} K={K} N={N} r={r}", dtype, max(errors)))
    return rows


def time_fused_lora(token_counts, K, N, r, dtype, ceilings, repeats) -> list[dict]:
    """Forward at each token count: ours (u made in the kernel, and u made before it), PEFT, the base GEMM."""
    rows = []
    size = torch.tensor([], dtype=dtype).element_size()
    for M in token_counts:

        def build():
            x, W, A, B = lora_inputs(M, K, N, r, dtype)
            return Namespace(x=x, W=W, A=A, B=B, peft=peft_lora_layer(W, A, B, r))

        calls = {
            "shrink_in_kernel": lambda s: lora_gemm(s.x, s.W, s.B, 1.0, A_rk=s.A),
            "shrink_before": lambda s: lora_gemm(s.x, s.W, s.B, 1.0, u=s.x @ s.A.T),
            "peft": lambda s: s.peft(s.x),
            "base": lambda s: nn.functional.linear(s.x, s.W),
        }
        set_bytes = (M * K + N * K + M * N + r * (K + N)) * size
        with torch.no_grad():
            times, methods = time_variants(build, calls, set_bytes, repeats)
        picked = "shrink_in_kernel" if fused_lora_module.shrink_in_kernel(M) else "shrink_before"
        times["ours"], methods["ours"] = times[picked], methods[picked]
        flops = 2 * M * N * K + 2 * M * r * (K + N)
        rows.append(
            timing_row(
                "fused_lora forward",
                f"M={M} K={K} N={N} r={r}",
                times,
                methods,
                goal=1.25 if M <= 128 else 1.10,
                floor=floor_ms(set_bytes, flops, ceilings),
                ours_is=picked,
            )
        )
    return rows


def time_training_step(M, K, N, r, dtype, ceilings, repeats) -> dict:
    """Forward and backward with W frozen: ours, PEFT, and the frozen base alone (x still needs its gradient)."""

    def build():
        x, W, A, B = lora_inputs(M, K, N, r, dtype, requires_grad=True)
        peft_layer = peft_lora_layer(W, A, B, r)
        for parameter in peft_layer.parameters():
            parameter.requires_grad_(parameter is not peft_layer[0].weight)
        return Namespace(x=x, W=W, A=A, B=B, peft=peft_layer, dy=torch.randn(M, N, device=DEVICE, dtype=dtype))

    steps = {
        "ours": lambda s: FusedLoRAFunction.apply(s.x, s.W, s.A, s.B, 1.0, None).backward(s.dy),
        "peft": lambda s: s.peft(s.x).backward(s.dy),
        "base": lambda s: nn.functional.linear(s.x, s.W).backward(s.dy),
    }
    # One set of operands (x, W, dy: 200 MB at 8,192 tokens) is far larger than L2: no rotation needed.
    times, methods = time_variants(build, steps, 0, repeats, graph=False)
    flops = 4 * M * N * K + 8 * M * r * (K + N)  # two big GEMMs; the thin products of both passes
    bytes_moved = (2 * (M * K + N * K + M * N) + 2 * r * (K + N)) * torch.tensor([], dtype=dtype).element_size()
    return timing_row(
        "LoRA training step (fwd+bwd, frozen W)",
        f"M={M} K={K} N={N} r={r}",
        times,
        methods,
        goal=1.10,
        floor=floor_ms(bytes_moved, flops, ceilings),
    )


# ---- DoRA ---------------------------------------------------------------------------------------


def check_dora(shapes, dtypes) -> list[dict]:
    rows = []
    for M, K, N, r in shapes:
        for dtype in dtypes:
            x, W, A, B = lora_inputs(M, K, N, r, dtype, requires_grad=True)
            m = torch.rand(N, device=DEVICE, dtype=dtype).add(0.5).requires_grad_()
            y = FusedDoRAFunction.apply(x, W, A, B, m, 1.0, None)
            dy = torch.randn_like(y)
            y.backward(dy)
            grads = [t.grad.clone() for t in (x, A, B, m)]
            leaves = [t.detach().double().requires_grad_() for t in (x, A, B, m)]
            expected = reference_dora(leaves[0], W.double(), leaves[1], leaves[2], leaves[3], 1.0)
            expected.backward(dy.double())
            errors = [relative_error(y, expected)] + [relative_error(g, e.grad) for g, e in zip(grads, leaves)]
            rows.append(
                check_row("dora (norm + rescaled GEMM, fwd+bwd)", f"M={M} K={K} N={N} r={r}", dtype, max(errors))
            )
    return rows


def time_dora_forward(M, K, N, r, dtype, ceilings, repeats) -> dict:
    def build():
        x, W, A, B = lora_inputs(M, K, N, r, dtype)
        peft_model = peft_lora_layer(W, A, B, r, use_dora=True).eval()
        return Namespace(
            x=x,
            W=W,
            A=A,
            B=B,
            peft=peft_model,
            m=peft_model[0].lora_magnitude_vector["default"].weight.detach().clone(),
        )

    calls = {
        "ours": lambda s: FusedDoRAFunction.apply(s.x, s.W, s.A, s.B, s.m, 1.0, None),
        "peft": lambda s: s.peft(s.x),
        "base": lambda s: nn.functional.linear(s.x, s.W),
    }
    size = torch.tensor([], dtype=dtype).element_size()
    set_bytes = (M * K + N * K + M * N) * size
    with torch.no_grad():
        times, methods = time_variants(build, calls, set_bytes, repeats)
    # The floor reads W twice (its norm, then the GEMM): W can be 32 MB, too much to count on L2.
    floor = floor_ms(set_bytes + N * K * size, 2 * M * N * K + 2 * M * r * (K + N) + 2 * N * K * r, ceilings)
    return timing_row("dora forward", f"M={M} K={K} N={N} r={r}", times, methods, floor=floor)


# ---- QLoRA's NF4 -------------------------------------------------------------------------------


def check_nf4(shape, dtypes) -> list[dict]:
    rows = []
    q = quantize_nf4(torch.randn(*shape, device=DEVICE))
    for dtype in dtypes:
        mismatches = int((dequantize_nf4(q, dtype) != reference_dequantize_nf4(q, dtype)).sum())
        rows.append(
            check_row(
                "nf4 dequantize (values differing from the reference)",
                f"{shape[0]}x{shape[1]}",
                dtype,
                float(mismatches),
                limit=0.0,
            )
        )
    return rows


def time_nf4_dequantize(shape, dtype, ceilings, repeats) -> dict:
    """Bytes moved (4-bit codes, 8-bit block maxima, 16-bit output) over time, against copy bandwidth;
    bitsandbytes' own CUDA kernel beside it where bitsandbytes is installed."""
    n = shape[0] * shape[1]
    moved = n // 2 + n // 64 + n * torch.tensor([], dtype=dtype).element_size()
    times, methods = time_variants(
        lambda: Namespace(q=quantize_nf4(torch.randn(*shape, device=DEVICE))),
        {"ours": lambda s: dequantize_nf4(s.q, dtype)},
        moved,
        repeats,
    )
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None
        print("    (bitsandbytes is not installed: no comparison with its kernel)")
    if bnb is not None and DEVICE == "cuda":

        def quantized():
            packed, state = bnb.quantize_4bit(
                torch.randn(*shape, device=DEVICE, dtype=dtype),
                blocksize=64,
                quant_type="nf4",
                compress_statistics=True,
            )
            return Namespace(packed=packed, state=state)

        theirs, how = time_variants(
            quantized, {"bitsandbytes": lambda s: bnb.dequantize_4bit(s.packed, s.state)}, moved, repeats
        )
        times, methods = times | theirs, methods | how
    fraction = moved / (times["ours"] / 1e3) / ceilings["copy_bytes_per_s"]
    return {
        "kernel": "nf4 dequantize",
        "shape": f"{shape[0]}x{shape[1]} -> {dtype_name(dtype)}",
        **{f"{name}_ms": ms for name, ms in times.items()},
        "timed_with": methods,
        "bytes_moved": moved,
        "achieved_bytes_per_s": moved / (times["ours"] / 1e3),
        "fraction_of_copy_bandwidth": fraction,
        "goal_fraction_of_copy_bandwidth": 0.8,
        "goal_met": fraction >= 0.8,
    }


# ---- Punica and S-LoRA: many adapters in one batch -------------------------------------------


def check_punica(M, K, N, r, L, dtypes) -> list[dict]:
    rows = []
    for dtype in dtypes:
        x, y = torch.randn(M, K, device=DEVICE, dtype=dtype), torch.randn(M, N, device=DEVICE, dtype=dtype)
        A = torch.randn(L, r, K, device=DEVICE, dtype=dtype) / K**0.5
        B = torch.randn(L, N, r, device=DEVICE, dtype=dtype)
        per_row = torch.randint(-1, L, (M,), device=DEVICE)
        segmented = per_row.sort().values
        expected_row = reference_shrink_expand(y.double(), x.double(), A.double(), B.double(), per_row, 1.0)
        expected_seg = reference_shrink_expand(y.double(), x.double(), A.double(), B.double(), segmented, 1.0)
        errors = {
            "bgmv": relative_error(bgmv(y.clone(), x, A, B, per_row.to(torch.int32), 1.0), expected_row),
            "sgmv": relative_error(sgmv(y.clone(), x, A, B, *segments_of(segmented), 1.0), expected_seg),
        }
        for name, error in errors.items():
            rows.append(check_row(f"punica {name}", f"M={M} K={K} N={N} r={r} L={L}", dtype, error))
    return rows


def check_slora(K, N, ranks, dtypes) -> list[dict]:
    """Adapters of mixed ranks on shuffled pages, one evicted and another loaded, prefill and decode."""
    rows = []
    for dtype in dtypes:
        order = torch.randperm(sum(ranks) + 8).tolist()
        pool = AdapterPool(len(order), K, N, device=DEVICE, dtype=dtype, page_order=order)
        adapters = {
            f"a{i}": (
                torch.randn(rank, K, device=DEVICE, dtype=dtype) / K**0.5,
                torch.randn(N, rank, device=DEVICE, dtype=dtype),
                float(rank),
            )
            for i, rank in enumerate(ranks)
        }
        for name, (A, B, alpha) in list(adapters.items())[:-1]:
            pool.load(name, A, B, alpha)
        pool.evict("a0")
        pool.load(f"a{len(ranks) - 1}", *adapters[f"a{len(ranks) - 1}"])
        live = [name for name in adapters if name != "a0"]
        base = nn.Linear(K, N, device=DEVICE, dtype=dtype)
        layer = SLoRALinear(base, pool)
        for label, names in (
            ("prefill", [name for name in live for _ in range(17)] + [None] * 3),
            ("decode", live + [None] + live[::-1]),
        ):
            x = torch.randn(len(names), K, device=DEVICE, dtype=dtype)
            with torch.no_grad():
                expected = base(x).double()
            for row, name in enumerate(names):
                if name is not None:
                    A, B, alpha = adapters[name]
                    expected[row] += (alpha / A.shape[0]) * (x[row].double() @ A.double().T) @ B.double().T
            rows.append(
                check_row(
                    f"s-lora {label}", f"K={K} N={N} ranks={ranks}", dtype, relative_error(layer(x, names), expected)
                )
            )
    return rows


def time_decode_many_adapters(requests, K, N, r, dtype, ceilings, repeats) -> dict:
    """`requests` decode rows, each on its own adapter: our BGMV, gather + bmm, PEFT's mixed batch, base.
    The adapters' page table is built once, as a server builds it when adapters are loaded."""
    from peft import LoraConfig, inject_adapter_in_model

    def build():
        x = torch.randn(requests, K, device=DEVICE, dtype=dtype)
        W = torch.randn(N, K, device=DEVICE, dtype=dtype) / K**0.5
        A = torch.randn(requests, r, K, device=DEVICE, dtype=dtype) / K**0.5
        B = torch.randn(requests, N, r, device=DEVICE, dtype=dtype)
        ids = torch.arange(requests, device=DEVICE, dtype=torch.int32)
        base = nn.Sequential(nn.Linear(K, N, bias=False, device=DEVICE, dtype=dtype))
        with torch.no_grad():
            base[0].weight.copy_(W)
        for index in range(requests):
            inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["0"]), base, adapter_name=f"a{index}")
        with torch.no_grad():
            for index in range(requests):
                base[0].lora_A[f"a{index}"].weight.copy_(A[index])
                base[0].lora_B[f"a{index}"].weight.copy_(B[index])
        return Namespace(
            x=x,
            W=W,
            A=A,
            B=B,
            ids=ids,
            table=stacked_table(A, B, 1.0),
            peft=base,
            A_rows=A[ids.long()].transpose(1, 2),
            B_rows=B[ids.long()].transpose(1, 2),
        )

    names = [f"a{index}" for index in range(requests)]
    calls = {
        "ours": lambda s: bgmv_table(nn.functional.linear(s.x, s.W), s.x, s.table, s.ids),
        "gather_bmm": lambda s: (
            nn.functional.linear(s.x, s.W)
            + torch.bmm(
                torch.bmm(s.x.unsqueeze(1), s.A[s.ids.long()].transpose(1, 2)), s.B[s.ids.long()].transpose(1, 2)
            ).squeeze(1)
        ),
        "bmm_pregathered": lambda s: (
            nn.functional.linear(s.x, s.W) + torch.bmm(torch.bmm(s.x.unsqueeze(1), s.A_rows), s.B_rows).squeeze(1)
        ),
        "peft": lambda s: s.peft[0](s.x, adapter_names=names),
        "base": lambda s: nn.functional.linear(s.x, s.W),
    }
    size = torch.tensor([], dtype=dtype).element_size()
    set_bytes = (requests * K + N * K + requests * N + requests * r * (K + N)) * size
    with torch.no_grad():
        times, methods = time_variants(
            build, calls, set_bytes, repeats, eager={"peft"}
        )  # PEFT groups the rows by adapter name on the host
    flops = 2 * requests * N * K + 2 * requests * r * (K + N)
    return timing_row(
        "punica bgmv decode, one adapter per request",
        f"M={requests} K={K} N={N} r={r}",
        times,
        methods,
        goal=1.3,
        floor=floor_ms(set_bytes, flops, ceilings),
    )


# ---- main --------------------------------------------------------------------------------------

SECTIONS = ("fused_lora", "dora", "nf4", "punica", "slora")
MODULE_OF = {
    "fused_lora": "kernels.fused_lora",
    "LoRA training": "kernels.fused_lora",
    "dora": "kernels.dora",
    "punica": "kernels.punica",
    "s-lora": "kernels.slora",
    "slora": "kernels.slora",
    "nf4": "kernels.nf4",
}


def plan(smoke: bool):
    """(section, kind, label, function) in the order they run: every check, then the ceilings, then every timing."""
    if smoke:
        dtype, check_dtypes, repeats = torch.float32, [torch.float32, torch.float16], 3
        check_shapes, K, N, r, token_counts, train_tokens = [(7, 48, 40, 4)], 64, 48, 4, [1, 9], 9
        nf4_shape, punica_check, slora_check, requests = (37, 130), (23, 48, 40, 4, 5), (48, 40, [2, 5, 16, 7]), 8
    else:
        dtype, check_dtypes, repeats = torch.bfloat16, [torch.bfloat16, torch.float32], 50
        check_shapes = [(1, 4096, 4096, 16), (77, 4096, 4096, 16), (1000, 1000, 1001, 13), (2000, 512, 768, 8)]
        K, N, r, token_counts, train_tokens = 4096, 4096, 16, [1, 16, 128, 1024, 8192], 8192
        nf4_shape, punica_check, slora_check, requests = (
            (4096, 11008),
            (1000, 4096, 4096, 16, 64),
            (4096, 4096, [8, 16, 64, 32, 4]),
            64,
        )
    checks = [
        ("fused_lora", lambda: check_fused_lora(check_shapes, check_dtypes)),
        ("dora", lambda: check_dora(check_shapes[:2], check_dtypes)),
        ("nf4", lambda: check_nf4(nf4_shape, check_dtypes)),
        ("punica", lambda: check_punica(*punica_check, check_dtypes)),
        ("slora", lambda: check_slora(*slora_check, check_dtypes)),
    ]
    timings = [
        ("fused_lora", lambda c: time_fused_lora(token_counts, K, N, r, dtype, c, repeats)),
        ("fused_lora", lambda c: [time_training_step(train_tokens, K, N, r, dtype, c, repeats)]),
        ("dora", lambda c: [time_dora_forward(train_tokens, K, N, r, dtype, c, repeats)]),
        ("punica", lambda c: [time_decode_many_adapters(requests, K, N, r, dtype, c, repeats)]),
        ("nf4", lambda c: [time_nf4_dequantize(nf4_shape if not smoke else (64, 256), dtype, c, repeats)]),
    ]
    return dtype, repeats, checks, timings


def run_section(section: str, run) -> list[dict]:
    """The rows of one part of the run; a failure becomes an error row (and a non-zero exit), not a lost run."""
    started = time.perf_counter()
    try:
        rows = run()
    except Exception as error:  # noqa: BLE001 (recorded and reported, and the run goes on)
        traceback.print_exc()
        rows = [{"kernel": section, "error": f"{type(error).__name__}: {error}"[:500], "ok": False, "goal_met": None}]
    print(f"  {section}: {len(rows)} rows in {time.perf_counter() - started:.1f} s", flush=True)
    return rows


def tuned_configs() -> dict:
    """The tile shapes the tuner kept for each key, for the record."""
    found = {}
    for name in ("_lora_gemm_few_rows", "_lora_gemm_many_rows"):
        for key, config in getattr(getattr(fused_lora_module, name), "cache", {}).items():
            found[f"{name}{list(key)}"] = str(config)
    return found


def environment() -> dict:
    versions = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    if DEVICE != "cuda":
        return {
            "device": f"CPU ({platform.processor() or platform.machine()}), Triton interpreter",
            "versions": versions,
        }
    properties = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(),
        "versions": versions,
        "multiprocessors": properties.multi_processor_count,
        "l2_bytes": getattr(properties, "L2_cache_size", None),
        "memory_bytes": properties.total_memory,
    }


def print_table(checks, timings, smoke: bool) -> None:
    print(f"\n{'kernel':<52} {'shape':<28} {'dtype':<8} {'rel. error':>10}  ok")
    for row in checks:
        if "error" in row:
            print(f"{row['kernel']:<52} ERROR {row['error']}")
            continue
        print(
            f"{row['kernel']:<52} {row['shape']:<28} {row['dtype']:<8} {row['max_relative_error']:>10.2e}  {row['ok']}"
        )
    print(
        f"\n{'timed (median of one call)':<52} {'shape':<28} {'ours ms':>9} {'ours/base':>9} {'PEFT/base':>9} "
        f"{'floor/base':>10} {'goal':>6}"
    )
    for row in timings:
        if "error" in row:
            print(f"{row['kernel']:<52} ERROR {row['error']}")
            continue
        verdict = "" if smoke or row["goal_met"] is None else ("  met" if row["goal_met"] else "  MISSED")
        if "fraction_of_copy_bandwidth" in row:
            print(
                f"{row['kernel']:<52} {row['shape']:<28} {row['ours_ms']:>9.4f} "
                f"{row['fraction_of_copy_bandwidth']:.3f} of the copy bandwidth (goal ≥ 0.80){verdict}"
            )
            continue
        floor = f"{row['floor_over_base']:.3f}" if "floor_over_base" in row else "-"
        goal = "-" if row["goal_ours_over_base"] is None else "≤" + format(row["goal_ours_over_base"], ".2f")
        print(
            f"{row['kernel']:<52} {row['shape']:<28} {row['ours_ms']:>9.4f} {row['ours_over_base']:>9.3f} "
            f"{row['peft_over_base']:>9.3f} {floor:>10} {goal:>6}{verdict}"
        )
        others = {
            key[: -len("_over_base")]: value
            for key, value in row.items()
            if key.endswith("_over_base") and key[: -len("_over_base")] not in ("ours", "peft", "floor", "goal_ours")
        }
        if others:
            print(f"{'':<52} " + ", ".join(f"{name}/base {value:.3f}" for name, value in others.items()))
    if smoke:
        print("\n(smoke run: interpreter on a CPU; the timings above say nothing about GPU speed)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes; timings not judged")
    parser.add_argument(
        "--out",
        help="where to write the JSON (default on a GPU: benchmarks/results/"
        "kernels-<device>.json; a smoke run writes one only when asked)",
    )
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    if DEVICE != "cuda" and not args.smoke:
        print("no CUDA device: run with --smoke on a CPU, or on the GPU machine", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        parser.error(f"unknown sections {sorted(only - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    torch.manual_seed(int(time.time()))  # fresh inputs on every run
    dtype, repeats, check_plan, timing_plan = plan(args.smoke)

    command = (
        "python benchmarks/kernels.py"
        + (" --smoke" if args.smoke else "")
        + (f" --only {args.only}" if args.only else "")
    )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "smoke": args.smoke,
        **environment(),
        "ceilings": None,
        "checks": [],
        "timings": [],
    }
    out = (
        Path(args.out)
        if args.out
        else (
            None
            if args.smoke
            else Path(__file__).resolve().parent / "results" / f"kernels-{result['device'].replace(' ', '_')}.json"
        )
    )

    def save():
        for row in result["checks"] + result["timings"]:  # which implementation page shows the row
            row["module"] = next(
                (module for prefix, module in MODULE_OF.items() if row["kernel"].startswith(prefix)), None
            )
        result["tuned_configs"] = tuned_configs()
        if out:  # rewritten after every section: atomically, so a run killed mid-write keeps the last one whole
            write_atomically(out, json.dumps(result, indent=1) + "\n")

    print(f"{result['device']}; {result['versions']}", flush=True)
    for section, run in check_plan:
        if section in only:
            result["checks"] += run_section(f"{section} checks", run)
            save()
    result["ceilings"] = measure_ceilings(dtype, repeats)
    print(
        f"  ceilings: copy {result['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"GEMM {result['ceilings']['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    for section, run in timing_plan:
        if section in only:
            result["timings"] += run_section(f"{section} timings", lambda run=run: run(result["ceilings"]))
            save()
    print_table(result["checks"], result["timings"], args.smoke)
    if out:
        print(f"wrote {out}")
    failed = [row for row in result["checks"] + result["timings"] if "error" in row or not row.get("ok", True)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
