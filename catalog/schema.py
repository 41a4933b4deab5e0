"""The schema of one papers.yaml entry, as a pydantic model.

`Entry` is also the typed record that every later stage (enrich, render) consumes. The field
formats are the identifiers' real formats, so a typo is caught before it reaches the API.
"""

import datetime
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from catalog.vocabulary import KINDS, SECTION_BY_NAME, TAGS

# What each identifier looks like; the messages below quote these descriptions.
ID_FORMATS: dict[str, tuple[str, str]] = {
    "id": (r"^[a-z0-9]+(?:-[a-z0-9]+)*$", "a lower-case slug such as 'lora' or 'prefix-tuning'"),
    # New-style arXiv ids: YYMM.NNNN (2007-2014) or YYMM.NNNNN (2015 on); no version suffix.
    "arxiv": (r"^\d{2}(?:0[1-9]|1[0-2])\.\d{4,5}$", "an arXiv id YYMM.NNNNN without version, e.g. '2106.09685'"),
    # ACL Anthology: new style '2021.acl-long.353', old style 'D19-1165'.
    "acl": (r"^(?:\d{4}\.[a-z0-9]+(?:-[a-z0-9]+)*\.\d+|[A-Z]\d{2}-\d{4})$",
            "an ACL Anthology id such as '2021.acl-long.353' or 'D19-1165'"),
    "doi": (r"^10\.\d{4,9}/\S+$", "a DOI such as '10.1109/CVPR52688.2022.00516' (no https://doi.org/ prefix)"),
    "s2": (r"^[0-9a-f]{40}$", "a Semantic Scholar paper id (40 lower-case hex digits)"),
    "impl": (r"^[a-z0-9_]+(?:\.[a-z0-9_]+)*$", "a module of reference_impls such as 'lora' or 'kernels.nf4'"),
}
IDENTIFIER_FIELDS = ("arxiv", "acl", "doi", "s2")


def _matches(field: str, value: str) -> str:
    pattern, description = ID_FORMATS[field]
    if not re.match(pattern, value):
        raise ValueError(f"malformed {field} {value!r}: expected {description}")
    return value


def check_link(value: str) -> str:
    """Only absolute http(s) links: no javascript:, data:, file: or relative links."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an http(s):// link")
    return value


class Entry(BaseModel):
    """One paper or paperless tool, as written in papers.yaml."""

    # strict: YAML turns an unquoted 2106.04640 into the float 2106.0464; refuse it rather than guess.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(description="Stable slug; the paper's page is /papers/<id>/.")
    title: str = Field(min_length=1)
    kind: Literal[tuple(KINDS)]  # type: ignore[valid-type]
    section: str
    paper: bool = Field(True, description="false for software without a paper (no identifiers then).")
    arxiv: str | None = None
    acl: str | None = None
    doi: str | None = None
    s2: str | None = None
    code: str | None = None
    website: str | None = None
    tags: list[str]
    impl: list[str]
    # Corrections: they win over the metadata record, for the few records the API gets wrong.
    authors: list[str] | None = None
    venue: str | None = None
    added: datetime.date

    # Where the entry and each of its fields start in papers.yaml; set by the loader. Private, so
    # that no key written in papers.yaml can set them.
    _line: int = PrivateAttr(0)
    _field_lines: dict[str, int] = PrivateAttr(default_factory=dict)

    @field_validator("id", "arxiv", "acl", "doi", "s2")
    @classmethod
    def _identifier_format(cls, value, info):
        return value if value is None else _matches(info.field_name, value)

    @field_validator("impl")
    @classmethod
    def _impl_format(cls, value):
        return [_matches("impl", slug) for slug in value]

    @field_validator("code", "website")
    @classmethod
    def _http_link(cls, value):
        return value if value is None else check_link(value)

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
            raise ValueError(f"unknown tag(s) {', '.join(map(repr, unknown))}; "
                             f"tags are defined in catalog/vocabulary.py: {', '.join(TAGS)}")
        if len(set(value)) != len(value):
            raise ValueError("a tag is listed twice")
        return value

    @model_validator(mode="after")
    def _identifiers_match_paper_flag(self):
        present = [name for name in IDENTIFIER_FIELDS if getattr(self, name)]
        if self.paper and not present:
            raise ValueError("a paper needs at least one identifier: arxiv, acl, doi or s2 "
                             "(for software without a paper, write 'paper: false')")
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
        return {name: getattr(self, name) for name in IDENTIFIER_FIELDS if getattr(self, name)}


# Fields a contributor may write, in the order `catalog add` writes them.
ENTRY_FIELDS = list(Entry.model_fields)
