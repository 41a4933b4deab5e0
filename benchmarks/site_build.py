"""Site build time and size against catalog size: synthetic catalogs built side by side.

    python benchmarks/site_build.py [N ...] [--json FILE]       (default: 1000 10000)

For each N it writes a synthetic catalog (benchmarks/synthetic_catalog.py) into a scratch copy of
the repository's site inputs, runs `catalog build` there, and prints entries, wall time, peak
memory of the build, total site size and the largest page. Goals (issue 4): the real catalog in
<= 10 s; 10,000 entries in <= 45 s, site <= 300 MB, no page over 100 KB.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from repo_inputs import copy_repo_inputs  # noqa: E402
from synthetic_catalog import write_synthetic  # noqa: E402


def measure(count: int | None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        root = copy_repo_inputs(Path(scratch))
        if count is not None:
            write_synthetic(root, count)
        start = time.perf_counter()
        build = subprocess.Popen(
            [sys.executable, "-m", "catalog.cli", "build", "--out", "out"],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = build.stdout.read().decode()
        # wait4 gives this build's own resource use: the largest process in its tree (it runs MkDocs as a child).
        _, status, usage = os.wait4(build.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(output)
        peak_kib = usage.ru_maxrss
        pages = list((root / "out").rglob("*.html"))
        size = sum(path.stat().st_size for path in (root / "out").rglob("*") if path.is_file())
        largest = max(pages, key=lambda path: path.stat().st_size)
        entries = len([line for line in (root / "papers.yaml").read_text().splitlines() if line.startswith("- id:")])
        return {
            "entries": entries,
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(peak_kib / 1024, 1),
            "site_mb": round(size / 1e6, 1),
            "pages": len(pages),
            "largest_page_kb": round(largest.stat().st_size / 1e3, 1),
            "largest_page": str(largest.relative_to(root / "out")),
        }


def main() -> None:
    args = sys.argv[1:]
    json_path = None
    if "--json" in args:
        json_path = Path(args.pop(args.index("--json") + 1))
        args.remove("--json")
    counts = [int(arg) for arg in args] or [1000, 10000]
    rows = [measure(None)] + [measure(count) for count in counts]
    header = f"{'entries':>8} {'wall s':>8} {'peak MB':>8} {'site MB':>8} {'pages':>7} {'largest KB':>11}  largest page"
    print(header)
    for row in rows:
        print(
            f"{row['entries']:>8} {row['wall_s']:>8} {row['peak_rss_mb']:>8} {row['site_mb']:>8} {row['pages']:>7} "
            f"{row['largest_page_kb']:>11}  {row['largest_page']}"
        )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/site_build.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "python": platform.python_version(),
        "note": "peak_rss_mb: the largest process of each build (os.wait4)",
        "rows": rows,
    }
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
