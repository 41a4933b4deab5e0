"""Stage 1: read papers.yaml into typed `Entry` records that remember their source lines.

Loading never stops at the first mistake: every entry that fails the schema becomes a `Problem`
naming the file, line, entry and field, and the entries that pass are still returned, so
`catalog check` can report everything at once.
"""

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from catalog.schema import ENTRY_FIELDS, Entry


@dataclass(frozen=True)
class Problem:
    """One thing wrong with papers.yaml (or a warning), located as precisely as we can."""

    file: str
    line: int
    message: str
    entry_id: str | None = None
    field: str | None = None
    severity: str = "error"  # or "warning"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: "
        if self.entry_id is not None:
            where += f"entry {self.entry_id!r}: "
        if self.field:
            where += f"{self.field}: "
        prefix = "warning: " if self.severity == "warning" else ""
        return where + prefix + self.message


@dataclass
class LoadedCatalog:
    path: str
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    text: str = ""  # the file as read, for stages that must keep it byte-for-byte (catalog add)


def load_catalog(path: str | Path) -> LoadedCatalog:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        return LoadedCatalog(str(path), problems=[Problem(str(path), 0, f"cannot read: {error.strerror}")])
    return parse_catalog(text, str(path))


def parse_catalog(text: str, filename: str = "papers.yaml") -> LoadedCatalog:
    catalog = LoadedCatalog(filename, text=text)
    problem = lambda line, message, **where: catalog.problems.append(Problem(filename, line, message, **where))

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = mark.line + 1 if mark else 0
        problem(line, f"YAML syntax: {getattr(error, 'problem', None) or error}")
        return catalog
    finally:
        loader.dispose()

    if root is None:
        return catalog  # an empty file is an empty catalog
    if not isinstance(root, yaml.SequenceNode):
        problem(root.start_mark.line + 1, "the file must be a list of entries ('- id: ...')")
        return catalog

    for position, node in enumerate(root.value, start=1):
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            problem(line, f"entry #{position} is not a mapping of fields")
            continue
        values, field_lines, duplicated = _mapping_with_lines(node)
        entry_id = values.get("id") if isinstance(values.get("id"), str) else f"#{position}"
        for key in duplicated:
            problem(field_lines[key], "field given twice in one entry", entry_id=entry_id, field=key)
        try:
            entry = Entry.model_validate(values)
        except ValidationError as error:
            for detail in error.errors():
                name = str(detail["loc"][0]) if detail["loc"] else None
                problem(field_lines.get(name, line), _explain(detail, values), entry_id=entry_id, field=name)
            continue
        if duplicated:
            continue
        entry._line, entry._field_lines = line, field_lines
        catalog.entries.append(entry)
    return catalog


def _mapping_with_lines(node: yaml.MappingNode) -> tuple[dict, dict[str, int], list[str]]:
    """Build a plain dict from a YAML mapping node, noting each key's line and any key given twice."""
    constructor = yaml.SafeLoader("")  # only its constructor is used, on nodes we already have
    values, lines, duplicated = {}, {}, []
    for key_node, value_node in node.value:
        key = str(constructor.construct_object(key_node, deep=True))
        if key in values:
            duplicated.append(key)
        values[key] = constructor.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    return values, lines, duplicated


def _explain(detail: dict, values: dict) -> str:
    """Turn a pydantic error into a message a contributor can act on."""
    kind, name = detail["type"], str(detail["loc"][0]) if detail["loc"] else ""
    if kind == "extra_forbidden":
        guess = difflib.get_close_matches(name, ENTRY_FIELDS, n=1)
        return "unknown field" + (f" (did you mean {guess[0]!r}?)" if guess else f"; fields are: {', '.join(ENTRY_FIELDS)}")
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"{detail['input']!r} is not one of: {detail['ctx']['expected']}"
    if kind == "string_type" and isinstance(detail["input"], (int, float)):
        return f"must be a quoted string: YAML read {detail['input']!r} as a number"
    if kind == "date_type":
        return "must be a date written YYYY-MM-DD"
    message = detail["msg"]
    return message.removeprefix("Value error, ")
