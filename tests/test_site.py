"""The website: a strict build of the real catalog, every internal link resolves, data is escaped."""

import datetime
import gzip
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest
import yaml

from catalog.load import load_catalog
from catalog.readme import markdown_text
from catalog.vocabulary import SECTIONS

from conftest import REPO, copy_repo_inputs

sys.path.insert(0, str(REPO / "benchmarks"))
from synthetic_catalog import write_synthetic  # noqa: E402

HOSTILE = '<script>alert("x")</script> ](javascript:alert(1)) {{ 7*7 }} | $x$ & <b>bold</b>'


def build(root: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "catalog.cli", "build", "--out", "out"], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING  -" not in result.stderr, result.stderr
    return root / "out"


ENTRIES = len(load_catalog(REPO / "papers.yaml").entries)  # a page and a table row each


@pytest.fixture(scope="module")
def real_site(tmp_path_factory):
    return build(copy_repo_inputs(tmp_path_factory.mktemp("real")))


class LinkCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def broken_internal_links(site: Path) -> list[str]:
    broken = []
    for page in site.rglob("*.html"):
        if page.name == "404.html":
            continue  # served at any depth, so it links from the site root, by design
        collector = LinkCollector()
        collector.feed(page.read_text(encoding="utf-8"))
        for link in collector.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith(("#", "mailto:", "//")):
                continue
            target = (page.parent / urldefrag(parts.path)[0]).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)} -> {link}")
    return broken


def test_real_site_has_every_page_and_no_broken_link(real_site):
    assert broken_internal_links(real_site) == []
    for section in SECTIONS:
        assert (real_site / "sections" / section.slug / "index.html").exists()
    assert len(list((real_site / "papers").glob("*/index.html"))) == ENTRIES
    for page in (
        "index.html",
        "papers/index.html",
        "tags/index.html",
        "impls/index.html",
        "contributing/index.html",
        "404.html",
        "feed.xml",
        "assets/papers-per-year.svg",
        "assets/papers-data.js",
        "pagefind/pagefind.js",
        "assets/javascripts/search.js",
    ):
        assert (real_site / page).exists(), page


def test_filled_pages_are_complete_pages(real_site):
    page = (real_site / "papers" / "lora" / "index.html").read_text()
    assert "<title>LoRA: Low-Rank Adaptation of Large Language Models - Awesome Adapters</title>" in page
    assert 'href="https://awesome-adapters.github.io/awesome-adapters/papers/lora/"' in page  # canonical
    assert 'class="md-header' in page and 'class="aa-search' in page  # Material's header, our search box
    for path in real_site.rglob("*"):
        if path.is_file() and path.suffix in (".html", ".json", ".xml"):
            text = path.read_text()
            assert "CATALOGSHELLTOKEN" not in text and "catalog-shell" not in text, path
    assert "papers/lora/</loc>" in (real_site / "sitemap.xml").read_text()


def search_fragments(site: Path) -> dict[str, dict]:
    """Pagefind's stored pages, by URL: each fragment is gzipped JSON after a signature."""
    fragments = {}
    for path in (site / "pagefind" / "fragment").iterdir():
        data = json.loads(gzip.decompress(path.read_bytes()).removeprefix(b"pagefind_dcd"))
        fragments[data["url"]] = data
    return fragments


def test_search_indexes_papers_and_implementations_not_lists(real_site):
    fragments = search_fragments(real_site)
    urls = set(fragments)
    assert {f"/papers/{path.parent.name}/" for path in (real_site / "papers").glob("*/index.html")} <= urls
    assert {"/impls/lora/", "/impls/", "/contributing/"} <= urls
    assert not {url for url in urls if url.startswith(("/sections/", "/tags/"))} and "/papers/" not in urls
    lora = fragments["/papers/lora/"]
    assert lora["meta"]["title"] == "LoRA: Low-Rank Adaptation of Large Language Models"
    assert "J. E. Hu" in lora["content"] and "@inproceedings" not in lora["content"]  # BibTeX left out
    # An implementation page is found by its prose, not by its code.
    impl = fragments["/impls/lora/"]["content"]
    assert "low-rank updates of frozen linear layers" in impl and "def merge(self)" not in impl
    entry = json.loads((real_site / "pagefind" / "pagefind-entry.json").read_text())
    assert entry["languages"]["en"]["page_count"] == len(fragments)


def test_render_alone_writes_every_page_as_markdown_for_mkdocs_serve(repo_copy):
    from catalog.cli import main

    assert main(["render"]) == 0
    docs = repo_copy / "build" / "docs"
    assert (docs / "papers" / "lora.md").exists() and (docs / "tags" / "lora" / "index.md").exists()
    assert not (docs / "catalog-shell").exists()


def test_paper_page_shows_record_corrections_and_edit_link(real_site):
    page = (real_site / "papers" / "compacter" / "index.html").read_text()
    assert "Rabeeh Karimi Mahabadi, James Henderson, Sebastian Ruder" in page
    assert "Joe Davison" not in page  # the API's wrong author list is overridden by papers.yaml
    assert "sum of Kronecker products" in page  # the abstract
    assert "@inproceedings{mahabadi2021compacter" in page
    line = next(
        number
        for number, text in enumerate((REPO / "papers.yaml").read_text().splitlines(), 1)
        if text == "- id: compacter"
    )
    assert f"papers.yaml#L{line}" in page and f"line {line})" in page
    assert "https://arxiv.org/abs/2106.04647" in page and "https://github.com/rabeehk/compacter" in page


def test_links_say_what_the_code_is_to_the_entry(real_site):
    """A method's page: its implementation; a framework's, survey's or study's: the methods it
    provides, describes or uses; a module's page lists them all, grouped."""
    page = lambda entry_id: (real_site / "papers" / entry_id / "index.html").read_text()
    assert 'Reference implementation <small class="aa-link-kind">(implements this method)' in page("lora")
    assert "(of the methods this framework provides)" in page("hf-peft") and "impls/interop/" in page("hf-peft")
    assert "(of the methods this survey describes)" in page("peft-survey-han-2024")
    assert "(of the methods this study uses)" in page("delta-tuning")
    lora = (real_site / "impls" / "lora" / "index.html").read_text()
    for label, entry_id in (
        ("Implements", "dora"),
        ("Provided by", "hf-peft"),
        ("Described in", "peft-ref"),
        ("Used in", "delta-tuning"),
    ):
        assert re.search(rf"<p>{label}: [^\n]*papers/{entry_id}/", lora), label


def test_home_page_counts_and_feed(real_site):
    home = (real_site / "index.html").read_text()
    assert re.search(rf"<strong>{ENTRIES}</strong> papers and tools", home)
    assert 'type="application/atom+xml"' in home and "feed.xml" in home
    feed = ElementTree.parse(real_site / "feed.xml").getroot()
    atom = "{http://www.w3.org/2005/Atom}"
    entries = feed.findall(f"{atom}entry")
    assert len(entries) == 50
    assert all(entry.find(f"{atom}link").get("href").startswith("https://") for entry in entries)
    svg = ElementTree.parse(real_site / "assets" / "papers-per-year.svg").getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}rect")) > 10


def test_table_data_lists_every_entry(real_site):
    script = (real_site / "assets" / "papers-data.js").read_text()
    rows = json.loads(script.removeprefix("window.CATALOG_PAPERS = ").rstrip().rstrip(";"))
    assert len(rows) == ENTRIES
    lora = next(row for row in rows if row["id"] == "lora")
    assert lora["year"] == 2021 and lora["tags"] == ["LoRA"] and lora["url"] == "papers/lora/"


def test_hostile_text_from_yaml_and_api_shows_as_text(tmp_path):
    root = copy_repo_inputs(tmp_path)
    papers = root / "papers.yaml"
    text = papers.read_text().replace('"LoRA: Low-Rank Adaptation of Large Language Models"', json.dumps(HOSTILE))
    # Make it the newest entry (a day after the newest), so that it is in the feed too.
    newest = max(datetime.date.fromisoformat(day) for day in re.findall(r"added: (\d{4}-\d{2}-\d{2})", text))
    later = (newest + datetime.timedelta(days=1)).isoformat()
    text = re.sub(r"(- id: lora\n(?:  .*\n)*?  added: )\d{4}-\d{2}-\d{2}", rf"\g<1>{later}", text)
    papers.write_text(text)
    store_path = root / "catalog" / "metadata.json"
    store = json.loads(store_path.read_text())
    paper = store["records"]["lora"]["paper"]
    paper["tldr"]["text"] = HOSTILE
    paper["abstract"] = HOSTILE
    paper["authors"] = [{"name": HOSTILE}]
    paper["openAccessPdf"] = {"url": "javascript:alert(2)"}
    store_path.write_text(json.dumps(store))
    site = build(root)

    def page_listing_lora(listing):  # sections and tags are paginated: the page whose cards include LoRA's
        pages = sorted(listing.rglob("index.html"))
        return next(page for page in pages if "papers/lora/" in page.read_text())

    for page in [
        site / "papers" / "lora" / "index.html",
        page_listing_lora(site / "sections" / "nlp-methods"),
        page_listing_lora(site / "tags" / "lora"),
    ]:
        text = page.read_text()
        assert "<script>alert" not in text and "<b>bold</b>" not in text, page
        assert "&lt;script&gt;alert" in text, page
        assert not re.search(r"""(href|src)=["']?\s*javascript:""", text, re.I), page
        assert "{{ 7*7 }}" in text, page  # shown as written, not evaluated by any template engine
    feed = (site / "feed.xml").read_text()
    assert "<script>" not in feed and "&lt;script&gt;" in feed
    # In the README list, Markdown syntax in the title is escaped too.
    escaped = markdown_text(HOSTILE)
    assert "<script>" not in escaped and r"\](javascript:" in escaped and r"\|" in escaped and r"\$x\$" in escaped


def test_long_sections_are_paginated_and_pages_stay_small(tmp_path):
    root = copy_repo_inputs(tmp_path)
    write_synthetic(root, 600)  # 60 per section: three pages each
    site = build(root)
    assert (site / "sections" / "nlp-methods" / "3" / "index.html").exists()
    assert not (site / "sections" / "nlp-methods" / "4").exists()
    assert broken_internal_links(site) == []
    largest = max(page.stat().st_size for page in site.rglob("*.html"))
    assert largest < 100_000


def test_navigation_lists_the_sections_of_the_vocabulary():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav_sections = next(item["Sections"] for item in config["nav"] if "Sections" in item)
    assert nav_sections == [f"sections/{section.slug}/index.md" for section in SECTIONS]
    assert config["plugins"] == []  # nothing that needs the network at build time; search is Pagefind's
    assert config["theme"]["font"] is False  # no Google Fonts


def test_readme_list_is_up_to_date():
    result = subprocess.run(
        [sys.executable, "-m", "catalog.cli", "readme", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_committed_gpu_benchmarks_show_on_implementation_pages(tmp_path):
    root = copy_repo_inputs(tmp_path)
    results = root / "benchmarks" / "results"
    run = {
        "date": "2026-11-30T10:00:00+00:00",
        "command": "python benchmarks/kernels.py",
        "device": "NVIDIA H100 80GB HBM3",
        "smoke": False,
        "checks": [
            {
                "kernel": "fused_lora",
                "shape": "M=1 K=4096 N=4096 r=16",
                "dtype": "bfloat16",
                "max_relative_error": 0.004,
                "limit": 0.01,
                "ok": True,
                "module": "kernels.fused_lora",
            }
        ],
        "timings": [
            {
                "kernel": "fused_lora forward",
                "shape": "M=1 K=4096 N=4096 r=16",
                "ours_ms": 0.0213,
                "peft_ms": 0.04,
                "base_ms": 0.02,
                "ours_over_base": 1.065,
                "goal_ours_over_base": 1.25,
                "floor_over_base": 1.008,
                "goal_met": True,
                "module": "kernels.fused_lora",
            },
            {
                "kernel": "punica timings",
                "error": "RuntimeError: <boom>",
                "ok": False,
                "goal_met": None,
                "module": "kernels.punica",
            },
            {
                "kernel": "nf4 dequantize",
                "shape": "4096x11008 -> bfloat16",
                "ours_ms": 0.05,
                "fraction_of_copy_bandwidth": 0.83,
                "goal_met": True,
                "module": "kernels.nf4",
            },
        ],
    }
    (results / "kernels-NVIDIA_H100.json").write_text(json.dumps(run))
    (results / "kernels-smoke.json").write_text(json.dumps({**run, "smoke": True, "device": "CPU interpreter"}))
    site = build(root)
    page = (site / "impls" / "kernels.fused_lora" / "index.html").read_text()
    assert "NVIDIA H100 80GB HBM3" in page and "1.065" in page and "python benchmarks/kernels.py" in page
    assert "1.008" in page  # the floor beside our ratio
    # A section that failed on the GPU shows as an error (escaped), not as a missing row.
    assert "error: RuntimeError: &lt;boom&gt;" in (site / "impls" / "kernels.punica" / "index.html").read_text()
    assert "boom" not in (site / "papers" / "punica" / "index.html").read_text()
    assert "CPU interpreter" not in page  # smoke runs are not figures
    assert "83% of copy bandwidth" in (site / "papers" / "qlora" / "index.html").read_text()
    assert "Demo:" not in page  # kernels have no demo


def test_lists_are_newest_first_and_tldrs_lose_their_latex(real_site):
    page = (real_site / "sections" / "nlp-methods" / "index.html").read_text()
    assert "newest first" in page
    years = [int(year) for year in re.findall(r'<span class="aa-year">(\d{4})</span>', page)]
    assert len(years) > 5 and years == sorted(years, reverse=True)
    ia3 = (real_site / "papers" / "ia3" / "index.html").read_text()
    assert "(IA)³ that scales" in ia3 and "$^3$" not in ia3
    assert "available at https://github.com/rabeehk" in (real_site / "papers" / "compacter" / "index.html").read_text()


def test_enrichment_workflow_runs_weekly_and_on_demand_and_proposes_a_pull_request():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "enrich.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["schedule"][0]["cron"].split()[-1] == "1" and "workflow_dispatch" in triggers
    steps = workflow["jobs"]["enrich"]["steps"]
    fetch = next(step for step in steps if "catalog enrich" in step.get("run", ""))
    assert fetch["run"] == "catalog enrich --max-age 30" and "secrets.S2_API_KEY" in fetch["env"]["S2_API_KEY"]
    proposal = next(step for step in steps if step.get("uses", "").startswith("peter-evans/create-pull-request"))
    assert "catalog/metadata.json" in proposal["with"]["add-paths"]


def test_no_page_loads_anything_from_another_host(real_site):
    """What the pages ask the browser to fetch (scripts, styles, fonts, images, frames) is all the
    site's own; the browser test checks the requests themselves."""
    fetching = re.compile(
        r"<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=[\"']?(https?:)?//"
        r"|<link\b(?=[^>]*\brel=[\"']?(?:stylesheet|preconnect|dns-prefetch|preload|modulepreload|icon|manifest))"
        r"[^>]*\bhref=[\"']?(https?:)?//",
        re.I,
    )
    for page in real_site.rglob("*.html"):
        assert not fetching.search(page.read_text()), page
    for sheet in real_site.rglob("*.css"):
        assert not re.search(r"(url\(|@import)\s*[\"']?(https?:)?//", sheet.read_text()), sheet


def test_a_reference_implementation_that_does_not_parse_is_one_clear_line(repo_copy, capsys):
    from catalog.cli import main

    (repo_copy / "reference_impls" / "zz_broken.py").write_text('"""Broken."""\nIMPLEMENTS = ()\ndef f(:\n')
    for command in (["check"], ["render"]):
        assert main(command) == 1
        assert capsys.readouterr().err.strip() == "error: reference_impls/zz_broken.py:3: invalid syntax"


def test_implementations_index_groups_modules_by_family(real_site):
    from catalog.vocabulary import IMPL_FAMILIES

    page = (real_site / "impls" / "index.html").read_text()
    headings = re.findall(r'<h2 id="([^"]+)"[^>]*>([^<]+)', page)
    assert [title.strip() for _, title in headings] == list(IMPL_FAMILIES)  # every family has a module, in order
    products = page[page.index('id="hadamard-and-kronecker-products"') : page.index('id="activation-scaling"')]
    assert "impls/products/" in products and "impls/lora/" not in products
    assert "HiRA: Parameter-Efficient Hadamard" in products and "FedPara" in products


def test_a_paper_known_by_openreview_links_there_and_to_its_implementation(real_site):
    page = (real_site / "papers" / "hira" / "index.html").read_text()
    assert 'href="https://openreview.net/forum?id=TwJrTz9cRS"' in page
    assert 'href="https://openreview.net/pdf?id=TwJrTz9cRS"' in page
    assert "impls/products/" in page and "Qiushi Huang" in page
    for paper, module in [("loha", "products"), ("lokr", "products"), ("delora", "delora")]:
        assert f"impls/{module}/" in (real_site / "papers" / paper / "index.html").read_text(), paper


def test_a_module_without_a_known_family_is_one_clear_line(repo_copy, capsys):
    from catalog.cli import main

    (repo_copy / "reference_impls" / "zz_nofamily.py").write_text('"""No family."""\nIMPLEMENTS = ()\n')
    assert main(["check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: reference_impls/zz_nofamily.py:1: no FAMILY: a module names its family, one of")
    (repo_copy / "reference_impls" / "zz_nofamily.py").write_text('"""Odd."""\nFAMILY = "Misc"\nIMPLEMENTS = ()\n')
    assert main(["render"]) == 1
    assert "zz_nofamily.py:1: FAMILY = 'Misc' is not one of those" in capsys.readouterr().err
