"""A misbehaving Semantic Scholar: `catalog enrich` and `catalog add` refuse bad records one by one
(naming the paper and the field), retry what may pass, end within the time their options promise,
and leave the store valid, byte-for-byte unchanged where nothing new was fetched."""

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from werkzeug import Response

from catalog.cli import main
from catalog.s2 import RetryPolicy, S2Client, retry_after_seconds
from catalog.store import load_store

from fake_s2 import FakeS2
from raw_server import answer, cut_off, drip, raw_server
from s2_helpers import ANY, ASKED, NEW_PAPER, STORE, fault, seed_papers

LORA_ID = "a8ca46b171467ceb2d7652fbfb67fe701ad86092"


def run(argv, capsys) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return status, out, err


def mangled(httpserver, api, change):
    """The next batch request is answered by the fake API, then change(list of records) applied."""

    def handle(request):
        status, body = api.answer(request.method, request.path, request.query_string.decode(), request.get_data())
        return Response(json.dumps(change(body)), status=status, content_type="application/json")

    httpserver.expect_oneshot_request(ANY).respond_with_handler(handle)


def with_lora(**fields):
    """A change to a batch answer: the lora record's fields replaced."""

    def change(records):
        return [{**record, **fields} if record and record["paperId"] == LORA_ID else record for record in records]

    return change


# ---- records of the wrong shape: refused one by one ---------------------------------------------------

BAD_RECORDS = [
    ("publicationDate", "2020-13-01", "publicationDate: '2020-13-01' is not a real date YYYY-MM-DD"),
    ("tldr", "a string", "tldr: Input should be a valid dictionary"),
    ("externalIds", ["ArXiv", "2106.09685"], "externalIds: Input should be a valid dictionary"),
    ("authors", "J", "authors: Input should be a valid list"),
    ("venue", {}, "venue: Input should be a valid string"),
    ("openAccessPdf", "u", "openAccessPdf: Input should be a valid dictionary"),
    ("citationStyles", "s", "citationStyles: Input should be a valid dictionary"),
    ("year", "soon", "year: Input should be a valid integer"),
    ("year", True, "year: Input should be a valid integer"),
    ("citationCount", -5, "citationCount: Input should be greater than or equal to 0"),
    ("title", "x" * 3000, "title: String should have at most 2000 characters"),
    ("paperId", None, "paperId: a Semantic Scholar record needs its paper id"),
]


@pytest.mark.parametrize("field, value, message", BAD_RECORDS, ids=[f"{f}={v!r}"[:30] for f, v, _ in BAD_RECORDS])
def test_a_bad_record_is_refused_and_the_old_one_kept(repo_copy, fake, httpserver, capsys, field, value, message):
    api, url = fake
    mangled(httpserver, api, with_lora(**{field: value}))
    old = load_store(STORE).records["lora"]
    status, out, err = run(["enrich", "--api-url", url, "--refresh"], capsys)
    assert status == 0 and f"fetched {ASKED - 1} of {ASKED} papers in 1 request(s); 0 not found, 1 refused" in out
    line = next(
        n for n, text in enumerate((repo_copy / "papers.yaml").read_text().splitlines(), 1) if text == "- id: lora"
    )
    assert (
        f"papers.yaml:{line}: entry 'lora': Semantic Scholar's record (ARXIV:2106.09685) was refused: {message}" in err
        or f"papers.yaml:{line}: entry 'lora': Semantic Scholar's record ({LORA_ID}) was refused: {message}" in err
    ), err
    store = load_store(STORE)
    assert store.records["lora"] == old and store.records["vera"].source == url
    assert run(["check"], capsys)[0] == 0 and run(["render"], capsys)[0] == 0


def test_unambiguous_values_are_coerced(repo_copy, fake, httpserver, capsys):
    api, url = fake
    mangled(httpserver, api, with_lora(year="2021", citationCount="2644", paperId=LORA_ID.upper()))
    assert run(["enrich", "--api-url", url, "--refresh"], capsys)[0] == 0
    lora = load_store(STORE).records["lora"].paper
    assert (lora.year, lora.citationCount, lora.paperId) == (2021, 2644, LORA_ID)
    assert '"year": 2021' in STORE.read_text()
    assert run(["render"], capsys)[0] == 0


@pytest.mark.parametrize("body", [["a string"] * ASKED, [{"title": "no paperId"}] * ASKED, [[1, 2]] * ASKED])
def test_a_batch_of_garbage_stores_nothing(repo_copy, fake, httpserver, capsys, body):
    api, url = fake
    mangled(httpserver, api, lambda records: body)
    before = STORE.read_bytes()
    status, out, err = run(["enrich", "--api-url", url, "--refresh"], capsys)
    assert status == 0 and f"fetched 0 of {ASKED} papers in 1 request(s); 0 not found, {ASKED} refused" in out
    assert len(err.strip().splitlines()) == ASKED and STORE.read_bytes() == before


# ---- the protocol: status, Retry-After, deadlines ---------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("3", 3.0),
        ("0", 0.0),
        ("2.5", 2.5),
        ("soon", None),
        ("", None),
        ("-3", None),
        ("inf", None),
        ("1e9", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: now
        ("Wed, 21 Oct 2015 07:28:00 -0000", 0.0),  # RFC 2822's "no zone": naive, read as UTC
        ("Wed, 99 Oct 2015 07:28:00 GMT", None),
        ("Thu, 01 Jan 1970 00:00:00 +9999", None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value, expected):
    assert retry_after_seconds(value) == expected
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after_seconds(soon) <= 30


def test_unreadable_retry_after_falls_back_to_the_backoff(repo_copy, fake, httpserver):
    api, url = fake
    fault(httpserver, 429, headers={"Retry-After": "soon"})
    waits = []
    client = S2Client(url, policy=RetryPolicy(base_seconds=0.01, sleep=waits.append))
    assert len(client.get_papers(["ARXIV:2106.09685"])) == 1 and waits == [0.01]


def test_retry_after_as_a_date_is_honoured(repo_copy, fake, httpserver):
    api, url = fake
    fault(
        httpserver,
        503,
        headers={"Retry-After": format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)},
    )
    waits = []
    client = S2Client(url, policy=RetryPolicy(base_seconds=0.01, sleep=waits.append))
    assert len(client.get_papers(["ARXIV:2106.09685"])) == 1 and 15 < waits[0] <= 20


def test_retry_after_beyond_the_budget_gives_up_at_once(repo_copy, fake, httpserver, capsys):
    api, url = fake
    fault(httpserver, 429, headers={"Retry-After": "3600"})
    before = STORE.read_bytes()
    started = time.monotonic()
    status, _, err = run(["enrich", "--api-url", url, "--refresh", "--retry-budget", "300"], capsys)
    assert status == 1 and time.monotonic() - started < 5 and STORE.read_bytes() == before
    assert "not retried: the next try, in 3600 s, would end past the retry budget of 300 s" in err


def test_a_404_from_the_batch_endpoint_is_a_clear_error(repo_copy, httpserver, capsys):
    httpserver.expect_request(ANY).respond_with_json({"error": "Not found"}, status=404)
    before = STORE.read_bytes()
    status, _, err = run(["enrich", "--api-url", httpserver.url_for("/wrong/v1"), "--refresh"], capsys)
    assert status == 1 and STORE.read_bytes() == before
    assert "HTTP 404 Not found: the batch endpoint is missing; is the API URL right" in err


@pytest.mark.parametrize(
    "status, body",
    [(200, '{"error": "oops"}'), (200, "[" * 20_000), (200, "<html>"), (200, '"a string"'), (500, "[" * 20_000)],
)
def test_garbled_answers_are_retried(repo_copy, fake, httpserver, capsys, status, body):
    api, url = fake
    fault(httpserver, status, body)
    status, out, _ = run(["enrich", "--api-url", url, "--refresh", "--backoff", "0.01"], capsys)
    assert status == 0 and f"fetched {ASKED} of {ASKED} papers in 2 request(s)" in out


def test_a_client_error_is_not_retried(repo_copy, httpserver, capsys):
    httpserver.expect_request(ANY).respond_with_json({"error": "Unrecognized field 'x'"}, status=400)
    status, _, err = run(["enrich", "--api-url", httpserver.url_for("/graph/v1"), "--refresh"], capsys)
    assert status == 1 and "HTTP 400 Unrecognized field 'x'" in err and len(httpserver.log) == 1


def test_a_server_dripping_its_body_is_cut_off_at_the_deadline(repo_copy, capsys):
    before = STORE.read_bytes()
    with raw_server([drip(interval=0.5)]) as (url, served):
        started = time.monotonic()
        status, _, err = run(["enrich", "--api-url", url, "--refresh", "--timeout", "1.5", "--retries", "0"], capsys)
        elapsed = time.monotonic() - started
    assert status == 1 and 1.4 < elapsed < 4, elapsed
    assert "no complete answer within 1.5 s" in err and STORE.read_bytes() == before


def test_the_worst_case_is_the_budget_plus_one_timeout(repo_copy, capsys):
    """Every attempt drips; with --timeout 1 and --retry-budget 2 the run ends within 3 s (+ slack)."""
    with raw_server([drip(interval=0.3)]) as (url, served):
        started = time.monotonic()
        status, _, err = run(
            [
                "enrich",
                "--api-url",
                url,
                "--refresh",
                "--timeout",
                "1",
                "--retries",
                "50",
                "--backoff",
                "0.1",
                "--retry-budget",
                "2",
            ],
            capsys,
        )
        elapsed = time.monotonic() - started
    assert status == 1 and elapsed < 3 + 1.5, elapsed
    assert len(served) >= 2  # it did retry, within the budget


def test_a_connection_dropped_mid_body_is_retried(repo_copy, capsys):
    api = FakeS2(seed_papers())
    with raw_server([cut_off(), answer(api)]) as (url, served):
        status, out, err = run(["enrich", "--api-url", url, "--refresh", "--backoff", "0.01"], capsys)
    assert status == 0 and f"fetched {ASKED} of {ASKED} papers in 2 request(s)" in out and len(served) == 2


@pytest.mark.parametrize(
    "option, value",
    [
        ("--timeout", "0"),
        ("--timeout", "-1"),
        ("--timeout", "nan"),
        ("--retries", "-1"),
        ("--retries", "x"),
        ("--retry-budget", "inf"),
        ("--max-age", "abc"),
    ],
)
def test_bad_options_are_usage_errors(repo_copy, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["enrich", option, value])
    assert exit_info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_help_states_the_worst_case(capsys):
    with pytest.raises(SystemExit):
        main(["enrich", "--help"])
    assert "each ending within --retry-budget + --timeout seconds" in " ".join(capsys.readouterr().out.split())


# ---- the store: temporary files of a killed write ----------------------------------------------------


def test_a_killed_writes_temporary_file_is_removed_and_ignored_by_git(repo_copy, fake, capsys):
    from conftest import REPO

    api, url = fake
    leftover = STORE.parent / ".metadata.json.999999999.k1ll3d.tmp"  # no process has that pid
    leftover.write_text('{"format": 1, "rec')
    assert run(["enrich", "--api-url", url, "--refresh"], capsys)[0] == 0
    assert not leftover.exists() and load_store(STORE).records
    ignored = subprocess.run(["git", "check-ignore", "-q", "catalog/.metadata.json.123.abc.tmp"], cwd=REPO)
    assert ignored.returncode == 0


# ---- catalog add -----------------------------------------------------------------------------------


def add(url, lookup, capsys, *extra):
    return run(["add", lookup, "--api-url", url, "--section", "NLP / Methods", "--kind", "method", *extra], capsys)


def test_add_refuses_a_record_without_a_title(repo_copy, api_with, capsys):
    url = api_with({**NEW_PAPER, "title": None})
    before = (repo_copy / "papers.yaml").read_bytes(), STORE.read_bytes()
    status, _, err = add(url, "ARXIV:2401.00001", capsys)
    assert status == 1 and f"Semantic Scholar's record {'f' * 40} has no title" in err
    assert ((repo_copy / "papers.yaml").read_bytes(), STORE.read_bytes()) == before


def test_add_refuses_an_ambiguous_title_and_lists_the_candidates(repo_copy, api_with, capsys):
    twin = {**NEW_PAPER, "paperId": "e" * 40, "externalIds": {"ArXiv": "2402.00002"}, "year": 2025}
    url = api_with(NEW_PAPER, twin)
    before = (repo_copy / "papers.yaml").read_bytes()
    status, _, err = add(url, "MoRA: a made-up adapter for tests", capsys)
    assert status == 1 and "2 papers are titled 'MoRA: a made-up adapter for tests'" in err
    assert f"catalog add {'f' * 40}" in err and f"catalog add {'e' * 40}" in err and "(2025, arXiv.org)" in err
    assert (repo_copy / "papers.yaml").read_bytes() == before


def test_add_by_a_title_that_is_only_close(repo_copy, api_with, capsys):
    url = api_with(NEW_PAPER)
    status, _, err = add(url, "MoRA: A Made-up Adapter for Tests and More", capsys)
    assert status == 1 and "Semantic Scholar has no paper titled" in err


def test_add_keeps_crlf_line_endings(repo_copy, api_with, capsys):
    papers = repo_copy / "papers.yaml"
    papers.write_bytes(papers.read_bytes().replace(b"\n", b"\r\n"))
    before = papers.read_bytes()
    assert add(api_with(NEW_PAPER), "ARXIV:2401.00001", capsys)[0] == 0
    after = papers.read_bytes()
    assert b"\n" not in after.replace(b"\r\n", b"") and len(after) > len(before)
    assert all(line in after.split(b"\r\n") for line in before.split(b"\r\n"))


def test_add_with_a_malformed_store_says_so(repo_copy, api_with, capsys):
    STORE.write_text('{"format": 1, "records": {"lora": {"paper": {"year": "x"}}}}')
    status, _, err = add(api_with(NEW_PAPER), "ARXIV:2401.00001", capsys)
    assert status == 1 and "error: catalog/metadata.json: record 'lora'" in err


@pytest.mark.parametrize("lookup", ["F" * 40, "arxiv:2401.00001", " ARXIV: 2401.00001 ", "2401.00001"])
def test_add_understands_ids_however_written(repo_copy, api_with, capsys, lookup):
    status, out, err = add(api_with(NEW_PAPER), lookup, capsys)
    assert status == 0 and "added 'mora'" in out, err


@pytest.mark.parametrize(
    "lookup, message",
    [
        ("ARXIV:2401", "malformed arXiv id '2401'"),
        ("DOI:nope", "malformed DOI 'nope'"),
        ("CorpusId:abc", "malformed Semantic Scholar corpus id"),
    ],
)
def test_add_refuses_malformed_ids_before_asking(repo_copy, httpserver, capsys, lookup, message):
    status, _, err = add(httpserver.url_for("/graph/v1"), lookup, capsys)
    assert status == 1 and message in err and not httpserver.log


def test_python_dash_m_catalog_works(repo_copy):
    result = subprocess.run([sys.executable, "-m", "catalog", "check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and re.search(r"\d+ entries, 0 error\(s\)", result.stdout)
