"""Every kernel compiles for the GPU the benchmarks run on (Hopper, sm_90), without one: Triton
compiles and its bundled ptxas assembles each launch the wrappers make, as its launcher would.
This catches what the interpreter lets through (code only the compiler rejects, tiles too large
for shared memory, register spills, a GEMM that misses the tensor cores or its load pipeline)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "benchmarks/compile_kernels.py", "--quick", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())["rows"]


def test_every_launch_compiles_fits_and_does_not_spill(report):
    assert {row["kernel"] for row in report} == {
        "_lora_gemm",
        "_weight_norm",
        "_bgmv_shrink",
        "_bgmv_expand",
        "_sgmv_shrink",
        "_sgmv_expand",
        "_dequantize_nf4",
    }
    for row in report:
        assert row["compiled"] and row["fits"], row
        assert row["spilled_bytes"] == 0, row


def test_the_lora_gemm_uses_hopper_tensor_cores_and_pipelines_its_loads(report):
    gemms = [row for row in report if row["kernel"] == "_lora_gemm"]
    assert len(gemms) >= 10 and all(row["pipelined_loads"] for row in gemms)
    many_rows = [row for row in gemms if "M=8192" in row["launch"] or "M=1024" in row["launch"]]
    assert many_rows and all(row["tensor_cores"] == "wgmma" for row in many_rows)


def test_nf4_dequantisation_rounds_like_pytorch(report):
    """No fused multiply-add in the NF4 kernel: its values equal the PyTorch twin's to the bit."""
    (nf4,) = [row for row in report if row["kernel"] == "_dequantize_nf4"]
    assert nf4["fused_multiply_adds"] == 0
