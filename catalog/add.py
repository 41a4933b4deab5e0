"""`catalog add`: turn one Semantic Scholar record into a new papers.yaml entry.

The new entry is inserted as a block of text after the last entry of its section, so every
existing line, comment and the order of the file stay exactly as they were.
"""

import datetime
import json
import re

import yaml

from catalog.load import LoadedCatalog
from catalog.schema import Entry
from catalog.validate import normalise_title


def identifiers_from_record(paper: dict) -> dict[str, str]:
    external = paper.get("externalIds") or {}
    found = {"arxiv": external.get("ArXiv"), "acl": external.get("ACL"), "doi": external.get("DOI"),
             "s2": paper.get("paperId")}
    return {name: str(value) for name, value in found.items() if value}


def suggest_id(title: str, taken: set[str]) -> str:
    """A slug from the title: the name before a colon if there is one ("LoRA: ..." -> lora), else
    the first four words; made unique with -2, -3, ..."""
    head = title.split(":")[0] if ":" in title and len(title.split(":")[0]) <= 30 else " ".join(title.split()[:4])
    base = re.sub(r"[^a-z0-9]+", "-", head.lower()).strip("-") or "paper"
    candidate, number = base, 2
    while candidate in taken:
        candidate, number = f"{base}-{number}", number + 1
    return candidate


def find_duplicate(catalog: LoadedCatalog, title: str, identifiers: dict[str, str]) -> Entry | None:
    for entry in catalog.entries:
        same_id = any(getattr(entry, name) and getattr(entry, name).lower() == value.lower()
                      for name, value in identifiers.items())
        if same_id or normalise_title(entry.title) == normalise_title(title):
            return entry
    return None


def _scalar(value: str, in_list: bool = False) -> str:
    """Plain if YAML reads it back as the same string, else double-quoted (JSON is valid YAML)."""
    plain = f"k: [{value}]" if in_list else f"k: {value}"
    try:
        read = yaml.safe_load(plain)["k"]
    except yaml.YAMLError:
        read = None
    return value if read == ([value] if in_list else value) else json.dumps(value, ensure_ascii=False)


def entry_block(fields: dict) -> str:
    """The entry as a contributor would write it: plain scalars where safe, lists in flow style."""
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
    """The file's text with block inserted after the last entry of section (or at the end)."""
    lines = catalog.text.splitlines(keepends=True)
    in_section = [entry for entry in catalog.entries if entry.section == section]
    if not in_section:
        text = catalog.text if catalog.text.endswith("\n") or not catalog.text else catalog.text + "\n"
        return text + f"\n# ─── {section} " + "─" * max(3, 70 - len(section)) + "\n\n" + block
    last = max(in_section, key=lambda entry: entry.line)
    following = [entry.line for entry in catalog.entries if entry.line > last.line]
    end = (min(following) - 1) if following else len(lines)  # 1-based last line before the next entry
    # The block ends at its last line that is neither blank nor a comment (the next section's header).
    while end > last.line and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    if not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    return "".join(lines[:end]) + "\n" + block + "".join(lines[end:])
