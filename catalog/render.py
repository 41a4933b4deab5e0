"""Stage 3b: write the site's pages from the views, with jinja2 templates, into a docs folder.

The output folder is what MkDocs builds (mkdocs.yml's docs_dir): the hand-written pages of site/
are copied in, and the generated pages are written beside them. Every string that came from
papers.yaml or the API goes into HTML through jinja2's autoescaping, never into Markdown syntax,
so a title holding `<script>`, `](javascript:...)`, `|` or `$` shows as text.

Sizes stay linear in the number of entries: paper pages are kept out of the navigation, long
sections and tags are split into pages of PAGE_SIZE cards, and the all-papers table loads its rows
from one data file instead of carrying them in its HTML.
"""

import datetime
import html
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from feedgen.feed import FeedGenerator
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup

from catalog.views import ImplView, PaperView
from catalog.vocabulary import KINDS, SECTIONS, TAGS

TEMPLATES = Path(__file__).parent / "templates"
PAGE_SIZE = 25  # cards per section or tag page
LATEST = 10  # additions shown on the home page and kept in the feed's first page
FEED_SIZE = 50


@dataclass(frozen=True)
class SiteInfo:
    site_name: str
    site_url: str  # absolute, ends with '/'
    repo_url: str


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def front_matter_string(value: str) -> Markup:
    """A YAML string for front matter. HTML-escaped first: MkDocs puts page.meta.title into the page unescaped."""
    return Markup(json.dumps(html.escape(value), ensure_ascii=False))


def make_environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(slug=slug, front_matter=front_matter_string)
    env.globals.update(SECTIONS=SECTIONS, TAGS=TAGS, KINDS=KINDS)
    return env


class DocsWriter:
    """Writes pages below docs_dir; `base` gives each page the relative path back to the site root."""

    def __init__(self, docs_dir: Path, env: Environment, site: SiteInfo):
        self.docs_dir, self.env, self.site = docs_dir, env, site
        self.written = 0

    def page(self, path: str, template: str, **context) -> None:
        # With directory URLs, a/b.md is served at a/b/ and a/index.md at a/: count the URL's depth.
        parts = Path(path).with_suffix("").parts
        depth = len(parts) - (1 if parts[-1] == "index" else 0)
        text = self.env.get_template(template).render(base="../" * depth, site=self.site, **context)
        self.file(path, text)

    def file(self, path: str, text: str) -> None:
        target = self.docs_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        self.written += 1


def paginate(items: list, size: int = PAGE_SIZE) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)] or [[]]


def render_docs(papers: list[PaperView], impls: dict[str, ImplView], site_src: Path, docs_dir: Path,
                site: SiteInfo) -> int:
    """Write the whole docs folder afresh; returns the number of files written."""
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    shutil.copytree(site_src, docs_dir, ignore=shutil.ignore_patterns("overrides"))
    out = DocsWriter(docs_dir, make_environment(), site)

    by_section = {section.name: [p for p in papers if p.entry.section == section.name] for section in SECTIONS}
    by_tag = {tag: [p for p in papers if tag in p.entry.tags] for tag in TAGS}
    latest = sorted(papers, key=lambda p: (p.entry.added, p.entry.line), reverse=True)

    out.page("index.md", "home.md.j2", papers=papers, impls=impls, by_section=by_section, latest=latest[:LATEST],
             kernels=[slug for slug in impls if slug.startswith("kernels.")])
    out.file("assets/papers-per-year.svg", papers_per_year_svg(out.env, papers))
    for section in SECTIONS:
        _paged(out, f"sections/{section.slug}", "list.md.j2", by_section[section.name],
               heading=section.title, description=None)
    for tag, tagged in by_tag.items():
        _paged(out, f"tags/{slug(tag)}", "list.md.j2", tagged, heading=tag, description=TAGS[tag])
    out.page("tags/index.md", "tags.md.j2", by_tag=by_tag)
    for paper in papers:
        out.page(f"papers/{paper.id}.md", "paper.md.j2", p=paper)
    out.page("papers/index.md", "table.md.j2", count=len(papers))
    out.file("assets/papers-data.js", papers_data_js(papers))
    out.page("impls/index.md", "impls.md.j2", impls=impls, papers={p.id: p for p in papers})
    for impl in impls.values():
        out.page(f"impls/{impl.slug}.md", "impl.md.j2", impl=impl, papers={p.id: p for p in papers})
    out.file("feed.xml", atom_feed(latest[:FEED_SIZE], site))
    return out.written


def _paged(out: DocsWriter, folder: str, template: str, items: list[PaperView], **context) -> None:
    chunks = paginate(items)
    for number, chunk in enumerate(chunks, start=1):
        path = f"{folder}/index.md" if number == 1 else f"{folder}/{number}.md"
        out.page(path, template, papers=chunk, page=number, pages=len(chunks), total=len(items), **context)


def papers_data_js(papers: list[PaperView]) -> str:
    """The all-papers table's rows, as a script (it loads from file:// too, unlike fetch)."""
    rows = [{"id": p.id, "title": p.title, "url": p.url, "year": p.year, "venue": p.venue,
             "section": p.entry.section, "kind": p.entry.kind, "tags": p.entry.tags,
             "impl": bool(p.impls), "citations": p.citations} for p in papers]
    return "window.CATALOG_PAPERS = " + json.dumps(rows, ensure_ascii=True, separators=(",", ":")) + ";\n"


def papers_per_year_svg(env: Environment, papers: list[PaperView]) -> str:
    """A stacked bar chart of papers per year, coloured by top-level section, drawn at build time."""
    groups = list(dict.fromkeys(section.name.split(" / ")[0] for section in SECTIONS))
    counts = Counter((p.year, p.entry.section.split(" / ")[0]) for p in papers if p.year)
    years = list(range(min(y for y, _ in counts), max(y for y, _ in counts) + 1)) if counts else []
    tallest = max((sum(counts[(year, g)] for g in groups) for year in years), default=1)
    bar, gap, height = 28, 8, 180
    bars = []
    for index, year in enumerate(years):
        y = height
        for group_index, group in enumerate(groups):
            value = counts[(year, group)]
            if value:
                h = value / tallest * (height - 20)
                y -= h
                bars.append({"x": 40 + index * (bar + gap), "y": y, "h": h, "group": group_index,
                             "label": f"{year}, {group}: {value}"})
    return env.get_template("chart.svg.j2").render(
        years=years, bars=bars, groups=groups, bar=bar, gap=gap, height=height, tallest=tallest,
        width=40 + max(len(years), 1) * (bar + gap) + 200)


def atom_feed(papers: list[PaperView], site: SiteInfo) -> str:
    feed = FeedGenerator()
    feed.id(site.site_url)
    feed.title(f"{site.site_name}: new entries")
    feed.link(href=site.site_url, rel="alternate")
    feed.link(href=site.site_url + "feed.xml", rel="self")
    feed.subtitle("Papers and tools added to the catalog of adapter and PEFT methods.")
    feed.language("en")
    newest = None
    for paper in reversed(papers):  # feedgen prepends, so add oldest first
        added = datetime.datetime.combine(paper.entry.added, datetime.time(), datetime.timezone.utc)
        newest = max(newest or added, added)
        item = feed.add_entry()
        item.id(site.site_url + paper.url)
        item.title(paper.title)  # feedgen escapes text content
        item.link(href=site.site_url + paper.url)
        item.published(added)
        item.updated(added)
        item.summary(paper.tldr or paper.title)
        for author in paper.authors[:10]:
            item.author(name=author)
    feed.updated(newest or datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
    return feed.atom_str(pretty=True).decode("utf-8")
