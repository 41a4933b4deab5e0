"""Stage 3a: join each entry with its metadata record into the typed view the pages show.

A `PaperView` holds everything a page needs, already decided: which title and authors to show
(papers.yaml corrections win over the API), which links exist (only http(s) ones), the BibTeX. The
templates only lay it out; they make no decisions about data.
"""

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from catalog.annotate import AnnotatedSource, annotate
from catalog.impls import ImplModule
from catalog.record import Paper
from catalog.schema import Entry, check_link
from catalog.store import MetadataStore
from catalog.vocabulary import LINK_KINDS, SECTION_BY_NAME


@dataclass(frozen=True)
class Link:
    label: str
    url: str


@dataclass(frozen=True)
class BenchmarkRun:
    """The rows of one committed benchmark result (benchmarks/results/*.json) about one module."""

    device: str
    date: str
    command: str
    checks: tuple[dict, ...]
    timings: tuple[dict, ...]


def benchmark_runs(results_dir: Path) -> list[dict]:
    """Committed kernel benchmark results, newest first; smoke runs (CPU interpreter) are not shown."""
    runs = []
    for path in sorted(results_dir.glob("kernels-*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not data.get("smoke"):
            runs.append(data)
    return sorted(runs, key=lambda run: run["date"], reverse=True)


@dataclass(frozen=True)
class ImplView:
    slug: str
    source_path: str  # relative to the repository root, e.g. reference_impls/lora.py
    summary: str  # the module docstring's first paragraph
    family: str  # its FAMILY, one of vocabulary.IMPL_FAMILIES
    source: str = field(repr=False)  # the file's text
    demo_command: str | None  # None for modules without a demo (the kernels)
    test_path: str | None  # tests/test_<name>.py where it exists
    papers: tuple[str, ...] = ()  # ids of the entries it implements (its IMPLEMENTS)
    covered_by: tuple[str, ...] = ()  # frameworks, surveys and studies that provide, describe or use it
    mentions: tuple[tuple[str, tuple[str, ...]], ...] = ()  # those, grouped: ("Provided by", ids), ...
    benchmarks: tuple[BenchmarkRun, ...] = ()  # committed GPU measurements of this module

    @property
    def url(self) -> str:
        return f"impls/{self.slug}/"

    @cached_property
    def annotated(self) -> AnnotatedSource:
        """The file as prose beside code, made when a page first asks (the README list never does)."""
        return annotate(self.source)

    def confirms(self, entry_id: str) -> bool:
        return entry_id in self.papers or entry_id in self.covered_by


@dataclass(frozen=True)
class PaperView:
    entry: Entry
    title: str
    authors: tuple[str, ...]
    venue: str
    year: int | None
    citations: int | None
    tldr: str
    abstract: str
    bibtex: str
    links: tuple[Link, ...]
    impls: tuple[ImplView, ...]  # the entry's impl slugs that exist
    missing_impls: tuple[str, ...]  # the ones that do not exist yet
    edit_url: str
    link_kind: str = "implements"  # what the linked modules are to the entry: vocabulary.LINK_KINDS

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def url(self) -> str:
        return f"papers/{self.entry.id}/"

    @property
    def section(self):
        return SECTION_BY_NAME[self.entry.section]


def impl_views(found: dict[str, ImplModule], repo_root: Path, entries: list[Entry]) -> dict[str, ImplView]:
    """Describe each reference implementation from its source (read, not imported: no torch needed)."""
    known = {entry.id for entry in entries}
    kind_of = {entry.id: entry.kind for entry in entries}
    runs = benchmark_runs(repo_root / "benchmarks" / "results")
    views = {}
    for slug, module in found.items():
        test = repo_root / "tests" / f"test_{slug.replace('.', '_')}.py"
        views[slug] = ImplView(
            slug=slug,
            source_path=module.path.relative_to(repo_root).as_posix(),
            summary=module.docstring.split("\n\n")[0].replace("\n", " ").strip(),
            family=module.family,
            source=module.path.read_text(encoding="utf-8"),
            demo_command=f"python -m reference_impls.{slug}" if module.has_demo else None,
            test_path=test.relative_to(repo_root).as_posix() if test.exists() else None,
            papers=tuple(entry_id for entry_id in module.implements if entry_id in known),
            covered_by=tuple(entry_id for entry_id in module.covered_by if entry_id in known),
            mentions=_mentions(module.covered_by, kind_of),
            benchmarks=tuple(
                BenchmarkRun(
                    run["device"],
                    run["date"],
                    run["command"],
                    tuple(row for row in run.get("checks", []) if row.get("module") == slug),
                    tuple(row for row in run.get("timings", []) if row.get("module") == slug),
                )
                for run in runs
                if any(row.get("module") == slug for row in run.get("checks", []) + run.get("timings", []))
            ),
        )
    return views


MENTIONS = (("provides", "Provided by"), ("describes", "Described in"), ("uses", "Used in"))


def _mentions(covered_by: tuple[str, ...], kind_of: dict[str, str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The entries of COVERED_BY, grouped by how they relate to the module, for its page."""
    groups = [
        (
            label,
            tuple(entry_id for entry_id in covered_by if entry_id in kind_of and LINK_KINDS[kind_of[entry_id]] == link),
        )
        for link, label in MENTIONS
    ]
    return tuple((label, ids) for label, ids in groups if ids)


SUPERSCRIPT = str.maketrans("0123456789+-n", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻ⁿ")


def plain_text(text: str) -> str:
    """A TLDR or abstract without the LaTeX its authors typed: "(IA)$^3$" as "(IA)³", "100\\%" as
    "100%", "at~https" as "at https", other $…$ maths without its dollars."""
    text = re.sub(r"\$\^\{?([0-9+\-n]+)\}?\$", lambda m: m.group(1).translate(SUPERSCRIPT), text)
    text = re.sub(r"\$([^$]{1,60})\$", r"\1", text)
    text = re.sub(r"\\([%&#_$])", r"\1", text)
    text = re.sub(r"(?<=\S)~(?=\S)", " ", text)
    return " ".join(text.split())


def paper_views(
    entries: list[Entry],
    store: MetadataStore,
    impls: dict[str, ImplView],
    repo_url: str,
    papers_file: str = "papers.yaml",
) -> list[PaperView]:
    views = []
    for entry in entries:
        record = store.get(entry.id)
        paper = record.paper if record else None
        authors = tuple(entry.authors) if entry.authors is not None else (paper.author_names if paper else ())
        bibtex = paper.citationStyles.bibtex if paper and paper.citationStyles else None
        views.append(
            PaperView(
                entry=entry,
                title=entry.title,
                authors=authors,
                venue=entry.venue or (paper.venue_name if paper else ""),
                year=paper.year if paper else None,
                citations=paper.citationCount if paper else None,
                tldr=plain_text((paper.tldr.text if paper and paper.tldr else None) or ""),
                abstract=plain_text((paper.abstract if paper else None) or ""),
                bibtex=(bibtex or "").strip() or _bibtex(entry, paper, authors),
                links=tuple(_links(entry, paper)),
                # A link counts only where the module confirms it (its IMPLEMENTS or COVERED_BY).
                impls=tuple(impls[slug] for slug in entry.impl if slug in impls and impls[slug].confirms(entry.id)),
                missing_impls=tuple(
                    slug for slug in entry.impl if slug not in impls or not impls[slug].confirms(entry.id)
                ),
                edit_url=f"{repo_url.rstrip('/')}/blob/main/{papers_file}#L{entry.line}",
                link_kind=LINK_KINDS[entry.kind],
            )
        )
    return views


def _safe(url) -> str | None:
    """Links from the API are used only if they are plain http(s) links."""
    try:
        return check_link(url) if isinstance(url, str) else None
    except ValueError:
        return None


def _links(entry: Entry, paper: Paper | None):
    pdf = _safe(paper.openAccessPdf.url) if paper and paper.openAccessPdf else None
    if not pdf and entry.arxiv:
        pdf = f"https://arxiv.org/pdf/{entry.arxiv}"
    if not pdf and entry.acl:
        pdf = f"https://aclanthology.org/{entry.acl}.pdf"
    if not pdf and entry.openreview:
        pdf = f"https://openreview.net/pdf?id={entry.openreview}"
    s2_id = entry.s2 or (paper.paperId if paper else None)
    candidates = [
        ("PDF", pdf),
        ("arXiv", entry.arxiv and f"https://arxiv.org/abs/{entry.arxiv}"),
        ("ACL Anthology", entry.acl and f"https://aclanthology.org/{entry.acl}/"),
        ("DOI", entry.doi and f"https://doi.org/{entry.doi}"),
        ("OpenReview", entry.openreview and f"https://openreview.net/forum?id={entry.openreview}"),
        ("Semantic Scholar", s2_id and f"https://www.semanticscholar.org/paper/{s2_id}"),
        ("Code", entry.code),
        ("Website", entry.website),
    ]
    for label, url in candidates:
        if url and _safe(url):
            yield Link(label, url)


def _bibtex(entry: Entry, paper: Paper | None, authors: tuple[str, ...]) -> str:
    """A BibTeX record from what we know, for records without the API's citationStyles."""
    if not entry.paper:
        return ""
    surname = re.sub(r"[^a-z]", "", (authors[0].split()[-1] if authors and authors[0].split() else entry.id).lower())
    surname = surname or "anon"
    year = (paper.year if paper else None) or ""
    first_word = re.sub(r"[^a-z]", "", entry.title.split()[0].lower()) if entry.title.split() else ""
    venue = entry.venue or (paper.venue_name if paper else "")
    kind = "article" if not venue or "arxiv" in venue.lower() else "inproceedings"
    fields = [("title", "{" + _bib_text(entry.title) + "}"), ("author", " and ".join(map(_bib_text, authors)))]
    fields.append(("journal" if kind == "article" else "booktitle", _bib_text(venue or "arXiv preprint")))
    fields += [
        ("year", str(year)),
        ("eprint", entry.arxiv),
        ("archivePrefix", entry.arxiv and "arXiv"),
        ("doi", entry.doi),
        ("url", (next(_links(entry, paper), None) or Link("", "")).url),
    ]
    body = ",\n".join(f"  {name} = {{{value}}}" for name, value in fields if value)
    return f"@{kind}{{{surname}{year}{first_word},\n{body}\n}}"


def _bib_text(text: str) -> str:
    return re.sub(r"([{}\\])", r"\\\1", text)
