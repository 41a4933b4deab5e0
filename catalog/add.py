"""`catalog add`: turn one Semantic Scholar record into a new papers.yaml entry.

The new entry is inserted as a block of text after the last entry of its section, so every
existing line, comment and the order of the file stay exactly as they were, line endings included.
"""

import datetime
import json
import re

import yaml

from catalog import identifiers
from catalog.identifiers import normalise_title
from catalog.load import LoadedCatalog
from catalog.record import Paper
from catalog.schema import Entry


def identifiers_from_record(paper: Paper) -> dict[str, str]:
    return identifiers.record_ids(paper.paperId, paper.externalIds)


def exact_title_matches(title: str, papers: list[Paper]) -> list[Paper]:
    """The papers (one per paperId) whose title is `title` as duplicates are compared."""
    wanted = normalise_title(title)
    found = {paper.paperId: paper for paper in papers if paper.title and normalise_title(paper.title) == wanted}
    return list(found.values())


def suggest_id(title: str, taken: set[str]) -> str:
    """A slug from the title: the name before a colon if there is one ("LoRA: ..." -> lora), else
    the first four words; made unique with -2, -3, ..."""
    head = title.split(":")[0] if ":" in title and len(title.split(":")[0]) <= 30 else " ".join(title.split()[:4])
    base = re.sub(r"[^a-z0-9]+", "-", head.lower()).strip("-") or "paper"
    candidate, number = base, 2
    while candidate in taken:
        candidate, number = f"{base}-{number}", number + 1
    return candidate


def find_duplicate(catalog: LoadedCatalog, title: str, ids: dict[str, str]) -> Entry | None:
    """The entry that is the same paper (by the keys `catalog check` uses), or None."""
    keys = set(identifiers.duplicate_keys(title, ids))
    return next(
        (entry for entry in catalog.entries if keys & set(identifiers.duplicate_keys(entry.title, entry.identifiers))),
        None,
    )


def _scalar(value: str, in_list: bool = False) -> str:
    """Plain if YAML reads it back as the same string, else double-quoted (JSON is valid YAML)."""
    plain = f"k: [{value}]" if in_list else f"k: {value}"
    try:
        read = yaml.safe_load(plain)["k"]
    except yaml.YAMLError:
        read = None
    return value if read == ([value] if in_list else value) else json.dumps(value, ensure_ascii=False)


def entry_block(fields: dict) -> str:
    """The entry as a contributor would write it: plain scalars where safe, lists in flow style
    (with "\\n" line endings; insert_entry writes them as the file has them)."""
    lines = []
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list):
            text = "[" + ", ".join(_scalar(item, in_list=True) for item in value) + "]"
        elif isinstance(value, datetime.date):
            text = value.isoformat()
        else:
            text = _scalar(value)
        lines.append(("- " if not lines else "  ") + f"{name}: {text}")
    return "\n".join(lines) + "\n"


def insert_entry(catalog: LoadedCatalog, section: str, block: str) -> str:
    """The file's text with block inserted after the last entry of section (or at the end), in the
    file's line endings (CRLF if its first line ends so)."""
    lines = catalog.text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    block = block.replace("\n", newline)
    in_section = [entry for entry in catalog.entries if entry.section == section]
    if not in_section:
        text = catalog.text if not lines or lines[-1].endswith(("\n", "\r")) else catalog.text + newline
        return text + newline + f"# ─── {section} " + "─" * max(3, 70 - len(section)) + newline + newline + block
    last = max(in_section, key=lambda entry: entry.line)
    following = [entry.line for entry in catalog.entries if entry.line > last.line]
    end = (min(following) - 1) if following else len(lines)  # 1-based last line before the next entry
    # The block ends at its last line that is neither blank nor a comment (the next section's header).
    while end > last.line and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    if not lines[end - 1].endswith(("\n", "\r")):
        lines[end - 1] += newline
    return "".join(lines[:end]) + newline + block + "".join(lines[end:])
