"""Check every Triton kernel against its reference, then time it beside PEFT, plain PyTorch and the floor.

    python benchmarks/kernels.py            on a GPU: checks in bf16 and fp32, then timings; writes
                                            benchmarks/results/kernels-<device>.json
    python benchmarks/kernels.py --smoke    on a CPU: the same script end to end, through Triton's
                                            interpreter on tiny shapes (timings printed, not judged)

Timing (GPU): each variant is captured in a CUDA graph that runs it over several input sets whose
total size exceeds the L2 cache, so every run reads its operands from memory; the median of the
graph's replays, divided by the number of sets, is the time of one call. The floor is the larger of
bytes moved / measured copy bandwidth and flops / measured GEMM rate (both measured in the same run).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference_impls.kernels.dora import FusedDoRAFunction, reference_dora  # noqa: E402
from reference_impls.kernels.fused_lora import FusedLoRAFunction, reference_fused_lora  # noqa: E402
from reference_impls.kernels.nf4 import dequantize_nf4, quantize_nf4, reference_dequantize_nf4  # noqa: E402
from reference_impls.kernels.punica import bgmv, reference_shrink_expand, segments_of, sgmv  # noqa: E402
from reference_impls.kernels.slora import AdapterPool, SLoRALinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
L2_BYTES = 64 * 2 ** 20  # at least an H100/H200's L2 (50 MB): rotate through more than this


def relative_error(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


# ---- timing ------------------------------------------------------------------------------------

def time_call(make_call, set_bytes: int, repeats: int, graph: bool = True) -> float:
    """Median milliseconds of one call; make_call(i) returns a closure over input set i. With
    graph=False (autograd's backward, which allocates as it goes) the calls are timed with events."""
    sets = max(2, -(-L2_BYTES // max(set_bytes, 1))) if DEVICE == "cuda" and graph else 1
    calls = [make_call(i) for i in range(sets)]
    if DEVICE == "cuda" and not graph:
        for call in calls * 3:
            call()
        torch.cuda.synchronize()
        return _event_median(calls[0], repeats, per_run=1)
    if DEVICE != "cuda":  # smoke: wall clock, never judged
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            calls[0]()
            samples.append((time.perf_counter() - started) * 1e3)
        return statistics.median(samples)
    for call in calls:  # warm-up: compilation, autotuning, allocations
        call()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        for call in calls:
            call()
    torch.cuda.synchronize()
    return _event_median(graph.replay, repeats, per_run=len(calls))


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


def measure_ceilings(dtype) -> dict:
    """Copy bandwidth (bytes read + written per second) and GEMM rate, measured now on this device."""
    n = 2 ** 28 if DEVICE == "cuda" else 2 ** 20
    source = torch.randn(n // 2, device=DEVICE, dtype=dtype)
    target = torch.empty_like(source)
    copy_ms = time_call(lambda i: (lambda: target.copy_(source)), 0, 20)
    size = 8192 if DEVICE == "cuda" else 256
    a, b = torch.randn(size, size, device=DEVICE, dtype=dtype), torch.randn(size, size, device=DEVICE, dtype=dtype)
    gemm_ms = time_call(lambda i: (lambda: a @ b), 0, 10)
    return {"copy_bytes_per_s": 2 * source.numel() * source.element_size() / (copy_ms / 1e3),
            "gemm_flops_per_s": 2 * size ** 3 / (gemm_ms / 1e3)}


def floor_ms(bytes_moved: float, flops: float, ceilings: dict) -> float:
    return 1e3 * max(bytes_moved / ceilings["copy_bytes_per_s"], flops / ceilings["gemm_flops_per_s"])


# ---- the fused LoRA linear ---------------------------------------------------------------------

def lora_inputs(M, K, N, r, dtype, requires_grad=False):
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    W = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
    A = (torch.randn(r, K, device=DEVICE, dtype=dtype) / K ** 0.5).requires_grad_(requires_grad)
    B = torch.randn(N, r, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
    return x, W, A, B


def peft_lora_layer(W, A, B, r):
    from peft import LoraConfig, inject_adapter_in_model
    base = nn.Sequential(nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype))
    with torch.no_grad():
        base[0].weight.copy_(W)
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["0"]), base)
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
            limit = 1e-2 if dtype == torch.bfloat16 else (2e-2 if dtype == torch.float16 else 1e-3)
            rows.append({"kernel": "fused_lora", "shape": f"M={M} K={K} N={N} r={r}", "dtype": str(dtype).split(".")[-1],
                         "max_relative_error": max(errors), "limit": limit, "ok": max(errors) <= limit})
    return rows


def time_fused_lora(token_counts, K, N, r, dtype, ceilings, repeats) -> list[dict]:
    rows = []
    size = torch.tensor([], dtype=dtype).element_size()
    for M in token_counts:
        sets = []

        def make(kind):
            def make_call(i):
                while len(sets) <= i:
                    x, W, A, B = lora_inputs(M, K, N, r, dtype)
                    sets.append((x, W, A, B, peft_lora_layer(W, A, B, r)))
                x, W, A, B, peft_layer = sets[i]
                return {"ours": lambda: FusedLoRAFunction.apply(x, W, A, B, 1.0, None),
                        "peft": lambda: peft_layer(x),
                        "base": lambda: nn.functional.linear(x, W)}[kind]
            return make_call

        set_bytes = (M * K + N * K + M * N + r * (K + N)) * size
        with torch.no_grad():
            times = {kind: time_call(make(kind), set_bytes, repeats) for kind in ("ours", "peft", "base")}
        flops = 2 * M * N * K + 2 * M * r * (K + N)
        floor = floor_ms(set_bytes, flops, ceilings)
        goal = 1.25 if M <= 128 else 1.10
        rows.append({"kernel": "fused_lora forward", "shape": f"M={M} K={K} N={N} r={r}",
                     "ours_ms": times["ours"], "peft_ms": times["peft"], "base_ms": times["base"], "floor_ms": floor,
                     "ours_over_base": times["ours"] / times["base"], "peft_over_base": times["peft"] / times["base"],
                     "floor_over_base": floor / times["base"], "goal_ours_over_base": goal,
                     "goal_met": times["ours"] / times["base"] <= goal})
    return rows


def time_training_step(M, K, N, r, dtype, repeats) -> dict:
    """Forward and backward with W frozen: ours, PEFT, and the frozen base alone (x still needs its gradient)."""
    x, W, A, B = lora_inputs(M, K, N, r, dtype, requires_grad=True)
    peft_layer = peft_lora_layer(W, A, B, r)
    for parameter in peft_layer.parameters():
        parameter.requires_grad_(parameter is not peft_layer[0].weight)
    dy = torch.randn(M, N, device=DEVICE, dtype=dtype)
    step = {"ours": lambda: FusedLoRAFunction.apply(x, W, A, B, 1.0, None).backward(dy),
            "peft": lambda: peft_layer(x).backward(dy),
            "base": lambda: nn.functional.linear(x, W).backward(dy)}
    set_bytes = (M * K + N * K + M * N) * x.element_size()
    # At this size one set of operands is already larger than the L2 cache, so no rotation is needed.
    times = {kind: time_call(lambda i, call=call: call, set_bytes, repeats, graph=False) for kind, call in step.items()}
    return {"kernel": "LoRA training step (fwd+bwd, frozen W)", "shape": f"M={M} K={K} N={N} r={r}",
            "ours_ms": times["ours"], "peft_ms": times["peft"], "base_ms": times["base"],
            "ours_over_base": times["ours"] / times["base"], "peft_over_base": times["peft"] / times["base"],
            "goal_ours_over_base": 1.10, "goal_met": times["ours"] / times["base"] <= 1.10}


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
            limit = 1e-2 if dtype == torch.bfloat16 else (2e-2 if dtype == torch.float16 else 1e-3)
            rows.append({"kernel": "dora (norm + rescaled GEMM, fwd+bwd)", "shape": f"M={M} K={K} N={N} r={r}",
                         "dtype": str(dtype).split(".")[-1], "max_relative_error": max(errors), "limit": limit,
                         "ok": max(errors) <= limit})
    return rows


def time_dora_forward(M, K, N, r, dtype, repeats) -> dict:
    from peft import LoraConfig, inject_adapter_in_model
    x, W, A, B = lora_inputs(M, K, N, r, dtype)
    base = nn.Sequential(nn.Linear(K, N, bias=False, device=DEVICE, dtype=dtype))
    with torch.no_grad():
        base[0].weight.copy_(W)
    peft_model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["0"], use_dora=True), base)
    with torch.no_grad():
        peft_model[0].lora_A["default"].weight.copy_(A)
        peft_model[0].lora_B["default"].weight.copy_(B)
    m = peft_model[0].lora_magnitude_vector["default"].weight.detach().clone()
    peft_model.eval()
    calls = {"ours": lambda: FusedDoRAFunction.apply(x, W, A, B, m, 1.0, None), "peft": lambda: peft_model(x),
             "base": lambda: nn.functional.linear(x, W)}
    set_bytes = (M * K + N * K + M * N) * x.element_size()
    with torch.no_grad():
        times = {kind: time_call(lambda i, call=call: call, set_bytes, repeats) for kind, call in calls.items()}
    return {"kernel": "dora forward", "shape": f"M={M} K={K} N={N} r={r}", "ours_ms": times["ours"],
            "peft_ms": times["peft"], "base_ms": times["base"], "ours_over_base": times["ours"] / times["base"],
            "peft_over_base": times["peft"] / times["base"], "goal_ours_over_base": None, "goal_met": None}


# ---- QLoRA's NF4 -------------------------------------------------------------------------------

def check_nf4(shape, dtypes) -> list[dict]:
    rows = []
    q = quantize_nf4(torch.randn(*shape, device=DEVICE))
    for dtype in dtypes:
        got, expected = dequantize_nf4(q, dtype), reference_dequantize_nf4(q, dtype)
        mismatches = int((got != expected).sum())
        rows.append({"kernel": "nf4 dequantize (bit-exact)", "shape": f"{shape[0]}x{shape[1]}",
                     "dtype": str(dtype).split(".")[-1], "max_relative_error": float(mismatches), "limit": 0.0,
                     "ok": mismatches == 0})
    return rows


def time_nf4_dequantize(shape, dtype, ceilings, repeats) -> dict:
    """Bytes moved (4-bit codes, 8-bit block maxima, 16-bit output) over time, against copy bandwidth."""
    W = torch.randn(*shape, device=DEVICE)
    q = quantize_nf4(W)
    n = W.numel()
    moved = n // 2 + n // 64 + n * torch.tensor([], dtype=dtype).element_size()
    ours_ms = time_call(lambda i: (lambda: dequantize_nf4(q, dtype)), moved, repeats)
    row = {"kernel": "nf4 dequantize", "shape": f"{shape[0]}x{shape[1]} -> {str(dtype).split('.')[-1]}",
           "ours_ms": ours_ms, "bytes_moved": moved, "achieved_bytes_per_s": moved / (ours_ms / 1e3),
           "fraction_of_copy_bandwidth": moved / (ours_ms / 1e3) / ceilings["copy_bytes_per_s"],
           "goal_fraction_of_copy_bandwidth": 0.8}
    row["goal_met"] = row["fraction_of_copy_bandwidth"] >= 0.8
    if DEVICE == "cuda":  # bitsandbytes' own CUDA kernel, side by side
        import bitsandbytes.functional as bnb
        packed, state = bnb.quantize_4bit(W.to(dtype), blocksize=64, quant_type="nf4", compress_statistics=True)
        row["bitsandbytes_ms"] = time_call(lambda i: (lambda: bnb.dequantize_4bit(packed, state)), moved, repeats)
    return row


# ---- Punica: many adapters in one batch -------------------------------------------------------

def check_punica(M, K, N, r, L, dtypes) -> list[dict]:
    rows = []
    for dtype in dtypes:
        x, y = torch.randn(M, K, device=DEVICE, dtype=dtype), torch.randn(M, N, device=DEVICE, dtype=dtype)
        A = torch.randn(L, r, K, device=DEVICE, dtype=dtype) / K ** 0.5
        B = torch.randn(L, N, r, device=DEVICE, dtype=dtype)
        per_row = torch.randint(-1, L, (M,), device=DEVICE)
        segmented = per_row.sort().values
        expected_row = reference_shrink_expand(y.double(), x.double(), A.double(), B.double(), per_row, 1.0)
        expected_seg = reference_shrink_expand(y.double(), x.double(), A.double(), B.double(), segmented, 1.0)
        errors = {"bgmv": relative_error(bgmv(y.clone(), x, A, B, per_row.to(torch.int32), 1.0), expected_row),
                  "sgmv": relative_error(sgmv(y.clone(), x, A, B, *segments_of(segmented), 1.0), expected_seg)}
        limit = 1e-2 if dtype == torch.bfloat16 else (2e-2 if dtype == torch.float16 else 1e-3)
        for name, error in errors.items():
            rows.append({"kernel": f"punica {name}", "shape": f"M={M} K={K} N={N} r={r} L={L}",
                         "dtype": str(dtype).split(".")[-1], "max_relative_error": error, "limit": limit,
                         "ok": error <= limit})
    return rows


def check_slora(K, N, ranks, dtypes) -> list[dict]:
    """Adapters of mixed ranks on shuffled pages, one evicted and another loaded, prefill and decode."""
    rows = []
    for dtype in dtypes:
        order = torch.randperm(sum(ranks) + 8).tolist()
        pool = AdapterPool(len(order), K, N, device=DEVICE, dtype=dtype, page_order=order)
        adapters = {f"a{i}": (torch.randn(rank, K, device=DEVICE, dtype=dtype) / K ** 0.5,
                              torch.randn(N, rank, device=DEVICE, dtype=dtype), float(rank)) for i, rank in enumerate(ranks)}
        for name, (A, B, alpha) in list(adapters.items())[:-1]:
            pool.load(name, A, B, alpha)
        pool.evict("a0")
        pool.load(f"a{len(ranks) - 1}", *adapters[f"a{len(ranks) - 1}"])
        live = [name for name in adapters if name != "a0"]
        base = nn.Linear(K, N, device=DEVICE, dtype=dtype)
        layer = SLoRALinear(base, pool)
        for label, names in (("prefill", [name for name in live for _ in range(17)] + [None] * 3),
                             ("decode", live + [None] + live[::-1])):
            x = torch.randn(len(names), K, device=DEVICE, dtype=dtype)
            expected = base(x).double()
            for row, name in enumerate(names):
                if name is not None:
                    A, B, alpha = adapters[name]
                    expected[row] += (alpha / A.shape[0]) * (x[row].double() @ A.double().T) @ B.double().T
            error = relative_error(layer(x, names), expected)
            limit = 1e-2 if dtype == torch.bfloat16 else (2e-2 if dtype == torch.float16 else 1e-3)
            rows.append({"kernel": f"s-lora {label}", "shape": f"K={K} N={N} ranks={ranks}",
                         "dtype": str(dtype).split(".")[-1], "max_relative_error": error, "limit": limit,
                         "ok": error <= limit})
    return rows


def time_decode_many_adapters(requests, K, N, r, dtype, repeats) -> dict:
    """`requests` decode rows, each on its own adapter: our BGMV, gather + bmm, PEFT's mixed batch, base."""
    from peft import LoraConfig, inject_adapter_in_model
    x = torch.randn(requests, K, device=DEVICE, dtype=dtype)
    W = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
    A = torch.randn(requests, r, K, device=DEVICE, dtype=dtype) / K ** 0.5
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
    names = [f"a{index}" for index in range(requests)]
    calls = {"ours": lambda: bgmv(nn.functional.linear(x, W), x, A, B, ids, 1.0),
             "gather_bmm": lambda: nn.functional.linear(x, W) + torch.bmm(
                 torch.bmm(x.unsqueeze(1), A[ids.long()].transpose(1, 2)), B[ids.long()].transpose(1, 2)).squeeze(1),
             "peft": lambda: base[0](x, adapter_names=names),
             "base": lambda: nn.functional.linear(x, W)}
    set_bytes = (requests * K + N * K + requests * N + requests * r * (K + N)) * x.element_size()
    with torch.no_grad():
        times = {kind: time_call(lambda i, call=call: call, set_bytes, repeats) for kind, call in calls.items()}
    return {"kernel": "punica bgmv decode, one adapter per request", "shape": f"M={requests} K={K} N={N} r={r}",
            "ours_ms": times["ours"], "gather_bmm_ms": times["gather_bmm"], "peft_ms": times["peft"],
            "base_ms": times["base"], "ours_over_base": times["ours"] / times["base"],
            "gather_bmm_over_base": times["gather_bmm"] / times["base"], "peft_over_base": times["peft"] / times["base"],
            "goal_ours_over_base": 1.3, "goal_met": times["ours"] / times["base"] <= 1.3}


# ---- main --------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes; timings not judged")
    parser.add_argument("--out", help="where to write the JSON (default on a GPU: benchmarks/results/"
                                      "kernels-<device>.json; a smoke run writes one only when asked)")
    args = parser.parse_args()
    if DEVICE != "cuda" and not args.smoke:
        print("no CUDA device: run with --smoke on a CPU, or on the GPU machine", file=sys.stderr)
        return 2
    torch.manual_seed(int(time.time()))  # fresh inputs on every run
    if args.smoke:
        dtype, check_dtypes, repeats = torch.float32, [torch.float32, torch.float16], 3
        check_shapes, K, N, r, token_counts, train_tokens = [(7, 48, 40, 4)], 64, 48, 4, [1, 9], 9
    else:
        dtype, check_dtypes, repeats = torch.bfloat16, [torch.bfloat16, torch.float32], 50
        check_shapes = [(1, 4096, 4096, 16), (77, 4096, 4096, 16), (1000, 1000, 1001, 13)]
        K, N, r, token_counts, train_tokens = 4096, 4096, 16, [1, 16, 128, 1024, 8192], 8192

    checks = check_fused_lora(check_shapes, check_dtypes)
    checks += check_dora(check_shapes[:2], check_dtypes)
    checks += check_nf4((37, 130) if args.smoke else (4096, 11008), check_dtypes)
    checks += check_punica(*((23, 48, 40, 4, 5) if args.smoke else (1000, 4096, 4096, 16, 64)), check_dtypes)
    checks += check_slora(*((48, 40, [2, 5, 16, 7]) if args.smoke else (4096, 4096, [8, 16, 64, 32, 4])), check_dtypes)
    ceilings = measure_ceilings(dtype)
    timings = time_fused_lora(token_counts, K, N, r, dtype, ceilings, repeats)
    timings.append(time_training_step(train_tokens, K, N, r, dtype, repeats))
    timings.append(time_dora_forward(train_tokens, K, N, r, dtype, repeats))
    timings.append(time_decode_many_adapters(8 if args.smoke else 64, K, N, r, dtype, repeats))
    nf4 = time_nf4_dequantize((64, 256) if args.smoke else (4096, 11008), dtype, ceilings, repeats)

    print(f"{'kernel':<42} {'shape':<26} {'dtype':<8} {'rel. error':>10}  ok")
    for row in checks:
        print(f"{row['kernel']:<42} {row['shape']:<26} {row['dtype']:<8} {row['max_relative_error']:>10.2e}  {row['ok']}")
    print(f"\n{'timed (median ms)':<42} {'shape':<26} {'ours/base':>9} {'PEFT/base':>9} {'floor/base':>10} {'goal':>6}")
    for row in timings:
        floor = f"{row['floor_over_base']:.3f}" if "floor_over_base" in row else "-"
        goal = "-" if row["goal_met"] is None else "≤" + format(row["goal_ours_over_base"], ".2f")
        verdict = "" if args.smoke or row["goal_met"] is None else f"  {'met' if row['goal_met'] else 'MISSED'}"
        print(f"{row['kernel']:<42} {row['shape']:<26} {row['ours_over_base']:>9.3f} {row['peft_over_base']:>9.3f} "
              f"{floor:>10} {goal:>6}{verdict}")
    print(f"{nf4['kernel']:<42} {nf4['shape']:<26} {nf4['fraction_of_copy_bandwidth']:>9.3f} of the copy bandwidth "
          f"(goal ≥ 0.80)" + ("" if args.smoke else f"  {'met' if nf4['goal_met'] else 'MISSED'}"))
    timings.append(nf4)
    if args.smoke:
        print("\n(smoke run: interpreter on a CPU; the timings above say nothing about GPU speed)")

    import triton
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    module_of = {"fused_lora": "kernels.fused_lora", "LoRA training": "kernels.fused_lora", "dora": "kernels.dora",
                 "punica": "kernels.punica", "s-lora": "kernels.slora", "nf4": "kernels.nf4"}
    for row in checks + timings:  # which implementation page shows the row
        row["module"] = next(module for prefix, module in module_of.items() if row["kernel"].startswith(prefix))
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/kernels.py" + (" --smoke" if args.smoke else ""),
              "device": device_name, "smoke": args.smoke,
              "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                           "cuda": torch.version.cuda},
              "ceilings": ceilings, "checks": checks, "timings": timings}
    out = Path(args.out) if args.out else (None if args.smoke else Path(__file__).resolve().parent / "results" /
                                           f"kernels-{device_name.replace(' ', '_')}.json")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0 if all(row["ok"] for row in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
