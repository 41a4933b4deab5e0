"""Write a synthetic catalog of N entries (papers.yaml + metadata store) for benchmarks and tests.

    python benchmarks/synthetic_catalog.py N OUT_DIR

Entries are spread over every section and tag, with realistic lengths of title, author list,
TLDR and abstract, so page sizes and build times resemble a real catalog of that size.
"""

import datetime
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from catalog.record import Paper  # noqa: E402
from catalog.store import SEED_SOURCE, MetadataStore, StoredRecord, save_store  # noqa: E402
from catalog.vocabulary import KINDS, SECTIONS, TAGS  # noqa: E402

WORDS = (
    "adapter low rank prompt prefix sparse efficient tuning transfer multilingual vision speech "
    "composition routing mixture experts scaling quantised serving kernel hypernetwork language "
    "model transformer representation intervention budget allocation orthogonal"
).split()


RETRIEVED = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)


def synthetic_entries(count: int, seed: int = 0) -> tuple[str, MetadataStore]:
    rng = random.Random(seed)
    sections, tags, kinds = [s.name for s in SECTIONS], list(TAGS), list(KINDS)
    lines, records = ["# synthetic catalog for benchmarks"], {}
    start = datetime.date(2024, 1, 1)
    for index in range(count):
        entry_id = f"paper-{index:05d}"
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + f" {index}"
        s2 = f"{rng.getrandbits(160):040x}"
        lines += [
            f"- id: {entry_id}",
            f"  title: {json.dumps(title)}",
            f"  kind: {rng.choice(kinds)}",
            f"  section: {sections[index % len(sections)]}",
            f'  arxiv: "{20 + index % 5}{1 + index % 12:02d}.{index:05d}"',
            f"  s2: {s2}",
            f"  code: https://example.org/code/{entry_id}",
            f"  tags: [{', '.join(rng.sample(tags, rng.randint(1, 3)))}]",
            "  impl: []",
            f"  added: {start + datetime.timedelta(days=index % 700)}",
            "",
        ]
        paper = {
            "paperId": s2,
            "title": title,
            "year": 2017 + index % 9,
            "venue": rng.choice(["arXiv.org", "NeurIPS", "ICLR", "ACL", "EMNLP"]),
            "authors": [{"name": f"Author {rng.randint(1, 5000)}"} for _ in range(rng.randint(1, 12))],
            "citationCount": rng.randint(0, 3000),
            "tldr": {"text": " ".join(rng.choice(WORDS) for _ in range(40))},
            "abstract": " ".join(rng.choice(WORDS) for _ in range(180)),
        }
        records[entry_id] = StoredRecord(Paper.model_validate(paper), SEED_SOURCE, RETRIEVED)
    return "\n".join(lines), MetadataStore(records)


def write_synthetic(target: Path, count: int) -> None:
    """Overwrite target's papers.yaml and catalog/metadata.json with a synthetic catalog. Its
    reference_impls/ is emptied too: the real modules name real entries, which are not there."""
    text, store = synthetic_entries(count)
    (target / "papers.yaml").write_text(text, encoding="utf-8")
    save_store(store, target / "catalog" / "metadata.json")
    if (target / "reference_impls").exists():
        shutil.rmtree(target / "reference_impls")
        (target / "reference_impls").mkdir()


if __name__ == "__main__":
    write_synthetic(Path(sys.argv[2]), int(sys.argv[1]))
