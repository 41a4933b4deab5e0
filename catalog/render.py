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

from catalog.comparison import Comparison
from catalog.views import ImplView, PaperView
from catalog.vocabulary import IMPL_FAMILIES, KINDS, SECTIONS, TAGS

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
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(slug=slug, front_matter=front_matter_string)
    env.globals.update(SECTIONS=SECTIONS, TAGS=TAGS, KINDS=KINDS)
    return env


@dataclass(frozen=True)
class FilledPage:
    """A generated page that skips MkDocs: its body is poured into a shell page after the build."""

    url: str  # e.g. "papers/lora/"
    title: str
    description: str
    body: str  # HTML, already escaped
    shell: str = "default"  # "wide": without the navigation and table-of-contents sidebars


# MkDocs renders one shell page per URL depth; `fill_shells` copies it once per FilledPage. All
# pages of one depth share the same relative links (header, navigation, assets), so only the title,
# description, canonical URL and body differ. A page costs MkDocs ~9 ms; a filled copy ~0.1 ms.
SHELL_TOKEN = "CATALOGSHELLTOKEN"
# URL (without the slash) of each shell: (kind, depth). Wide shells hide MkDocs' two sidebars.
SHELLS = {
    ("default", 2): "catalog-shell/depth2",
    ("default", 3): "catalog-shell/depth2/depth3",
    ("wide", 2): "catalog-shell/wide",
}


class DocsWriter:
    """Writes pages below docs_dir; `base` gives each page the relative path back to the site root."""

    def __init__(self, docs_dir: Path, env: Environment, site: SiteInfo, use_shells: bool):
        self.docs_dir, self.env, self.site, self.use_shells = docs_dir, env, site, use_shells
        self.written = 0
        self.filled: list[FilledPage] = []

    def page(self, path: str, template: str, **context) -> None:
        """A Markdown page that MkDocs renders (templates that mix Markdown and HTML)."""
        self.file(path, self.env.get_template(template).render(base=_base(path), site=self.site, **context))

    def html_page(
        self,
        path: str,
        template: str,
        page_title: str,
        summary: str,
        in_shell: bool,
        shell: str = "default",
        **context,
    ) -> None:
        """A page whose body is pure HTML: through a shell when allowed, else wrapped as Markdown."""
        body = Markup(self.env.get_template(template).render(base=_base(path), site=self.site, **context))
        if self.use_shells and in_shell:
            url = Path(path).with_suffix("").as_posix().removesuffix("index").rstrip("/") + "/"
            self.filled.append(FilledPage(url, page_title, summary, str(body), shell))
        else:
            self.page(path, "page.md.j2", title=page_title, description=summary, body=body, wide=shell == "wide")

    def file(self, path: str, text: str) -> None:
        target = self.docs_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        self.written += 1


def _base(path: str) -> str:
    # With directory URLs, a/b.md is served at a/b/ and a/index.md at a/: count the URL's depth.
    parts = Path(path).with_suffix("").parts
    return "../" * (len(parts) - (1 if parts[-1] == "index" else 0))


def paginate(items: list, size: int = PAGE_SIZE) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)] or [[]]


def render_docs(
    papers: list[PaperView],
    impls: dict[str, ImplView],
    site_src: Path,
    docs_dir: Path,
    site: SiteInfo,
    use_shells: bool = False,
    comparison: Comparison | None = None,
) -> tuple[int, list[FilledPage]]:
    """Write the docs folder afresh. Returns the number of files written and, with use_shells, the
    pages left for `fill_shells` (paper pages, tag pages and later pages of long sections)."""
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    shutil.copytree(site_src, docs_dir, ignore=shutil.ignore_patterns("overrides"))
    out = DocsWriter(docs_dir, make_environment(), site, use_shells)

    # Section and tag pages list the newest papers first: by year, then by the day they were added.
    newest = sorted(papers, key=lambda p: (p.year or 0, p.entry.added), reverse=True)
    by_section = {section.name: [p for p in newest if p.entry.section == section.name] for section in SECTIONS}
    by_tag = {tag: [p for p in newest if tag in p.entry.tags] for tag in TAGS}
    latest = sorted(papers, key=lambda p: (p.entry.added, p.entry.line), reverse=True)

    out.page(
        "index.md",
        "home.md.j2",
        papers=papers,
        impls=impls,
        by_section=by_section,
        latest=latest[:LATEST],
        kernels=[slug for slug in impls if slug.startswith("kernels.")],
    )
    out.file("assets/papers-per-year.svg", papers_per_year_svg(out.env, papers))
    for section in SECTIONS:  # the first page of a section is in the navigation, so MkDocs renders it
        _paged(out, f"sections/{section.slug}", by_section[section.name], section.title, None, first_in_shell=False)
    for tag, tagged in by_tag.items():
        _paged(out, f"tags/{slug(tag)}", tagged, tag, TAGS[tag], first_in_shell=True)
    out.page("tags/index.md", "tags.md.j2", by_tag=by_tag)
    for paper in papers:
        out.html_page(
            f"papers/{paper.id}.md",
            "paper.html.j2",
            paper.title,
            paper.tldr or paper.title,
            in_shell=True,
            p=paper,
        )
    out.page("papers/index.md", "table.md.j2", count=len(papers))
    out.file("assets/papers-data.js", papers_data_js(papers))
    out.page("impls/index.md", "impls.md.j2", impls=impls, papers={p.id: p for p in papers}, families=IMPL_FAMILIES)
    for impl in impls.values():
        out.html_page(
            f"impls/{impl.slug}.md",
            "impl.html.j2",
            f"Reference implementation: {impl.slug}",
            impl.summary,
            in_shell=True,
            shell="wide",
            impl=impl,
            papers={p.id: p for p in papers},
        )
    if comparison is not None:
        out.html_page(
            "impls/comparison.md",
            "comparison.html.j2",
            "Methods compared",
            "Trainable parameters of every method on BERT-base and Llama-2-7B, computed from the implementations.",
            in_shell=False,
            shell="wide",
            comparison=comparison,
            impls=impls,
        )
    out.file("feed.xml", atom_feed(latest[:FEED_SIZE], site))
    if use_shells:
        for (kind, depth), url in SHELLS.items():
            out.file(
                f"{url}.md" if depth == 3 else f"{url}/index.md",
                out.env.get_template("shell.md.j2").render(token=SHELL_TOKEN, wide=kind == "wide"),
            )
    return out.written, out.filled


def _paged(
    out: DocsWriter, folder: str, items: list[PaperView], heading: str, description: str | None, first_in_shell: bool
) -> None:
    chunks = paginate(items)
    for number, chunk in enumerate(chunks, start=1):
        path = f"{folder}/index.md" if number == 1 else f"{folder}/{number}.md"
        title = heading if number == 1 else f"{heading} (page {number})"
        out.html_page(
            path,
            "list.html.j2",
            title,
            description or heading,
            in_shell=first_in_shell or number > 1,
            papers=chunk,
            page=number,
            pages=len(chunks),
            total=len(items),
            heading=heading,
            description=description,
        )


def write_not_found_page(site_dir: Path, site: SiteInfo) -> None:
    """Replace Material's 404.html, whose links only work where the site is published, with one that
    carries its own style and finds the site's root wherever it is served."""
    page = make_environment().get_template("404.html.j2").render(site=site)
    (site_dir / "404.html").write_text(page, encoding="utf-8")


def fill_shells(site_dir: Path, pages: list[FilledPage], site: SiteInfo) -> None:
    """After `mkdocs build`: write each FilledPage from its depth's shell, then drop the shells and
    list the new pages in the sitemap."""
    # Material indents its HTML deeply; at 10,000 pages the indentation alone is ~40 MB. The shells
    # hold no <pre> or <textarea>, so leading white space can go (bodies are poured in afterwards).
    shells = {
        key: re.sub(r"\n\s+", "\n", (site_dir / url / "index.html").read_text(encoding="utf-8"))
        for key, url in SHELLS.items()
    }
    for page in pages:
        key = (page.shell, page.url.count("/"))
        shell, shell_url = shells[key], SHELLS[key] + "/"
        shell = shell.replace(site.site_url + shell_url, site.site_url + page.url)
        shell = re.sub(r'<div class="catalog-shell">.*?</div>', lambda _: page.body, shell, count=1, flags=re.S)
        # The title token stands in <title>, the header and meta tags; description only in its meta tag.
        shell = shell.replace(f'content="{SHELL_TOKEN}"', f'content="{html.escape(page.description)}"', 1)
        shell = shell.replace(SHELL_TOKEN, html.escape(page.title))
        target = site_dir / page.url / "index.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(shell, encoding="utf-8")
    for url in {url.split("/")[0] for url in SHELLS.values()}:
        shutil.rmtree(site_dir / url)

    sitemap_path = site_dir / "sitemap.xml"
    sitemap = re.sub(
        r"\s*<url>\s*<loc>[^<]*catalog-shell[^<]*</loc>.*?</url>",
        "",
        sitemap_path.read_text(encoding="utf-8"),
        flags=re.S,
    )
    today = datetime.date.today().isoformat()
    extra = "".join(
        f"\n    <url>\n         <loc>{html.escape(site.site_url + page.url)}</loc>\n"
        f"         <lastmod>{today}</lastmod>\n    </url>"
        for page in pages
    )
    sitemap_path.write_text(sitemap.replace("</urlset>", extra.lstrip("\n") + "\n</urlset>"), encoding="utf-8")
    (site_dir / "sitemap.xml.gz").unlink(missing_ok=True)  # stale now; the plain sitemap is complete


def papers_data_js(papers: list[PaperView]) -> str:
    """The all-papers table's rows, as a script (it loads from file:// too, unlike fetch)."""
    rows = [
        {
            "id": p.id,
            "title": p.title,
            "url": p.url,
            "year": p.year,
            "venue": p.venue,
            "section": p.entry.section,
            "kind": p.entry.kind,
            "tags": p.entry.tags,
            "impl": bool(p.impls),
            "citations": p.citations,
        }
        for p in papers
    ]
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
                bars.append(
                    {
                        "x": 40 + index * (bar + gap),
                        "y": y,
                        "h": h,
                        "group": group_index,
                        "label": f"{year}, {group}: {value}",
                    }
                )
    return env.get_template("chart.svg.j2").render(
        years=years,
        bars=bars,
        groups=groups,
        bar=bar,
        gap=gap,
        height=height,
        tallest=tallest,
        width=40 + max(len(years), 1) * (bar + gap) + 200,
    )


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
        added = datetime.datetime.combine(paper.entry.added, datetime.time(), datetime.UTC)
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
    feed.updated(newest or datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    return feed.atom_str(pretty=True).decode("utf-8")
