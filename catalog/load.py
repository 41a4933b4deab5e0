"""Stage 1: read papers.yaml into typed `Entry` records that remember their source lines.

Loading never stops at the first mistake: every entry that fails the schema becomes a `Problem`
naming the file, line, entry and field, and the entries that pass are still returned, so
`catalog check` can report everything at once.

The file is read strictly: UTF-8 only; no control characters; none of YAML's tags, anchors,
aliases or merge keys (an index of papers has no use for them, and they let a file build values
that no line shows); at most MAX_DEPTH levels of nesting. Each refusal names its line, counted as
editors count them.
"""

import difflib
import re
import unicodedata
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
    complete: bool = True  # False when the file as a whole could not be read as a list of entries


# papers.yaml is a list of flat entries: plain scalars and lists, nothing deeper than this.
MAX_DEPTH = 10
# Characters that have no place in the file. PyYAML also counts U+0085, U+2028, U+2029 and a lone
# CR as line breaks, which editors do not, so each would shift every later line number: refused too.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]|\r(?!\n)")


def load_catalog(path: str | Path) -> LoadedCatalog:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        return LoadedCatalog(
            str(path), problems=[Problem(str(path), 0, f"cannot read: {error.strerror}")], complete=False
        )
    return parse_catalog(data, str(path))


def parse_catalog(text: str | bytes, filename: str = "papers.yaml") -> LoadedCatalog:
    """Entries and problems of papers.yaml's text (bytes are decoded as UTF-8 first)."""
    catalog = LoadedCatalog(filename)
    problem = lambda line, message, **where: catalog.problems.append(Problem(filename, line, message, **where))

    def give_up(line: int, message: str) -> LoadedCatalog:
        problem(line, message)
        catalog.complete = False
        return catalog

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            line_start = text.rfind(b"\n", 0, error.start) + 1
            return give_up(
                text.count(b"\n", 0, error.start) + 1,
                f"not UTF-8 text: byte 0x{text[error.start]:02x} at column {error.start - line_start + 1}; "
                f"save the file as UTF-8",
            )
    catalog.text = text
    text = _without_control_characters(text, problem)

    refused = _refused_yaml_features(text)
    if refused:
        for line, message in refused:
            problem(line, message)
        catalog.complete = False
        return catalog
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as error:
        return give_up(*_yaml_error(error))
    finally:
        loader.dispose()

    if root is None or (isinstance(root, yaml.SequenceNode) and not root.value):
        return give_up(
            1,
            "no entries: the file is empty or holds only comments; it must be a list of entries "
            "('- id: ...', see CONTRIBUTING.md)",
        )
    if not isinstance(root, yaml.SequenceNode):
        return give_up(root.start_mark.line + 1, "the file must be a list of entries ('- id: ...')")

    for position, node in enumerate(root.value, start=1):
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            problem(line, f"entry #{position} is not a mapping of fields")
            continue
        values, field_lines, unreadable = _mapping_with_lines(node)
        entry_id = (
            values.get("id") if isinstance(values.get("id"), str) and "\n" not in values["id"] else f"#{position}"
        )
        for key, message in unreadable.items():
            problem(field_lines[key], message, entry_id=entry_id, field=key)
        try:
            entry = Entry.model_validate(values)
        except ValidationError as error:
            for detail in error.errors():
                name = str(detail["loc"][0]) if detail["loc"] else None
                problem(field_lines.get(name, line), _explain(detail, values), entry_id=entry_id, field=name)
            continue
        if unreadable:
            continue
        entry._line, entry._field_lines = line, field_lines
        catalog.entries.append(entry)
    return catalog


def _without_control_characters(text: str, problem) -> str:
    """The text with each control character reported at its line and replaced by a space, so that
    the rest of the file is still checked, at the right lines."""

    def replace(match: re.Match) -> str:
        if match.group() == "\ufeff" and match.start() == 0:
            return match.group()  # a byte-order mark at the start is allowed
        character = match.group()
        name = unicodedata.name(character, "") or {"\r": "carriage return without a line feed"}.get(
            character, "control character"
        )
        problem(
            text.count("\n", 0, match.start()) + 1,
            f"character U+{ord(character):04X} ({name.lower()}) is not allowed in the file; remove it",
        )
        return " "

    return CONTROL.sub(replace, text)


def _refused_yaml_features(text: str) -> list[tuple[int, str]]:
    """(line, message) for each YAML feature papers.yaml refuses (tags, anchors, aliases, merge keys,
    deep nesting), or for the syntax error that stops the scan. Read as events, which PyYAML makes
    without recursion, so even 20,000 nested brackets are refused quickly."""
    refused, depth = [], 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent):
                refused.append(
                    (
                        line,
                        f"YAML alias *{event.anchor}: write the value out (papers.yaml uses no "
                        f"anchors, aliases or tags)",
                    )
                )
            elif isinstance(event, (yaml.ScalarEvent, yaml.CollectionStartEvent)):
                if event.anchor is not None:
                    refused.append(
                        (
                            line,
                            f"YAML anchor &{event.anchor}: write each entry out in full (papers.yaml "
                            f"uses no anchors, aliases or tags)",
                        )
                    )
                if event.tag is not None:
                    shown = event.tag.replace("tag:yaml.org,2002:", "!!")
                    refused.append((line, f"YAML tag {shown}: write a plain value (papers.yaml uses no tags)"))
                if isinstance(event, yaml.ScalarEvent) and event.value == "<<" and event.style is None:
                    refused.append((line, "YAML merge key <<: write the fields out in full"))
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    return refused + [
                        (line, f"nested more than {MAX_DEPTH} levels deep: an entry is a mapping of values and lists")
                    ]
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as error:
        return refused + [_yaml_error(error)]
    return refused


def _yaml_error(error: yaml.YAMLError) -> tuple[int, str]:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem, context = getattr(error, "problem", None) or str(error), getattr(error, "context", None)
    if context and problem.startswith("but "):  # "but found another document" needs what was expected
        problem = f"{context}, {problem}"
    return (mark.line + 1 if mark else 1), f"YAML syntax: {problem}"


class _Constructor(yaml.constructor.SafeConstructor):
    """PyYAML's safe constructor, with an impossible date (2026-13-45) a YAML error at its line
    rather than a ValueError."""

    def construct_yaml_timestamp(self, node):
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a real date YYYY-MM-DD", node.start_mark
            ) from None


_Constructor.add_constructor("tag:yaml.org,2002:timestamp", _Constructor.construct_yaml_timestamp)


def _mapping_with_lines(node: yaml.MappingNode) -> tuple[dict, dict[str, int], dict[str, str]]:
    """A plain dict from a YAML mapping node, each key's line, and the keys that could not be read
    (given twice, or a value PyYAML cannot construct) with the reason."""
    constructor = _Constructor()
    values, lines, unreadable = {}, {}, {}
    for key_node, value_node in node.value:
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "(a non-scalar key)"
        lines.setdefault(key, key_node.start_mark.line + 1)
        if key in values or key in unreadable:
            lines[key] = key_node.start_mark.line + 1
            unreadable[key] = "field given twice in one entry"
            continue
        try:
            values[key] = constructor.construct_object(value_node, deep=True)
        except (yaml.YAMLError, ValueError, OverflowError) as error:
            unreadable[key] = getattr(error, "problem", None) or f"cannot read the value: {error}"
    return values, lines, unreadable


def _explain(detail: dict, values: dict) -> str:
    """Turn a pydantic error into a message a contributor can act on."""
    kind, name = detail["type"], str(detail["loc"][0]) if detail["loc"] else ""
    if kind == "extra_forbidden":
        guess = difflib.get_close_matches(name, ENTRY_FIELDS, n=1)
        return "unknown field" + (
            f" (did you mean {guess[0]!r}?)" if guess else f"; fields are: {', '.join(ENTRY_FIELDS)}"
        )
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"{detail['input']!r} is not one of: {detail['ctx']['expected']}"
    if kind == "string_type" and isinstance(detail["input"], bool):
        return f"must be a quoted string: YAML read {str(detail['input']).lower()} as a yes/no value"
    if kind == "string_type" and isinstance(detail["input"], (int, float)):
        return f"must be a quoted string: YAML read {detail['input']!r} as a number"
    if detail["input"] is None and kind.endswith("_type"):
        return "is empty"
    if kind == "date_type":
        return "must be a date written YYYY-MM-DD"
    message = detail["msg"]
    return message.removeprefix("Value error, ")
