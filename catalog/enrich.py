"""Stage 2b: fill the metadata store from Semantic Scholar, in batches of at most 500 ids.

`plan` decides which entries need a record (missing, too old, or all with refresh); `enrich` fetches
them batch by batch and hands the updated store to a callback after every batch, so the caller can
save it at once and an interrupted run loses nothing. Records are matched back to entries by the
identifier that was asked for, never by position: the client drops the API's null slots. A record
the client refused (catalog/record.py says why) leaves the entry's old record in place.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from catalog import identifiers
from catalog.record import Paper
from catalog.s2 import BATCH_SIZE, S2Client
from catalog.schema import Entry
from catalog.store import FACTS_SOURCE, MetadataStore, StoredRecord


def lookup_id(entry: Entry) -> str | None:
    """The id we ask the API for: the exact S2 id if known, else arXiv, ACL, DOI (the API's prefixes);
    None for a paper known only by ids the API does not take (OpenReview)."""
    return identifiers.api_id(entry.identifiers)


def answers(asked: str, paper: Paper) -> bool:
    """Whether the record is the paper that `asked` names."""
    return identifiers.answers(asked, paper.paperId, paper.externalIds)


def plan(
    entries: list[Entry], store: MetadataStore, now: datetime, max_age_days: float | None = None, refresh: bool = False
) -> list[Entry]:
    """The paper entries whose record is missing, written from gathered facts, older than max_age_days,
    or (refresh) all of them; never those the API cannot look up (see `unreachable`)."""
    todo = []
    for entry in entries:
        if not entry.paper or lookup_id(entry) is None:
            continue
        record = store.get(entry.id)
        if refresh or record is None or record.source == FACTS_SOURCE:
            todo.append(entry)
        elif max_age_days is not None and now - record.retrieved > timedelta(days=max_age_days):
            todo.append(entry)
    return todo


def unreachable(entries: list[Entry]) -> list[Entry]:
    """The papers with no identifier the API takes: their records stay as written."""
    return [entry for entry in entries if entry.paper and lookup_id(entry) is None]


@dataclass
class EnrichReport:
    fetched: list[str] = field(default_factory=list)  # entry ids updated
    not_found: list[tuple[Entry, str]] = field(default_factory=list)  # entry, id asked for
    rejected: list[tuple[Entry, str, str]] = field(default_factory=list)  # entry, id asked for, why
    batches: int = 0


def batches(entries: list[Entry], size: int = BATCH_SIZE) -> Iterator[list[Entry]]:
    for start in range(0, len(entries), size):
        yield entries[start : start + size]


def enrich(
    todo: list[Entry],
    store: MetadataStore,
    client: S2Client,
    on_batch: Callable[[MetadataStore, int, int], None] = lambda store, done, total: None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> tuple[MetadataStore, EnrichReport]:
    """Fetch records for `todo`; returns the new store (the input is not changed) and a report.

    A failure after the retries propagates (S2Error); the stores already passed to on_batch hold
    every batch finished before it.
    """
    store = MetadataStore(dict(store.records))
    report = EnrichReport()
    chunks = list(batches(todo))
    for number, chunk in enumerate(chunks, start=1):
        asked = [lookup_id(entry) for entry in chunk]
        papers = client.get_papers(asked)
        rejected = dict(client.rejected)
        retrieved = now().replace(microsecond=0)
        for entry, wanted in zip(chunk, asked):
            paper = next((paper for paper in papers if answers(wanted, paper)), None)
            if wanted in rejected:
                report.rejected.append((entry, wanted, rejected[wanted]))  # keep whatever record we had
            elif paper is None:
                report.not_found.append((entry, wanted))  # likewise
            else:
                store.records[entry.id] = StoredRecord(paper, client.api_url, retrieved)
                report.fetched.append(entry.id)
        report.batches = number
        on_batch(store, number, len(chunks))
    return store, report
