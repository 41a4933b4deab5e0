"""The Semantic Scholar paper record, as a typed model: what enters the store from the API or from a
hand-edited store file is validated here, so later stages (views, render) never see a raw dict.

Only the fields the catalog asks for (`s2.FIELDS`) are modelled, under the API's own names, so the
store keeps the API's JSON shape. Where the meaning is unambiguous a value is coerced (a year sent as
"2020" is the year 2020); anything else (a year "soon", authors as a string, a date 2020-13-01) fails
validation, and the caller refuses that one record, naming the paper and the field.
"""

import datetime
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator


def _whole_number(value):
    """A count or year sent as a digit string, or as a float with nothing after the point, is that number."""
    if isinstance(value, str) and re.fullmatch(r"\d{1,12}", value.strip()):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_whole_number), Field(ge=0)]
Year = Annotated[int, BeforeValidator(_whole_number), Field(ge=1900, le=2200)]
ShortText = Annotated[str, Field(max_length=2_000)]
LongText = Annotated[str, Field(max_length=100_000)]


class _Part(BaseModel):
    # strict: no silent bool → int or number → str; extra fields of the API are dropped.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Author(_Part):
    authorId: ShortText | None = None
    name: ShortText | None = None


class Tldr(_Part):
    model: ShortText | None = None
    text: Annotated[str, Field(max_length=10_000)] | None = None


class PublicationVenue(_Part):
    id: ShortText | None = None
    name: ShortText | None = None
    type: ShortText | None = None
    url: ShortText | None = None
    alternate_names: list[ShortText] | None = None


class OpenAccessPdf(_Part):
    url: ShortText | None = None
    status: ShortText | None = None
    license: ShortText | None = None
    disclaimer: LongText | None = None


class CitationStyles(_Part):
    bibtex: LongText | None = None


class Paper(_Part):
    """One record of the Graph API (GET /paper/{id}, POST /paper/batch), the fields we ask for."""

    paperId: (
        Annotated[
            str,
            BeforeValidator(lambda value: value.lower() if isinstance(value, str) else value),
            Field(pattern=r"^[0-9a-f]{40}$"),
        ]
        | None
    ) = None  # Rust regex: $ is the very end. Every API record has one; see parse_paper
    corpusId: Count | None = None
    externalIds: dict[ShortText, ShortText | int] | None = None
    title: ShortText | None = None
    abstract: LongText | None = None
    tldr: Tldr | None = None
    authors: Annotated[list[Author], Field(max_length=10_000)] | None = None
    venue: ShortText | None = None
    publicationVenue: PublicationVenue | None = None
    year: Year | None = None
    publicationDate: str | None = None
    citationCount: Count | None = None
    influentialCitationCount: Count | None = None
    openAccessPdf: OpenAccessPdf | None = None
    url: ShortText | None = None
    fieldsOfStudy: list[ShortText] | None = None
    citationStyles: CitationStyles | None = None

    @field_validator("publicationDate")
    @classmethod
    def _real_date(cls, value):
        if value is not None:
            try:
                datetime.date.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a real date YYYY-MM-DD") from None
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                raise ValueError(f"{value!r} is not a date written YYYY-MM-DD")
        return value

    def to_json(self) -> dict:
        """The record in the API's JSON shape, with only the fields it came with."""
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def author_names(self) -> tuple[str, ...]:
        return tuple(author.name for author in self.authors or () if author.name)

    @property
    def venue_name(self) -> str:
        return self.venue or (self.publicationVenue.name if self.publicationVenue else None) or ""


PAPER_FIELDS = tuple(Paper.model_fields)


class RecordError(ValueError):
    """A record that does not have the API's shape; the message names the field."""


def parse_paper(data: object, needs_paper_id: bool = True) -> Paper:
    """A validated Paper, or RecordError saying which field is wrong (at most three, briefly). Only a
    record written from gathered facts, before the API has been asked, may lack its paperId."""
    if not isinstance(data, dict):
        raise RecordError(f"the record is a {type(data).__name__}, not an object")
    try:
        paper = Paper.model_validate(data)
    except ValidationError as error:
        raise RecordError(describe(error)) from None
    if needs_paper_id and paper.paperId is None:
        raise RecordError("paperId: a Semantic Scholar record needs its paper id")
    return paper


def describe(error: ValidationError) -> str:
    parts = []
    for detail in error.errors()[:3]:
        where = ".".join(str(part) for part in detail["loc"]) or "record"
        message, value = detail["msg"].removeprefix("Value error, "), repr(detail.get("input"))
        value = value if len(value) <= 40 else value[:37] + "..."
        parts.append(f"{where}: {message}" + ("" if value in message else f" (got {value})"))
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
