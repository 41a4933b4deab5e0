"""The metadata store: one Semantic Scholar record per paper, committed as JSON.

Records keep the API's own field names (paperId, externalIds, title, authors[{name}], venue, year,
citationCount, tldr{text}, abstract, citationStyles{bibtex}, ...), plus where and when each came from.
Writes are atomic (a temporary file in the same folder, then a rename), so an interrupted run leaves
either the old file or the new one, never half of one. The JSON is sorted and indented so that a
refresh reviews well as a diff.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

STORE_FORMAT = 1
SEED_SOURCE = "seed-list"  # records initialised from the seed list, not yet fetched from the API


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class StoredRecord:
    paper: dict  # the API's record, its field names unchanged
    source: str  # SEED_SOURCE, or the API base URL the record was fetched from
    retrieved: str  # ISO 8601 timestamp of the fetch

    def to_json(self) -> dict:
        return {"paper": self.paper, "source": self.source, "retrieved": self.retrieved}


@dataclass
class MetadataStore:
    records: dict[str, StoredRecord] = field(default_factory=dict)  # entry id -> record

    def get(self, entry_id: str) -> StoredRecord | None:
        return self.records.get(entry_id)


def load_store(path: str | Path) -> MetadataStore:
    path = Path(path)
    if not path.exists():
        return MetadataStore()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: unknown store format {data.get('format')!r} (expected {STORE_FORMAT})")
        records = {entry_id: StoredRecord(r["paper"], r["source"], r["retrieved"])
                   for entry_id, r in data["records"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StoreError(f"{path}: not a valid metadata store ({error})") from error
    return MetadataStore(records)


def dump_store(store: MetadataStore) -> str:
    records = {entry_id: record.to_json() for entry_id, record in store.records.items()}
    return json.dumps({"format": STORE_FORMAT, "records": records}, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def save_store(store: MetadataStore, path: str | Path) -> None:
    write_atomically(Path(path), dump_store(store))


def write_atomically(path: Path, text: str) -> None:
    """Write text to path so that readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
