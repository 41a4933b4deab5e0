"""The metadata store: one Semantic Scholar record per paper, committed as JSON.

Records keep the API's own field names (paperId, externalIds, title, authors[{name}], venue, year,
citationCount, tldr{text}, abstract, citationStyles{bibtex}, ...), plus where and when each came from.
Every record is validated into a typed `Paper` when the store is read (catalog/record.py), so a
store edited by hand fails with a message naming the record and the field, never later in a page.
Writes are atomic (a temporary file in the same folder, then a rename), so an interrupted run leaves
either the old file or the new one, never half of one; a temporary file left by a killed run is
removed by the next write
(its name holds the dead writer's pid). The JSON is sorted and indented so that a refresh reviews well as a diff.
"""

import datetime
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from catalog.record import PAPER_FIELDS, Paper, RecordError, parse_paper

STORE_FORMAT = 1
SEED_SOURCE = "seed-list"  # records initialised from the seed list, not yet fetched from the API
FACTS_SOURCE = "facts"  # records written from gathered facts (new-entries.yaml), not yet fetched from the API


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class StoredRecord:
    paper: Paper  # the API's record, validated
    source: str  # SEED_SOURCE, FACTS_SOURCE, or the API base URL the record was fetched from
    retrieved: datetime.datetime  # when it was fetched (timezone-aware)

    def to_json(self) -> dict:
        return {
            "paper": self.paper.to_json(),
            "source": self.source,
            "retrieved": self.retrieved.isoformat(timespec="seconds"),
        }


@dataclass
class MetadataStore:
    records: dict[str, StoredRecord] = field(default_factory=dict)  # entry id -> record

    def get(self, entry_id: str) -> StoredRecord | None:
        return self.records.get(entry_id)


def load_store(path: str | Path) -> MetadataStore:
    """The store at path (empty if there is none). StoreError names every record that is not valid."""
    path = Path(path)
    if not path.exists():
        return MetadataStore()
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        reason = (
            error.strerror
            if isinstance(error, OSError)
            else "not valid JSON"
            if not isinstance(error, UnicodeDecodeError)
            else "not UTF-8"
        )
        raise StoreError(f"{path}: not a valid metadata store ({reason}: {error})") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise StoreError(
            f"{path}: not a valid metadata store: unknown store format {found!r} (expected {STORE_FORMAT})"
        )
    if not isinstance(data.get("records"), dict):
        raise StoreError(f"{path}: not a valid metadata store: 'records' must be an object of entry id -> record")
    records, problems = {}, []
    for entry_id, record in data["records"].items():
        try:
            records[entry_id] = stored_record(record)
        except RecordError as error:
            problems.append(f"{path}: record {entry_id!r}: {error}")
    if problems:
        raise StoreError("\n".join(problems) + "\n(fix these records, or delete them and run `catalog enrich`)")
    return MetadataStore(records)


def stored_record(data: object) -> StoredRecord:
    """A StoredRecord from its JSON form; RecordError names what is wrong."""
    if not isinstance(data, dict) or set(data) != {"paper", "source", "retrieved"}:
        raise RecordError("a record has exactly the keys 'paper', 'source' and 'retrieved'")
    if not isinstance(data["source"], str) or not data["source"]:
        raise RecordError("source: must be a non-empty string")
    try:
        retrieved = datetime.datetime.fromisoformat(data["retrieved"])
    except (TypeError, ValueError):
        raise RecordError(f"retrieved: {data['retrieved']!r} is not an ISO 8601 time") from None
    if retrieved.tzinfo is None:
        raise RecordError(f"retrieved: {data['retrieved']!r} has no time zone")
    unknown = sorted(set(data["paper"]) - set(PAPER_FIELDS)) if isinstance(data["paper"], dict) else []
    if unknown:
        raise RecordError(f"paper.{unknown[0]}: not a field of a Semantic Scholar record we ask for")
    try:
        paper = parse_paper(data["paper"], needs_paper_id=data["source"] != FACTS_SOURCE)
    except RecordError as error:
        raise RecordError(f"paper.{error}") from None
    return StoredRecord(paper, data["source"], retrieved)


def dump_store(store: MetadataStore) -> str:
    records = {entry_id: record.to_json() for entry_id, record in store.records.items()}
    return json.dumps({"format": STORE_FORMAT, "records": records}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def save_store(store: MetadataStore, path: str | Path) -> None:
    write_atomically(Path(path), dump_store(store))


def write_atomically(path: Path, text: str) -> None:
    """Write text to path, line endings as they are, so that readers see the old file or the new one,
    never a partial one. The temporary file's name holds the writer's pid: one left by a killed
    writer (whose pid is gone) is removed here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        if not _alive(leftover.name.removeprefix(f".{path.name}.").split(".")[0]):
            leftover.unlink(missing_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False  # not one of ours (or from before pids were in the name): stale
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
