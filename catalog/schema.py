"""The schema of one papers.yaml entry, as a pydantic model.

`Entry` is also the typed record that every later stage (enrich, render) consumes. The field
formats are the identifiers' real formats, so a typo is caught before it reaches the API.
"""

import datetime
import re
import unicodedata
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from catalog import identifiers
from catalog.vocabulary import KINDS, SECTION_BY_NAME, TAGS

# Formats of the fields that are not paper identifiers (those are in catalog/identifiers.py). Matched
# whole: re.fullmatch, since `$` would also match before a trailing newline.
SLUG = (r"[a-z0-9]+(?:-[a-z0-9]+)*", "a lower-case slug such as 'lora' or 'prefix-tuning'")
IMPL = (r"[a-z0-9_]+(?:\.[a-z0-9_]+)*", "a module of reference_impls such as 'lora' or 'kernels.nf4'")
# Ids that name pages of the site already: papers/index is the all-papers table.
RESERVED_IDS = ("index", "search", "assets", "404", "feed")
MAX_TITLE = 500


def _matches(what: str, value: str, pattern: str, description: str) -> str:
    if not re.fullmatch(pattern, value):
        raise ValueError(f"malformed {what} {value!r}: expected {description}")
    return value


def check_link(value: str) -> str:
    """Only absolute http(s) links: no javascript:, data:, file: or relative links."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an http(s):// link")
    return value


def _one_line(value: str) -> str:
    if any(unicodedata.category(character) in ("Cc", "Zl", "Zp") for character in value):
        raise ValueError("must be one line of text (it holds a line break or a control character)")
    if value != value.strip():
        raise ValueError("has spaces at its start or end")
    return value


# Lengths no real entry comes near, so that a pasted abstract or a runaway script is refused here.
Line = Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_one_line)]
Link = Annotated[str, Field(max_length=2_000), AfterValidator(check_link)]


class Entry(BaseModel):
    """One paper or paperless tool, as written in papers.yaml."""

    # strict: YAML turns an unquoted 2106.04640 into the float 2106.0464; refuse it rather than guess.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Annotated[str, Field(max_length=80)] = Field(description="Stable slug; the paper's page is /papers/<id>/.")
    title: Annotated[str, Field(min_length=1, max_length=MAX_TITLE), AfterValidator(_one_line)]
    kind: Literal[tuple(KINDS)]  # type: ignore[valid-type]
    section: str
    paper: bool = Field(True, description="false for software without a paper (no identifiers then).")
    arxiv: str | None = None
    acl: str | None = None
    doi: str | None = None
    openreview: str | None = None
    s2: str | None = None
    code: Link | None = None
    website: Link | None = None
    tags: Annotated[list[str], Field(max_length=20)]
    impl: Annotated[list[str], Field(max_length=60)]  # a framework lists every module it provides (PEFT: 20+)
    # Corrections: they win over the metadata record, for the few records the API gets wrong.
    authors: Annotated[list[Line], Field(max_length=500)] | None = None
    venue: Line | None = None
    added: datetime.date

    # Where the entry and each of its fields start in papers.yaml; set by the loader. Private, so
    # that no key written in papers.yaml can set them.
    _line: int = PrivateAttr(0)
    _field_lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _slug(cls, value):
        _matches("id", value, *SLUG)
        if value in RESERVED_IDS:
            raise ValueError(f"{value!r} is reserved: papers/{value}/ is already a page of the site")
        return value

    @field_validator("arxiv", "acl", "doi", "openreview", "s2")
    @classmethod
    def _identifier_format(cls, value, info):
        identifier = identifiers.BY_FIELD[info.field_name]
        return value if value is None else _matches(info.field_name, value, identifier.pattern, identifier.description)

    @field_validator("impl")
    @classmethod
    def _impl_format(cls, value):
        return [_matches("impl", slug, *IMPL) for slug in value]

    @field_validator("section")
    @classmethod
    def _known_section(cls, value):
        if value not in SECTION_BY_NAME:
            raise ValueError(f"unknown section {value!r}; sections are: {', '.join(SECTION_BY_NAME)}")
        return value

    @field_validator("tags")
    @classmethod
    def _known_tags(cls, value):
        unknown = [tag for tag in value if tag not in TAGS]
        if unknown:
            raise ValueError(
                f"unknown tag(s) {', '.join(map(repr, unknown))}; "
                f"tags are defined in catalog/vocabulary.py: {', '.join(TAGS)}"
            )
        if len(set(value)) != len(value):
            raise ValueError("a tag is listed twice")
        return value

    @model_validator(mode="after")
    def _identifiers_match_paper_flag(self):
        present = [name for name in identifiers.FIELDS if getattr(self, name)]
        if self.paper and not present:
            raise ValueError(
                "a paper needs at least one identifier: arxiv, acl, doi, openreview or s2 "
                "(for software without a paper, write 'paper: false')"
            )
        if not self.paper and present:
            raise ValueError(f"'paper: false' entries have no paper identifiers, but {present[0]} is set")
        if not self.paper and not (self.code or self.website):
            raise ValueError("an entry without a paper needs a code or website link")
        return self

    @property
    def line(self) -> int:
        return self._line

    def line_of(self, field: str) -> int:
        """The line of a field, or of the entry where the field is absent."""
        return self._field_lines.get(field, self._line)

    @property
    def identifiers(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in identifiers.FIELDS if getattr(self, name)}


# Fields a contributor may write, in the order `catalog add` writes them.
ENTRY_FIELDS = list(Entry.model_fields)
