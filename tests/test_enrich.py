"""`catalog enrich` and `catalog add` against a local stand-in for the Semantic Scholar API."""

import difflib
import json
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from werkzeug import Response

from catalog.cli import main
from catalog.enrich import answers, enrich, lookup_id, plan
from catalog.load import load_catalog
from catalog.record import Paper
from catalog.s2 import RetryPolicy, S2Client, S2Error
from catalog.store import FACTS_SOURCE, load_store

from conftest import REPO
from fake_s2 import FakeS2
from s2_helpers import ANY, ASKED, NEW_PAPER, STORE, empty_store, fast, fault, seed_papers, serve


def test_enrich_fills_the_store_in_one_request(repo_copy, fake, capsys):
    api, url = fake
    empty_store(repo_copy)
    assert main(["enrich", "--api-url", url]) == 0
    store = load_store(STORE)
    assert len(store.records) == ASKED and len(api.batches) == 1 and len(api.batches[0]) == ASKED
    lora = store.records["lora"]
    assert lora.source == url and lora.paper.citationStyles.bibtex.startswith("@Article{lora")
    assert lora.retrieved > datetime.now(UTC) - timedelta(minutes=5)
    out = capsys.readouterr().out
    assert "entry 'hira': no identifier Semantic Scholar takes (openreview); its record stays as written" in out
    # HiRA is known only by its OpenReview id: with the store emptied, nothing can bring its record back.
    assert main(["check"]) == 1
    assert "entry 'hira': id: no metadata record in the store" in capsys.readouterr().err
    # The store is stable: sorted keys, one record per paper, so a rerun with the same answers is a no-op diff.
    before = STORE.read_bytes()
    assert main(["enrich", "--api-url", url, "--refresh"]) == 0
    assert re.sub(rb'"retrieved": "[^"]+"', b"", STORE.read_bytes()) == re.sub(rb'"retrieved": "[^"]+"', b"", before)


def test_only_missing_or_old_records_are_fetched(repo_copy, fake, capsys):
    """Records written from gathered facts are replaced by the API's at the first enrich; then nothing is
    fetched until records age. HiRA's facts record stays: the API cannot look up an OpenReview id."""
    api, url = fake
    facts = {entry_id for entry_id, record in load_store(STORE).records.items() if record.source == FACTS_SOURCE}
    entries = {entry.id: entry for entry in load_catalog("papers.yaml").entries}
    looked_up = {entry_id for entry_id in facts if lookup_id(entries[entry_id]) is not None}
    assert {"loha", "lokr", "delora"} <= looked_up and "hira" in facts - looked_up
    assert main(["enrich", "--api-url", url]) == 0
    assert sorted(api.batches[0]) == sorted(lookup_id(entries[entry_id]) for entry_id in looked_up)
    store = load_store(STORE)
    assert {
        entry_id for entry_id, record in store.records.items() if record.source == FACTS_SOURCE
    } == facts - looked_up
    assert store.records["lokr"].source == url and store.records["lokr"].paper.paperId is not None
    capsys.readouterr()
    assert main(["enrich", "--api-url", url]) == 0
    assert len(api.batches) == 1 and "nothing to fetch" in capsys.readouterr().out
    catalog = load_catalog("papers.yaml")
    now = datetime(2026, 11, 23, tzinfo=UTC)
    assert plan(catalog.entries, store, now) == []
    assert len(plan(catalog.entries, store, now, max_age_days=365)) == 64  # the seed records are from 2024
    assert len(plan(catalog.entries, store, now, max_age_days=10_000)) == 0
    assert len(plan(catalog.entries, store, now, refresh=True)) == ASKED


def test_1201_ids_go_in_three_requests(repo_copy, httpserver):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from synthetic_catalog import synthetic_entries

    text, store = synthetic_entries(1201)
    api = FakeS2([record.paper.to_json() for record in store.records.values()])
    url = serve(httpserver, api)
    (repo_copy / "papers.yaml").write_text(text)
    empty_store(repo_copy)
    assert main(["enrich", "--api-url", url]) == 0
    assert [len(batch) for batch in api.batches] == [500, 500, 201]
    assert len(load_store(STORE).records) == 1201


def test_unknown_papers_are_reported_by_line_and_keep_their_record(repo_copy, fake, capsys):
    api, url = fake
    del api.papers[load_store(STORE).records["lora"].paper.paperId]
    del api.papers[load_store(STORE).records["bitfit"].paper.paperId]
    old_lora = load_store(STORE).records["lora"]
    assert main(["enrich", "--api-url", url, "--refresh"]) == 0
    err = capsys.readouterr().err
    lines = (repo_copy / "papers.yaml").read_text().splitlines()
    line = lines.index("- id: lora") + 1
    assert (
        f"papers.yaml:{line}: entry 'lora': not found by Semantic Scholar (a8ca46b171467ceb2d7652fbfb67fe701ad86092)"
        in err
    )
    assert "entry 'bitfit': not found" in err
    store = load_store(STORE)
    assert store.records["lora"] == old_lora and store.records["vera"].source == url


def test_records_are_matched_by_identifier_not_position():
    paper = Paper.model_validate(
        {
            "paperId": "abc" * 13 + "d",
            "externalIds": {"ArXiv": "2106.09685", "DOI": "10.1/X.Y", "ACL": "2021.acl-long.1"},
        }
    )
    assert answers("abc" * 13 + "d", paper) and not answers("abd" * 13 + "d", paper)
    assert (
        answers("ARXIV:2106.09685", paper) and answers("DOI:10.1/x.y", paper) and answers("ACL:2021.acl-long.1", paper)
    )
    assert not answers("ARXIV:2106.09686", paper)
    entries = load_catalog(REPO / "papers.yaml").entries
    assert lookup_id(next(e for e in entries if e.id == "lora")) == "a8ca46b171467ceb2d7652fbfb67fe701ad86092"


@pytest.mark.parametrize(
    "status, body, headers",
    [
        (429, '{"message": "Too Many Requests"}', {"Retry-After": "3"}),
        (500, '{"message": "Internal Server Error"}', None),
        (502, "<html>Bad Gateway</html>", None),
        (503, '{"message": "Service Unavailable"}', None),
        (200, "{not json", None),
        (200, "[]", None),  # an empty answer to a non-empty batch
    ],
)
def test_transient_faults_are_retried(repo_copy, fake, httpserver, status, body, headers):
    api, url = fake
    fault(httpserver, status, body, headers)
    client = fast(url)
    entries = load_catalog("papers.yaml").entries
    store, report = enrich(plan(entries, load_store(STORE), datetime.now(UTC), refresh=True), load_store(STORE), client)
    assert len(report.fetched) == ASKED and client.requests == 2
    assert client.waits == ([3.0] if headers else [0.01])  # Retry-After honoured, else the backoff


def test_timeouts_are_retried(repo_copy, fake, httpserver):
    api, url = fake
    fault(httpserver, 200, "[]", delay=1.0)
    client = fast(url, timeout=0.3)
    entries = load_catalog("papers.yaml").entries
    _, report = enrich(plan(entries, load_store(STORE), datetime.now(UTC), refresh=True), load_store(STORE), client)
    # The test server answers one request at a time, so the first retry may queue behind the slow
    # answer and time out too: what matters is that timeouts were retried until one succeeded.
    assert len(report.fetched) == ASKED and client.requests >= 2 and len(client.waits) == client.requests - 1


def test_retries_are_bounded_in_count_and_time(fake, httpserver):
    api, url = fake
    for _ in range(10):
        fault(httpserver, 500)
    client = fast(url, attempts=3)
    with pytest.raises(S2Error, match="HTTP 500"):
        client.get_papers(["ARXIV:2106.09685"])
    assert client.requests == 3 and client.waits == [0.01, 0.02]
    slow = S2Client(url, policy=RetryPolicy(attempts=100, base_seconds=0.05, total_seconds=0.3))
    started = time.monotonic()
    with pytest.raises(S2Error):
        slow.get_papers(["ARXIV:2106.09685"])
    assert time.monotonic() - started < 2


def test_persistent_failure_leaves_the_store_byte_for_byte(repo_copy, httpserver, capsys):
    httpserver.expect_request(ANY).respond_with_json({"message": "down for maintenance"}, status=500)
    before = STORE.read_bytes()
    status = main(
        ["enrich", "--api-url", httpserver.url_for("/graph/v1"), "--refresh", "--retries", "2", "--backoff", "0.01"]
    )
    assert status == 1 and STORE.read_bytes() == before
    assert "HTTP 500 down for maintenance; gave up after the retries" in capsys.readouterr().err


def test_unreachable_server_exits_2_with_one_line_and_store_unchanged(repo_copy, capsys):
    before = STORE.read_bytes()
    assert main(["enrich", "--api-url", "http://127.0.0.1:9/graph/v1", "--refresh"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach http://127.0.0.1:9/graph/v1/paper/batch") and "\n" not in err
    assert STORE.read_bytes() == before
    assert not list(STORE.parent.glob(".metadata.json.*"))  # no temporary file left behind


def test_interruption_between_batches_keeps_finished_batches(repo_copy, httpserver):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from synthetic_catalog import synthetic_entries

    text, store = synthetic_entries(1100)
    api = FakeS2([record.paper.to_json() for record in store.records.values()])
    second_batch_first_id = store.records["paper-00500"].paper.paperId

    def handle(request):
        if second_batch_first_id in request.get_data(as_text=True):
            return Response('{"message": "gateway exploded"}', status=500, content_type="application/json")
        status, body = api.answer(request.method, request.path, request.query_string.decode(), request.get_data())
        return Response(json.dumps(body), status=status, content_type="application/json")

    httpserver.expect_request(ANY).respond_with_handler(handle)
    (repo_copy / "papers.yaml").write_text(text)
    empty_store(repo_copy)
    assert main(["enrich", "--api-url", httpserver.url_for("/graph/v1"), "--retries", "1", "--backoff", "0.01"]) == 1
    kept = load_store(STORE).records
    assert len(kept) == 500 and "paper-00499" in kept and "paper-00500" not in kept
    api_batches_before = len(api.batches)
    httpserver.clear_all_handlers()
    assert main(["enrich", "--api-url", serve(httpserver, api)]) == 0  # the rerun resumes
    assert [len(batch) for batch in api.batches[api_batches_before:]] == [500, 100]
    assert len(load_store(STORE).records) == 1100


def test_api_key_is_sent_as_header(repo_copy, httpserver, monkeypatch):
    api = FakeS2(seed_papers())
    monkeypatch.setenv("S2_API_URL", serve(httpserver, api, headers={"x-api-key": "s3cret"}))
    monkeypatch.setenv("S2_API_KEY", "s3cret")
    empty_store(repo_copy)
    assert main(["enrich"]) == 0 and len(api.batches) == 1
    assert httpserver.log[0][0].headers["x-api-key"] == "s3cret"


# ---- catalog add ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lookup", ["ARXIV:2401.00001", "f" * 40, "MoRA: A made-up adapter for tests"])
def test_add_inserts_a_valid_entry_and_keeps_every_line(repo_copy, fake_with_new, lookup, capsys):
    papers = repo_copy / "papers.yaml"
    before = papers.read_text()
    status = main(
        [
            "add",
            lookup,
            "--api-url",
            fake_with_new,
            "--section",
            "NLP / Methods",
            "--kind",
            "method",
            "--tags",
            "LoRA",
            "--impl",
            "lora",
        ]
    )
    assert status == 0, capsys.readouterr().err
    after = papers.read_text()
    # Every old line is still there, unchanged and in order: the only difference is one inserted block.
    changes = difflib.SequenceMatcher(a=before.splitlines(), b=after.splitlines(), autojunk=False).get_opcodes()
    edits = [change for change in changes if change[0] != "equal"]
    assert len(edits) == 1 and edits[0][0] == "insert"
    catalog = load_catalog("papers.yaml")
    new = next(entry for entry in catalog.entries if entry.id == "mora")
    added = after.splitlines()[new.line - 1 : new.line - 1 + edits[0][4] - edits[0][3]]
    assert added[-1] == ""  # the block and the blank line that separates it
    assert added[:5] == [
        "- id: mora",
        '  title: "MoRA: A Made-up Adapter for Tests"',
        "  kind: method",
        "  section: NLP / Methods",
        '  arxiv: "2401.00001"',
    ]
    assert "  tags: [LoRA]" in added and "  impl: [lora]" in added
    last_methods = [entry for entry in catalog.entries if entry.section == "NLP / Methods"]
    assert last_methods[-1] is new  # right after the section's last entry
    assert load_store(STORE).records["mora"].paper.title == NEW_PAPER["title"]
    assert main(["check"]) == 0


def test_add_refuses_duplicates_with_the_existing_line(repo_copy, fake_with_new, capsys):
    before = (repo_copy / "papers.yaml").read_bytes(), STORE.read_bytes()
    assert (
        main(["add", "ARXIV:2106.09685", "--api-url", fake_with_new, "--section", "NLP / Methods", "--kind", "method"])
        == 1
    )
    line = (repo_copy / "papers.yaml").read_text().splitlines().index("- id: lora") + 1
    assert f"already in the catalog: papers.yaml:{line}: entry 'lora'" in capsys.readouterr().err
    assert ((repo_copy / "papers.yaml").read_bytes(), STORE.read_bytes()) == before


def test_add_reports_unknown_papers_and_bad_options_without_writing(repo_copy, fake_with_new, capsys):
    before = (repo_copy / "papers.yaml").read_bytes(), STORE.read_bytes()
    assert (
        main(["add", "ARXIV:2401.99999", "--api-url", fake_with_new, "--section", "NLP / Methods", "--kind", "method"])
        == 1
    )
    assert "has no paper with id 'ARXIV:2401.99999'" in capsys.readouterr().err
    assert (
        main(
            [
                "add",
                "ARXIV:2401.00001",
                "--api-url",
                fake_with_new,
                "--section",
                "NLP / Methods",
                "--kind",
                "method",
                "--tags",
                "NotATag",
            ]
        )
        == 1
    )
    assert "unknown tag(s) 'NotATag'" in capsys.readouterr().err
    assert (
        main(["add", "ARXIV:2401.00001", "--api-url", fake_with_new, "--section", "Nowhere", "--kind", "method"]) == 1
    )
    assert ((repo_copy / "papers.yaml").read_bytes(), STORE.read_bytes()) == before
