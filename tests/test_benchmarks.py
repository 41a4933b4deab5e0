"""The benchmark scripts run end to end (small sizes): CI proves they work; their numbers are not judged here."""

import json
import subprocess
import sys

from test_site import ENTRIES

from conftest import REPO


def run(*args, timeout=300):
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_kernels_smoke(tmp_path):
    out = run("benchmarks/kernels.py", "--smoke", "--out", str(tmp_path / "kernels.json"))
    assert "smoke run" in out
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["smoke"] and result["command"] == "python benchmarks/kernels.py --smoke"
    assert result["checks"] and all(row["ok"] for row in result["checks"])
    assert {row["kernel"] for row in result["timings"]} == {
        "fused_lora forward",
        "LoRA training step (fwd+bwd, frozen W)",
        "dora forward",
        "punica bgmv decode, one adapter per request",
        "nf4 dequantize",
    }
    assert all(row["module"] for row in result["checks"] + result["timings"])  # every row finds its page
    forward = next(row for row in result["timings"] if row["kernel"] == "fused_lora forward")
    assert {"shrink_in_kernel_ms", "shrink_before_ms", "peft_ms", "base_ms", "floor_over_base"} <= set(forward)


def load_kernels_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import kernels

    return kernels


def test_kernels_benchmark_keeps_going_when_a_section_fails(tmp_path, monkeypatch, capsys):
    kernels = load_kernels_benchmark(monkeypatch)

    def broken(*args):
        raise RuntimeError("no <such> kernel")

    monkeypatch.setattr(kernels, "check_nf4", broken)
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--smoke", "--only", "nf4", "--out", str(tmp_path / "k.json")])
    assert kernels.main() == 1  # a failed section fails the run...
    result = json.loads((tmp_path / "k.json").read_text())
    assert result["checks"] == [
        {
            "kernel": "nf4 checks",
            "error": "RuntimeError: no <such> kernel",
            "ok": False,
            "goal_met": None,
            "module": "kernels.nf4",
        }
    ]
    assert [row["kernel"] for row in result["timings"]] == ["nf4 dequantize"]  # ...but the others still ran
    assert "ERROR RuntimeError: no <such> kernel" in capsys.readouterr().out


def test_kernels_benchmark_rotates_inputs_past_the_l2_cache(monkeypatch):
    kernels = load_kernels_benchmark(monkeypatch)
    monkeypatch.setattr(kernels, "DEVICE", "cuda")
    assert kernels.input_sets(33 * 2**20) == 2  # one W of 4096 x 4096 in bf16: two sets exceed 64 MB
    assert kernels.input_sets(5 * 2**20) * 5 * 2**20 > kernels.L2_BYTES
    assert kernels.input_sets(0) == kernels.MAX_SETS  # bounded, whatever the caller says
    monkeypatch.setattr(kernels, "DEVICE", "cpu")
    assert kernels.input_sets(2**20) == 1


def test_enrich_benchmark_small(tmp_path):
    out = run("benchmarks/enrich.py", "1100", "--json", str(tmp_path / "enrich.json"))
    result = json.loads((tmp_path / "enrich.json").read_text())
    assert result["fetched"] == 1100 and result["requests"] == result["ideal_requests"] + result["injected_429"]
    assert "3 batches" in out


def test_site_benchmark_small(tmp_path):
    from browser_helpers import CHROMIUM, DRIVER

    search = bool(CHROMIUM and DRIVER)  # the search half needs the browser; the build half runs anyway
    run("benchmarks/site_build.py", "120", "--json", str(tmp_path / "site.json"), *([] if search else ["--no-search"]))
    rows = json.loads((tmp_path / "site.json").read_text())["rows"]
    if not search:
        assert [row["entries"] for row in rows] == [ENTRIES, 120]  # the committed catalog is measured first
        return
    assert [(row["entries"], row["search"]) for row in rows] == [
        (ENTRIES, "Pagefind"),
        (ENTRIES, "Material"),
        (120, "Pagefind"),
        (120, "Material"),
    ]
    for row in rows:
        assert row["first_query_s"] > 0 and row["first_query_mb"] > 0 and row["largest_impl_page"].startswith("impls/")
