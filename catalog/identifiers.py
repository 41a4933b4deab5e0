"""The paper identifiers, defined once: their formats, the Semantic Scholar API's names for them, and
the keys by which two entries are the same paper.

Every stage that touches an identifier reads it from here: the schema (formats), enrich (which id
to ask for and whether a record answers it), add (parsing what a contributor typed, reading a
record's ids, finding duplicates) and validate (duplicates).
"""

import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Identifier:
    field: str | None  # its papers.yaml field; None for ids that can be looked up but are not stored
    label: str  # how messages name it
    api_prefix: str | None  # how the API takes it ("ARXIV:2106.09685"); None: the bare S2 paper id
    external_key: str | None  # its key in a record's externalIds; None: the record's paperId
    pattern: str  # matched whole (re.fullmatch)
    description: str
    case_insensitive: bool = False  # compared (and looked up) without regard to case
    looked_up: bool = True  # whether the API takes it; a paper known only by others cannot be enriched

    def matches(self, value: str) -> bool:
        return re.fullmatch(self.pattern, value) is not None

    def key(self, value: str) -> str:
        """The value as compared for duplicates."""
        return value.lower() if self.case_insensitive else value

    def api_id(self, value: str) -> str:
        return f"{self.api_prefix}:{value}" if self.api_prefix else value


ARXIV = Identifier(
    "arxiv",
    "arXiv id",
    "ARXIV",
    "ArXiv",
    # New-style ids: YYMM.NNNN (2007-2014) or YYMM.NNNNN (2015 on); no version suffix.
    r"\d{2}(?:0[1-9]|1[0-2])\.\d{4,5}",
    "an arXiv id YYMM.NNNNN without version, e.g. '2106.09685'",
)
ACL = Identifier(
    "acl",
    "ACL Anthology id",
    "ACL",
    "ACL",
    # New style '2021.acl-long.353', old style 'D19-1165'.
    r"\d{4}\.[a-z0-9]+(?:-[a-z0-9]+)*\.\d+|[A-Z]\d{2}-\d{4}",
    "an ACL Anthology id such as '2021.acl-long.353' or 'D19-1165'",
)
DOI = Identifier(
    "doi",
    "DOI",
    "DOI",
    "DOI",
    r"10\.\d{4,9}/[^\s]+",
    "a DOI such as '10.1109/CVPR52688.2022.00516' (no https://doi.org/ prefix)",
    case_insensitive=True,
)
S2 = Identifier(
    "s2", "Semantic Scholar id", None, None, r"[0-9a-f]{40}", "a Semantic Scholar paper id (40 lower-case hex digits)"
)
# OpenReview's forum ids, for papers (ICLR, NeurIPS) with neither an arXiv id nor a DOI. The API
# does not take them, so such an entry keeps the record written from gathered facts.
OPENREVIEW = Identifier(
    "openreview",
    "OpenReview id",
    None,
    "OpenReview",
    r"[A-Za-z0-9_-]{8,14}",
    "an OpenReview forum id such as 'TwJrTz9cRS' (from openreview.net/forum?id=...)",
    looked_up=False,
)
CORPUS = Identifier(
    None,
    "Semantic Scholar corpus id",
    "CorpusId",
    "CorpusId",
    r"[1-9]\d{0,11}",
    "a Semantic Scholar corpus id (a number)",
)

# The fields an entry may carry, in the order enrich prefers them for a lookup (exact S2 id first).
STORED = (S2, ARXIV, ACL, DOI, OPENREVIEW)
BY_FIELD = {identifier.field: identifier for identifier in STORED}
FIELDS = ("arxiv", "acl", "doi", "openreview", "s2")  # the order papers.yaml and `catalog add` write them
LOOKUP_PREFIXES = {identifier.api_prefix.lower(): identifier for identifier in (ARXIV, ACL, DOI, CORPUS)}


def api_id(identifiers: dict[str, str]) -> str | None:
    """The id to ask the API for, from an entry's identifiers (field -> value); None if it has none the API takes."""
    for identifier in STORED:
        if identifier.looked_up and identifiers.get(identifier.field):
            return identifier.api_id(identifiers[identifier.field])
    return None


def record_ids(paper_id: str, external_ids: dict[str, str | int] | None) -> dict[str, str]:
    """The identifiers (field -> value) a Semantic Scholar record carries, in our formats; ids the
    catalog cannot store (old-style arXiv ids, say) are left out."""
    external = external_ids or {}
    found = {
        identifier.field: str(
            paper_id if identifier.external_key is None else external.get(identifier.external_key) or ""
        )
        for identifier in STORED
    }
    return {field: found[field] for field in FIELDS if found[field] and BY_FIELD[field].matches(found[field])}


def answers(asked: str, paper_id: str, external_ids: dict[str, str | int] | None) -> bool:
    """Whether a record (its paperId and externalIds) is the paper that the API id `asked` names."""
    prefix, _, value = asked.rpartition(":")
    if not prefix:
        return paper_id == value.lower()
    identifier = LOOKUP_PREFIXES[prefix.lower()]
    found = str((external_ids or {}).get(identifier.external_key) or "")
    return identifier.key(found) == identifier.key(value)


class MalformedIdentifier(ValueError):
    """What a contributor typed names an identifier but is malformed."""


def parse_lookup(text: str) -> str | None:
    """The API id that `text` names (ARXIV:…, ACL:…, DOI:…, CorpusId:…, an S2 paper id, a bare arXiv id
    or DOI), or None if it is a title. Raises MalformedIdentifier for a prefix with a malformed value."""
    text = text.strip()
    prefix, colon, value = text.partition(":")
    identifier = LOOKUP_PREFIXES.get(prefix.strip().lower()) if colon else None
    if identifier is not None:
        value = value.strip()
        if not identifier.matches(value):
            raise MalformedIdentifier(f"malformed {identifier.label} {value!r}: expected {identifier.description}")
        return identifier.api_id(value)
    if S2.matches(text.lower()):
        return text.lower()  # the API's paper ids are lower-case hex; an upper-case one is still one
    for identifier in (ARXIV, DOI):
        if identifier.matches(text):
            return identifier.api_id(text)
    return None


def normalise_title(title: str) -> str:
    """Titles compare equal if they differ only in case, accents, punctuation and spacing."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def duplicate_keys(title: str, identifiers: dict[str, str]) -> list[tuple[str, str]]:
    """The keys under which two entries are the same paper: the normalised title, and each identifier
    as compared (DOIs without regard to case). Validate and add both use these."""
    keys = [("title", normalise_title(title))] if normalise_title(title) else []
    return keys + [(field, BY_FIELD[field].key(value)) for field, value in identifiers.items() if value]


def label(what: str) -> str:
    """How messages name a duplicate key: 'arXiv id', 'DOI', ..., 'title'."""
    return BY_FIELD[what].label if what in BY_FIELD else what
