"""Site build time, size and search speed against catalog size: synthetic catalogs side by side.

    python benchmarks/site_build.py [N ...] [--json FILE] [--no-search]     (default: 1000 10000)

For each N it writes a synthetic catalog (benchmarks/synthetic_catalog.py) into a scratch copy of
the repository's site inputs, runs `catalog build` there, and prints entries, wall time, peak
memory of the build, total site size and the largest paper or list page and implementation page.
Goals (issues 4 and 16): 10,000 entries in <= 45 s on 2 cores, site <= 300 MB, no paper or list
page over 100 KB, no implementation page over 250 KB.

Search is then measured in headless Chromium (Debian's chromium and chromium-driver) on the site
served from loopback: the time from typing a query to the first results on screen, and the bytes
the page fetched for it, for the first query (which loads the search code and index entry) and
the mean of the next ones. Beside it, the same catalog built with the search it had before
(Material's search plugin, one search_index.json holding every page, as `fill_shells` wrote it):
goals at 10,000 entries, first results within 1.5 s and at most 1.5 MB per query.
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

QUERIES = ("adapter", "low rank", "routing experts", "orthogonal budget", "serving kernel")


def material_search_variant(root: Path) -> None:
    """Turn the scratch copy back to Material's own search, as the site had it before Pagefind."""
    config = (root / "mkdocs.yml").read_text()
    config = config.replace("plugins: []", "plugins:\n  - search")
    (root / "mkdocs.yml").write_text(config)
    (root / "site" / "overrides" / "partials" / "header.html").unlink()  # Material's header, its search box


def add_filled_pages_to_material_index(site: Path) -> None:
    """Material indexes only what MkDocs rendered; the old fill_shells added every filled page's text."""
    import html
    import re

    index_path = site / "search" / "search_index.json"
    index = json.loads(index_path.read_text())
    for page in sorted(site.glob("papers/*/index.html")) + sorted(site.glob("impls/*/index.html")):
        text = page.read_text()
        body = re.search(r"<article[^>]*>(.*?)</article>", text, re.S)
        title = re.search(r"<h1[^>]*>(.*?)</h1>", text, re.S)
        words = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body.group(1) if body else "")).split())
        index["docs"].append(
            {
                "location": str(page.parent.relative_to(site)) + "/",
                "title": re.sub(r"<[^>]+>", "", title.group(1)) if title else "",
                "text": "<p>" + html.escape(words) + "</p>",
            }
        )
    index_path.write_text(json.dumps(index, ensure_ascii=False, separators=(",", ":")))


def measure_search(site: Path, material: bool) -> dict:
    """Time to first result and bytes fetched per query, in headless Chromium."""
    from browser_helpers import chromium, loopback_server, type_and_wait

    server, url = loopback_server(site)
    driver = chromium(Path(tempfile.mkdtemp(prefix="chromium-")))
    try:
        # The first query is typed as soon as the home page has loaded, and counts from the page's
        # first byte: Material's search fetches its whole index at page load, Pagefind on focus.
        # Bytes are those of search files (Pagefind's bundle; Material's index and search worker).
        start_bytes = server.bytes_sent
        driver.get(url)
        home_page_bytes = server.bytes_sent - start_bytes
        timings, transferred = [], []
        for query in QUERIES:
            before = 0 if not timings else server.search_bytes_sent
            timings.append(type_and_wait(driver, query, material))
            time.sleep(1.5)  # the rest of the query's letters and result fragments arrive
            transferred.append(server.search_bytes_sent - before)
        return {
            "home_page_mb": round(home_page_bytes / 1e6, 3),
            "first_query_s": round(timings[0], 3),
            "first_query_mb": round(transferred[0] / 1e6, 3),
            "later_queries_s": round(sum(timings[1:]) / (len(timings) - 1), 3),
            "later_queries_mb": round(sum(transferred[1:]) / (len(transferred) - 1) / 1e6, 3),
        }
    finally:
        driver.quit()
        server.shutdown()


def measure(count: int | None, material: bool = False, search: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        root = copy_repo_inputs(Path(scratch))
        if count is not None:
            write_synthetic(root, count)
        if material:
            material_search_variant(root)
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
        site = root / "out"
        if material:
            add_filled_pages_to_material_index(site)
        pages = list(site.rglob("*.html"))
        size = sum(path.stat().st_size for path in site.rglob("*") if path.is_file())
        impl_pages = [page for page in pages if page.parent.parent.name == "impls" and page.parent.name != "impls"]
        other_pages = [page for page in pages if page not in impl_pages]
        largest = max(other_pages, key=lambda path: path.stat().st_size)
        largest_impl = max(impl_pages, key=lambda path: path.stat().st_size)
        entries = len([line for line in (root / "papers.yaml").read_text().splitlines() if line.startswith("- id:")])
        row = {
            "entries": entries,
            "search": "Material" if material else "Pagefind",
            "wall_s": round(wall, 2),
            "peak_rss_mb": round(peak_kib / 1024, 1),
            "site_mb": round(size / 1e6, 1),
            "pages": len(pages),
            "largest_page_kb": round(largest.stat().st_size / 1e3, 1),
            "largest_page": str(largest.relative_to(site)),
            "largest_impl_page_kb": round(largest_impl.stat().st_size / 1e3, 1),
            "largest_impl_page": str(largest_impl.relative_to(site)),
        }
        if search:
            row.update(measure_search(site, material))
        return row


def main() -> None:
    args = sys.argv[1:]
    json_path = None
    if "--json" in args:
        json_path = Path(args.pop(args.index("--json") + 1))
        args.remove("--json")
    search = "--no-search" not in args
    args = [arg for arg in args if arg != "--no-search"]
    counts = [None] + ([int(arg) for arg in args] or [1000, 10000])
    # Each size twice, side by side: today's site (Pagefind) and the same with Material's search.
    rows = [
        measure(count, material, search) for count in counts for material in ((False, True) if search else (False,))
    ]
    header = (
        f"{'entries':>8} {'search':>9} {'wall s':>7} {'peak MB':>8} {'site MB':>8} {'pages':>7} "
        f"{'page KB':>8} {'impl KB':>8} {'1st query s':>11} {'1st MB':>7} {'next s':>7} {'next MB':>8}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['entries']:>8} {row['search']:>9} {row['wall_s']:>7} {row['peak_rss_mb']:>8} {row['site_mb']:>8} "
            f"{row['pages']:>7} {row['largest_page_kb']:>8} {row['largest_impl_page_kb']:>8} "
            + (
                f"{row['first_query_s']:>11} {row['first_query_mb']:>7} {row['later_queries_s']:>7} "
                f"{row['later_queries_mb']:>8}"
                if "first_query_s" in row
                else ""
            )
        )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/site_build.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "python": platform.python_version(),
        "note": (
            "peak_rss_mb: the largest process of each build (os.wait4); search times from typing a query to the "
            "first result link on screen in headless Chromium; bytes: what the loopback server sent of the search's "
            "own files (Pagefind's bundle; Material's search_index.json and worker) until 1.5 s after the first "
            "result, the first query's from the home page's first byte, since Material fetches its index at page "
            "load; home_page_mb: the home page with everything it loads (Material's instant navigation fetches "
            "sitemap.xml, which grows with the catalog); "
            f"queries: {', '.join(QUERIES)}"
        ),
        "rows": rows,
    }
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
