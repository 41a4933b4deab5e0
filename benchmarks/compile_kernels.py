"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one, and report what the
GPU would run: shared memory, registers, spills, which tensor-core instructions, pipelined loads.

    python benchmarks/compile_kernels.py [--json FILE] [--quick]

No GPU is needed: Triton compiles to PTX and its bundled ptxas assembles it. The kernels are not
described by hand here. The real Python wrappers (lora_gemm, weight_norm, bgmv_table, sgmv_table,
dequantize_nf4) are called on the benchmark's shapes with "meta" tensors (shapes and dtypes, no
data), every kernel launch they make is recorded instead of run, and each recorded launch is
compiled the way Triton's launcher would specialise it (pointers 16-byte aligned, integers equal
to 1 made constant, multiples of 16 marked so), once for every tile shape its tuner may pick.
--quick compiles one shape of each tuned kernel. The timings themselves still need the GPU
(benchmarks/kernels.py); this tells, before spending GPU time, that every kernel compiles for the
chip, fits its shared memory, and uses the instructions it should.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels cannot be compiled
    os.environ.pop("TRITON_INTERPRET")
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reference_impls.kernels import dora, fused_lora, nf4, punica  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.uint8: "*u8",
}


# ---- record the launches the wrappers make ----------------------------------------------------


@contextmanager
def recording(launches: list):
    """Kernel launches are appended to `launches` as (JITFunction, args, kwargs, configs) and not run."""
    jit_run, tuned_run = JITFunction.run, Autotuner.run

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, None))

    def record_tuned(self, *args, **kwargs):
        launches.append((self.fn, args, kwargs, self.configs))

    JITFunction.run, Autotuner.run = record_jit, record_tuned
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuned_run


def launches_of_the_benchmark(dtype=torch.bfloat16) -> list[tuple[str, tuple]]:
    """(label, launch) for every kernel launch the GPU benchmark's shapes make."""

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, device="meta", dtype=dtype)

    K, N, r = 4096, 4096, 16
    W, A, B = meta(N, K), meta(r, K), meta(N, r)
    calls = []
    for M in (1, 16, 128, 1024, 8192):
        x = meta(M, K)
        calls.append(
            (f"fused_lora forward, u in the kernel, M={M}", lambda x=x: fused_lora.lora_gemm(x, W, B, 1.0, A_rk=A))
        )
        calls.append(
            (f"fused_lora forward, u before, M={M}", lambda x=x: fused_lora.lora_gemm(x, W, B, 1.0, u=meta(M, r)))
        )
    dy = meta(8192, N)
    calls.append(("fused_lora backward dx, M=8192", lambda: fused_lora.lora_gemm(dy, W.T, A.T, 1.0, u=meta(8192, r))))
    calls.append(
        (
            "fused_lora backward dx, u in the kernel, M=16",
            lambda: fused_lora.lora_gemm(meta(16, N), W.T, A.T, 1.0, A_rk=B.T),
        )
    )
    factor = meta(N, dtype=torch.float32)
    calls.append(
        (
            "dora forward, M=8192",
            lambda: fused_lora.lora_gemm(meta(8192, K), W, B, 1.0, u=meta(8192, r), col_scale=factor),
        )
    )
    calls.append(("dora weight norm", lambda: dora.weight_norm(W, A, B, 1.0)))
    table = punica.stacked_table(meta(64, r, K), meta(64, N, r), 1.0)
    ids = meta(64, dtype=torch.int32)
    calls.append(("punica bgmv, 64 rows", lambda: punica.bgmv_table(meta(64, N), meta(64, K), table, ids)))
    starts, adapters = torch.tensor([0, 300, 1000], dtype=torch.int32), torch.tensor([3, 7], dtype=torch.int32)
    calls.append(
        ("punica sgmv, 2 segments", lambda: punica.sgmv_table(meta(1000, N), meta(1000, K), table, starts, adapters))
    )
    weight = nf4.NF4Weight(
        meta(4096 * 11008 // 2, dtype=torch.uint8),
        meta(4096 * 11008 // 64, dtype=torch.uint8),
        meta(-(-4096 * 11008 // 64 // 256), dtype=torch.float32),
        0.0,
        (4096, 11008),
    )
    calls.append(("nf4 dequantize 4096x11008", lambda: nf4.dequantize_nf4(weight, dtype)))

    recorded = []
    use_kernel = nf4.use_kernel
    nf4.use_kernel = lambda tensor: True  # meta tensors are neither on CUDA nor interpreted
    try:
        for label, call in calls:
            launches = []
            with recording(launches):
                call()
            recorded += [(label, launch) for launch in launches]
    finally:
        nf4.use_kernel = use_kernel
    return recorded


# ---- compile one launch as the launcher would ---------------------------------------------------


def specialise(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """Triton's signature, constants and attributes for these arguments (what its launcher derives)."""
    values = dict(zip(fn.arg_names, args)) | {name: value for name, value in kwargs.items() if name in fn.arg_names}
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = values[name]
        if fn.params[index].is_constexpr or value is None:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # allocations are aligned; views here start at 0
        elif isinstance(value, bool) or (isinstance(value, int) and value == 1):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise {name}={value!r}")
    return signature, constants, attrs


def resource_usage(cubin: bytes) -> dict:
    """Registers and local (spilled) bytes per thread, read off the cubin by Triton's own cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    registers, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spilled_bytes": int(local.group(1)) if local else None,
    }


def compile_launch(fn, args, kwargs, config) -> dict:
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    if config is not None:
        kwargs |= config.kwargs
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if "enable_fp_fusion" in kwargs:
        options["enable_fp_fusion"] = kwargs.pop("enable_fp_fusion")
    signature, constants, attrs = specialise(fn, args, kwargs)
    started = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs=constants, attrs=attrs), target=HOPPER, options=options
        )
    except Exception as error:  # noqa: BLE001 (reported per launch; the others still compile)
        shared = re.search(r"Required: (\d+)", str(error))
        return {
            "compiled": False,
            "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}",
            "shared_bytes": int(shared.group(1)) if shared else None,
            **options,
        }
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return {
        "compiled": True,
        "seconds": round(time.perf_counter() - started, 2),
        **options,
        "shared_bytes": compiled.metadata.shared,
        "fits": compiled.metadata.shared <= SHARED_LIMIT,
        "tensor_cores": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none"),
        "pipelined_loads": "async_copy_global_to_local" in ttgir,
        "fused_multiply_adds": ptx.count("fma.rn."),
        **resource_usage(compiled.asm["cubin"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--quick", action="store_true", help="one tile shape per tuned kernel")
    args = parser.parse_args()
    rows = []
    print(f"Triton {triton.__version__}, target sm_90")
    print(
        f"{'launch':<44} {'kernel':<22} {'tile':<14} {'w/s':>4} {'shared':>7} {'regs':>4} {'spill':>5} "
        f"{'MMA':<8} pipelined"
    )
    for label, (fn, launch_args, launch_kwargs, configs) in launches_of_the_benchmark():
        for config in (configs[:1] if args.quick else configs) if configs else [None]:
            row = {"launch": label, "kernel": fn.__name__, **compile_launch(fn, launch_args, launch_kwargs, config)}
            tile = "x".join(str(config.kwargs[key]) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) if config else "-"
            row["tile"] = tile
            rows.append(row)
            if row["compiled"]:
                print(
                    f"{label:<44} {row['kernel']:<22} {tile:<14} {row['num_warps']}/{row['num_stages']} "
                    f"{row['shared_bytes']:>7} {row['registers']!s:>4} {row['spilled_bytes']!s:>5} "
                    f"{row['tensor_cores']:<8} {row['pipelined_loads']}" + ("" if row["fits"] else "  TOO MUCH SHARED")
                )
            else:
                print(f"{label:<44} {row['kernel']:<22} {tile:<14} FAILED {row['error']}")
    if args.json:
        command = "python benchmarks/compile_kernels.py" + (" --quick" if args.quick else "")
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "command": command,
                    "triton": triton.__version__,
                    "target": "sm_90",
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0 if all(row["compiled"] or row.get("shared_bytes") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
