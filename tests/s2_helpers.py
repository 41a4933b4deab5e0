"""The stand-in Semantic Scholar API as pytest fixtures, and the helpers the enrich tests share
(registered as a plugin in conftest.py)."""

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
from werkzeug import Response

from catalog.s2 import RetryPolicy, S2Client
from catalog.store import load_store

from fake_s2 import FakeS2
from repo_inputs import REPO

ANY = re.compile(".*")
STORE = Path("catalog/metadata.json")


def _asked() -> int:
    """How many papers of the committed catalog `catalog enrich` asks for (not those known only by
    an OpenReview id, which the API does not take)."""
    from catalog.enrich import lookup_id
    from catalog.load import load_catalog

    return sum(1 for entry in load_catalog(REPO / "papers.yaml").entries if entry.paper and lookup_id(entry))


ASKED = _asked()


def seed_papers() -> list[dict]:
    """The committed records, as the API would return them (with its BibTeX). Records written from
    gathered facts have no paper id yet: the API's would be its own, so one is made up here."""
    store = load_store(REPO / "catalog" / "metadata.json")
    papers = []
    for entry_id, record in store.records.items():
        paper = record.paper.to_json()
        paper.setdefault("paperId", hashlib.sha1(entry_id.encode()).hexdigest())
        paper["citationStyles"] = {"bibtex": f"@Article{{{entry_id},\n title = {{{paper['title']}}}\n}}"}
        paper["citationCount"] = 1000 + len(papers)
        papers.append(paper)
    return papers


def serve(httpserver, api: FakeS2, **expected) -> str:
    """Answer every request (matching `expected`, e.g. headers=...) as the fake API; returns its base URL."""

    def handle(request):
        status, body = api.answer(request.method, request.path, request.query_string.decode(), request.get_data())
        return Response(json.dumps(body), status=status, content_type="application/json")

    httpserver.expect_request(ANY, **expected).respond_with_handler(handle)
    return httpserver.url_for("/graph/v1")


@pytest.fixture
def fake(httpserver):
    """The fake API on a local port; returns (FakeS2, base URL). Faults are queued as oneshot handlers."""
    api = FakeS2(seed_papers())
    return api, serve(httpserver, api)


def fault(httpserver, status=500, body='{"message": "Internal Server Error"}', headers=None, delay=0.0):
    def handle(request):
        time.sleep(delay)
        return Response(body, status=status, headers=headers or {}, content_type="application/json")

    httpserver.expect_oneshot_request(ANY).respond_with_handler(handle)


def fast(url, **policy) -> S2Client:
    waits = []
    client = S2Client(
        url, timeout=policy.pop("timeout", 5.0), policy=RetryPolicy(base_seconds=0.01, sleep=waits.append, **policy)
    )
    client.waits = waits
    return client


def empty_store(root: Path) -> None:
    (root / STORE).write_text(json.dumps({"format": 1, "records": {}}))


NEW_PAPER = {
    "paperId": "f" * 40,
    "externalIds": {"ArXiv": "2401.00001", "CorpusId": 1},
    "title": "MoRA: A Made-up Adapter for Tests",
    "authors": [{"authorId": "1", "name": "Ada Lovelace"}],
    "venue": "arXiv.org",
    "year": 2024,
    "citationCount": 3,
    "tldr": {"model": "tldr@v2.0.0", "text": "A test."},
    "abstract": "An abstract.",
    "citationStyles": {"bibtex": "@Article{mora}"},
}


@pytest.fixture
def fake_with_new(httpserver):
    """The fake API knowing NEW_PAPER too; returns its base URL."""
    return serve(httpserver, FakeS2(seed_papers() + [NEW_PAPER]))


@pytest.fixture
def api_with(httpserver):
    """api_with(*papers): the fake API knowing the seed papers and these; returns its base URL."""
    return lambda *papers: serve(httpserver, FakeS2(seed_papers() + list(papers)))
