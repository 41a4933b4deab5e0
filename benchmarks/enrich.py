"""Enrichment at scale: N synthetic papers against a local stand-in for the Semantic Scholar API.

    python benchmarks/enrich.py [N] [--json FILE]        (default N = 10000)

A threaded HTTP server on 127.0.0.1 answers like the real API (tests/fake_s2.py) and fails every
7th batch request once with 429 (Retry-After: 0). Prints the requests made against the ideal
ceil(N/500) plus retries, wall time, peak RSS (client and server), and each atomic store write's time
against the number of records it held (the goal: linear in N).
"""

import json
import math
import resource
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from catalog.enrich import enrich, plan  # noqa: E402
from catalog.load import parse_catalog  # noqa: E402
from catalog.s2 import RetryPolicy, S2Client  # noqa: E402
from catalog.store import MetadataStore, save_store  # noqa: E402

from fake_s2 import FakeS2  # noqa: E402
from synthetic_catalog import synthetic_entries  # noqa: E402


def serve(api: FakeS2, fail_every: int) -> tuple[ThreadingHTTPServer, dict]:
    counts = {"requests": 0, "faults": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, method):
            counts["requests"] += 1
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if method == "POST" and counts["requests"] % fail_every == 0:
                counts["faults"] += 1
                status, payload, extra = 429, {"message": "Too Many Requests"}, {"Retry-After": "0"}
            else:
                parts = urlsplit(self.path)
                status, payload = api.answer(method, parts.path, parts.query, body)
                extra = {}
            data = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **extra}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, counts


def main() -> None:
    args = sys.argv[1:]
    json_path = Path(args.pop(args.index("--json") + 1)) if "--json" in args else None
    args = [arg for arg in args if arg != "--json"]
    count = int(args[0]) if args else 10_000
    text, full_store = synthetic_entries(count)
    api = FakeS2([record.paper.to_json() for record in full_store.records.values()])
    server, counts = serve(api, fail_every=7)
    catalog = parse_catalog(text)
    writes = []
    with tempfile.TemporaryDirectory() as scratch:
        store_path = Path(scratch) / "metadata.json"

        def save(store: MetadataStore, done: int, total: int) -> None:
            started = time.perf_counter()
            save_store(store, store_path)
            writes.append((len(store.records), time.perf_counter() - started))

        client = S2Client(
            f"http://127.0.0.1:{server.server_address[1]}/graph/v1", policy=RetryPolicy(base_seconds=0.01)
        )
        started = time.perf_counter()
        store, report = enrich(
            plan(catalog.entries, MetadataStore(), datetime.now(UTC)), MetadataStore(), client, on_batch=save
        )
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes; includes the server thread
        size = store_path.stat().st_size
    server.shutdown()

    ideal = math.ceil(count / 500)
    per_record = [seconds / records * 1e6 for records, seconds in writes]
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/enrich.py " + " ".join(sys.argv[1:]),
        "papers": count,
        "fetched": len(report.fetched),
        "requests": client.requests,
        "ideal_requests": ideal,
        "injected_429": counts["faults"],
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak / 1e6, 1),
        "store_mb": round(size / 1e6, 1),
        "store_writes": [{"records": records, "seconds": round(seconds, 4)} for records, seconds in writes],
        "write_us_per_record_first_last": [round(per_record[0], 1), round(per_record[-1], 1)],
    }
    print(
        f"papers {count}: {client.requests} requests = {ideal} batches + {counts['faults']} retried 429s; "
        f"{len(report.fetched)} fetched in {wall:.2f} s; peak RSS (client and server) {peak / 1e6:.1f} MB"
    )
    print(
        f"store writes: {len(writes)}, {writes[0][0]} records in {writes[0][1] * 1e3:.1f} ms ... "
        f"{writes[-1][0]} records in {writes[-1][1] * 1e3:.1f} ms "
        f"({per_record[0]:.1f} vs {per_record[-1]:.1f} µs per record: linear if these are close)"
    )
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {json_path}")
    assert client.requests == ideal + counts["faults"], "more requests than batches plus retries"


if __name__ == "__main__":
    main()
