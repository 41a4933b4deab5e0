"""The `catalog` command: the pipeline's stages, one subcommand each.

    catalog check     validate papers.yaml and the metadata store (exit 1 on any error)
    catalog render    write the site's Markdown sources into mkdocs.yml's docs_dir (build/docs)
    catalog build     render, then build the static site with MkDocs (build/site)
    catalog readme    rewrite the list in README.md (--check: exit 1 if it is out of date)
    catalog enrich    fill the metadata store from the Semantic Scholar API (exit 2 without a network)
    catalog add ID    look a paper up and append it to papers.yaml with its record

`python -m catalog` is the same command. Paths default to the files of the repository in the current directory.
"""

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from catalog.add import (
    entry_block,
    exact_title_matches,
    find_duplicate,
    identifiers_from_record,
    insert_entry,
    suggest_id,
)
from catalog.comparison import ComparisonError, method_comparison
from catalog.enrich import enrich, plan, unreachable
from catalog.identifiers import MalformedIdentifier, parse_lookup
from catalog.impls import ImplSourceError, find_impls
from catalog.load import load_catalog, parse_catalog
from catalog.readme import README, ReadmeError, render_list, replace_list
from catalog.render import SiteInfo, fill_shells, render_docs, write_not_found_page
from catalog.s2 import BATCH_SIZE, DEFAULT_API_URL, RetryPolicy, S2Client, S2Error, S2Unreachable
from catalog.search import SearchIndexError, build_search_index
from catalog.store import MetadataStore, StoredRecord, StoreError, load_store, save_store, write_atomically
from catalog.validate import validate
from catalog.views import impl_views, paper_views
from catalog.vocabulary import SECTION_BY_NAME

DEFAULT_PAPERS = "papers.yaml"
DEFAULT_STORE = "catalog/metadata.json"
MKDOCS_CONFIG = "mkdocs.yml"
SITE_SOURCES = "site"


def _store(args) -> MetadataStore | None:
    """The metadata store, or None (its errors printed) if it is not valid."""
    try:
        return load_store(args.store)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _validated(args, strict_impl: bool = False):
    """(catalog, store, problems) of the files named by args, or None if the store cannot be read."""
    catalog = load_catalog(args.papers)
    store = _store(args)
    if store is None:
        return None
    return catalog, store, validate(catalog, store.records, find_impls(), strict_impl=strict_impl)


def _errors(problems) -> list:
    return [problem for problem in problems if problem.severity == "error"]


def cmd_check(args) -> int:
    validated = _validated(args, args.strict_impl)
    if validated is None:
        return 1
    catalog, _, problems = validated
    for problem in problems:
        print(problem, file=sys.stderr)
    errors = len(_errors(problems))
    print(f"{args.papers}: {len(catalog.entries)} entries, {errors} error(s), {len(problems) - errors} warning(s)")
    return 1 if errors else 0


def _load_checked(args):
    """Load and validate; print the errors. Returns (catalog, store), or None if there are any."""
    validated = _validated(args)
    if validated is None:
        return None
    catalog, store, problems = validated
    for problem in _errors(problems):
        print(problem, file=sys.stderr)
    return None if _errors(problems) else (catalog, store)


def _readable_catalog(args, heading: str | None = None):
    """papers.yaml loaded, or None (its errors printed) if it does not load cleanly."""
    catalog = load_catalog(args.papers)
    errors = _errors(catalog.problems)
    if heading and errors:
        print(heading, file=sys.stderr)
    for problem in errors:
        print(problem, file=sys.stderr)
    return None if errors else catalog


def _views(args):
    """The checked catalog as views for the pages, or None (errors printed)."""
    loaded = _load_checked(args)
    if loaded is None:
        print("not rendering: fix the errors above (catalog check lists them all)", file=sys.stderr)
        return None
    catalog, store = loaded
    config = yaml.safe_load(Path(MKDOCS_CONFIG).read_text(encoding="utf-8"))
    site = SiteInfo(config["site_name"], config["site_url"].rstrip("/") + "/", config["repo_url"])
    impls = impl_views(find_impls(), Path.cwd(), catalog.entries)
    papers = paper_views(catalog.entries, store, impls, site.repo_url, args.papers)
    return config, site, impls, papers


def _comparison():
    """The method-comparison table, or None (the error printed)."""
    try:
        return method_comparison()
    except ComparisonError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def _render(args, use_shells: bool):
    views = _views(args)
    if views is None:
        return None
    config, site, impls, papers = views
    comparison = _comparison()
    if comparison is None:
        return None
    written, filled = render_docs(
        papers, impls, Path(SITE_SOURCES), Path(config["docs_dir"]), site, use_shells, comparison
    )
    print(
        f"rendered {len(papers)} entries, {len(impls)} implementations: {written} files in {config['docs_dir']}"
        + (f", {len(filled)} pages to fill after the build" if use_shells else "")
    )
    return config, site, filled


def cmd_render(args) -> int:
    """Every page as Markdown, so that `mkdocs serve` previews the whole site."""
    return 0 if _render(args, use_shells=False) else 1


def cmd_build(args) -> int:
    rendered = _render(args, use_shells=True)
    if rendered is None:
        return 1
    config, site, filled = rendered
    site_dir = Path(args.out or config["site_dir"]).resolve()
    command = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--config-file",
        MKDOCS_CONFIG,
        "--site-dir",
        str(site_dir),
    ]
    # Material prints an end-of-life banner on every build; the README's "Moving to Zensical" covers it.
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    status = subprocess.run(command, env=environment).returncode
    if status != 0:
        return status
    fill_shells(site_dir, filled, site)
    write_not_found_page(site_dir, site)
    print(f"filled {len(filled)} pages")
    try:
        print(build_search_index(site_dir))
    except SearchIndexError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"the site is in {site_dir}")
    return 0


def cmd_readme(args) -> int:
    views = _views(args)
    if views is None:
        return 1
    _, site, _, papers = views
    readme = Path(README)
    current = readme.read_text(encoding="utf-8")
    try:
        updated = replace_list(current, render_list(papers, site))
    except ReadmeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.check:
        if updated != current:
            print("README.md's list is out of date with papers.yaml: run `catalog readme`", file=sys.stderr)
            return 1
        print("README.md's list is up to date")
        return 0
    if updated != current:
        write_atomically(readme, updated)
    print(f"README.md: list of {len(papers)} entries {'rewritten' if updated != current else 'unchanged'}")
    return 0


def _client(args) -> S2Client:
    policy = RetryPolicy(attempts=args.retries + 1, base_seconds=args.backoff, total_seconds=args.retry_budget)
    return S2Client(args.api_url, args.api_key or None, timeout=args.timeout, policy=policy)


def cmd_enrich(args) -> int:
    catalog = _readable_catalog(args)
    store = _store(args)
    if catalog is None or store is None:
        return 1
    now = datetime.datetime.now(datetime.UTC)
    for entry in unreachable(catalog.entries):  # not an error: said once, on stdout
        print(
            f"{args.papers}:{entry.line}: entry {entry.id!r}: no identifier Semantic Scholar takes "
            f"({', '.join(entry.identifiers)}); its record stays as written"
        )
    todo = plan(catalog.entries, store, now, args.max_age, args.refresh)
    if not todo:
        print("every paper has a record; nothing to fetch (use --refresh or --max-age DAYS)")
        return 0
    client = _client(args)
    progress = tqdm(total=len(todo), unit="paper", disable=not sys.stderr.isatty())

    def save(updated: MetadataStore, done: int, total: int) -> None:
        save_store(updated, args.store)  # atomically, after every batch: a rerun resumes from here
        progress.update(min(len(todo), done * BATCH_SIZE) - progress.n)
        if progress.disable:
            print(f"batch {done}/{total} stored", flush=True)

    try:
        _, report = enrich(todo, store, client, on_batch=save)
    except S2Unreachable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except S2Error as error:
        print(
            f"error: {error}; gave up after the retries. Finished batches are stored; rerun to resume.", file=sys.stderr
        )
        return 1
    finally:
        progress.close()
    for entry, asked in report.not_found:
        print(
            f"{args.papers}:{entry.line}: entry {entry.id!r}: not found by Semantic Scholar ({asked}); "
            f"kept its existing record",
            file=sys.stderr,
        )
    for entry, asked, why in report.rejected:
        print(
            f"{args.papers}:{entry.line}: entry {entry.id!r}: Semantic Scholar's record ({asked}) was refused: "
            f"{why}; kept its existing record",
            file=sys.stderr,
        )
    print(
        f"fetched {len(report.fetched)} of {len(todo)} papers in {client.requests} request(s); "
        f"{len(report.not_found)} not found, {len(report.rejected)} refused"
    )
    return 0


def _look_up(client: S2Client, text: str):
    """(record, None) for what the contributor typed (an id, or an exact title), else (None, why)."""
    try:
        api_id = parse_lookup(text)
    except MalformedIdentifier as error:
        return None, str(error)
    if api_id is not None:
        paper = client.get_paper(api_id)
        return (paper, None) if paper else (None, f"Semantic Scholar has no paper with id {api_id!r}")
    candidates = exact_title_matches(text, client.search_title(text))
    closest = None
    if not candidates:
        closest = client.match_title(text)
        candidates = exact_title_matches(text, [closest] if closest else [])
    if len(candidates) > 1:
        listed = "\n".join(
            f"  catalog add {paper.paperId} ...   # {paper.title} ({paper.year or 'no year'}"
            f"{', ' + paper.venue_name if paper.venue_name else ''})"
            for paper in candidates
        )
        return None, f"{len(candidates)} papers are titled {text!r}; add the one you mean by its id:\n{listed}"
    if candidates:
        return candidates[0], None
    if closest is not None and closest.title:
        return None, (
            f"no paper is titled {text!r}; the closest is {closest.title!r} ({closest.year or 'no year'}): "
            f"add it by its id, catalog add {closest.paperId}"
        )
    return None, f"Semantic Scholar has no paper titled {text!r}"


def cmd_add(args) -> int:
    catalog = _readable_catalog(args, heading="papers.yaml has errors; fix them first:")
    store = _store(args)
    if catalog is None or store is None:
        return 1
    if args.section not in SECTION_BY_NAME:
        print(f"error: unknown section {args.section!r}; sections are: {', '.join(SECTION_BY_NAME)}", file=sys.stderr)
        return 1
    client = _client(args)
    try:
        paper, why = _look_up(client, args.paper)
    except S2Unreachable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except S2Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if paper is None:
        print(f"error: {why}", file=sys.stderr)
        return 1
    if not paper.title or not paper.title.strip():
        print(
            f"error: Semantic Scholar's record {paper.paperId} has no title; add the entry to {args.papers} by "
            f"hand (CONTRIBUTING.md shows how)",
            file=sys.stderr,
        )
        return 1

    identifiers = identifiers_from_record(paper)
    title = " ".join(paper.title.split())
    duplicate = find_duplicate(catalog, title, identifiers)
    if duplicate is not None:
        print(
            f"error: already in the catalog: {args.papers}:{duplicate.line}: entry {duplicate.id!r} "
            f"({duplicate.title})",
            file=sys.stderr,
        )
        return 1
    entry_id = args.id or suggest_id(title, {entry.id for entry in catalog.entries})
    tags = [tag.strip() for value in args.tags for tag in value.split(",") if tag.strip()]
    impl = [slug.strip() for value in args.impl for slug in value.split(",") if slug.strip()]
    fields = {
        "id": entry_id,
        "title": title,
        "kind": args.kind,
        "section": args.section,
        **{name: identifiers.get(name) for name in ("arxiv", "acl", "doi", "s2")},
        "code": args.code,
        "website": args.website,
        "tags": tags,
        "impl": impl,
        "added": datetime.date.today(),
    }
    text = insert_entry(catalog, args.section, entry_block(fields))

    # Check the result before writing anything: a bad option must not leave a broken papers.yaml.
    updated_store = MetadataStore(
        {
            **store.records,
            entry_id: StoredRecord(paper, client.api_url, datetime.datetime.now(datetime.UTC).replace(microsecond=0)),
        }
    )
    problems = [
        problem
        for problem in validate(parse_catalog(text, args.papers), updated_store.records, find_impls())
        if problem.severity == "error"
    ]
    if problems:
        print("error: the new entry would not pass `catalog check`; nothing was written:", file=sys.stderr)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    save_store(updated_store, args.store)
    write_atomically(Path(args.papers), text)
    print(f"added {entry_id!r} ({title}) to {args.papers} under {args.section}; stored its record")
    return cmd_check(argparse.Namespace(papers=args.papers, store=args.store, strict_impl=False))


def _add_api_options(parser) -> None:
    parser.add_argument(
        "--api-url",
        default=os.environ.get("S2_API_URL", DEFAULT_API_URL),
        help="Graph API base URL (env S2_API_URL; default %(default)s)",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("S2_API_KEY"), help="API key, sent as x-api-key (env S2_API_KEY)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=30.0,
        help="most seconds for one attempt of a request, the whole answer read (default %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=_count,
        default=5,
        help="retries of a failed request on 429, 5xx, timeouts and dropped connections (default %(default)s)",
    )
    parser.add_argument(
        "--backoff",
        type=_positive,
        default=2.0,
        help="first wait before a retry, doubling each time, unless the server sends "
        "Retry-After (default %(default)s s)",
    )
    parser.add_argument(
        "--retry-budget",
        type=_positive,
        default=300.0,
        help="no retry of a request starts later than this many seconds after its first try, "
        "whatever Retry-After asks (default %(default)s)",
    )


WORST_CASE = (
    "Worst case: one request per 500 papers, each ending within --retry-budget + --timeout seconds "
    "(defaults: 330 s), since every attempt ends within --timeout and none starts after the budget."
)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 100:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from 0 to 100")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catalog", description="Awesome Adapters catalog tools.")
    parser.add_argument("--papers", default=DEFAULT_PAPERS, help="the index (default: %(default)s)")
    parser.add_argument("--store", default=DEFAULT_STORE, help="the metadata store (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate papers.yaml; exit 1 on any error")
    check.add_argument(
        "--strict-impl",
        action="store_true",
        help="an impl naming a module that does not exist is an error, not a warning",
    )
    check.set_defaults(run=cmd_check)

    render = commands.add_parser("render", help="write the site's sources into build/docs")
    render.set_defaults(run=cmd_render)
    build = commands.add_parser("build", help="render, then build the site with MkDocs (--strict)")
    build.add_argument("--out", help="site folder (default: mkdocs.yml's site_dir, build/site)")
    build.set_defaults(run=cmd_build)

    readme = commands.add_parser("readme", help="rewrite the list in README.md from papers.yaml")
    readme.add_argument("--check", action="store_true", help="change nothing; exit 1 if the list is out of date")
    readme.set_defaults(run=cmd_readme)

    enrich_parser = commands.add_parser(
        "enrich",
        help="fetch missing or old records from Semantic Scholar",
        description="Fetch missing or old records from Semantic Scholar. " + WORST_CASE,
    )
    _add_api_options(enrich_parser)
    enrich_parser.add_argument("--max-age", type=_positive, metavar="DAYS", help="also refetch records older than this")
    enrich_parser.add_argument("--refresh", action="store_true", help="refetch every record")
    enrich_parser.set_defaults(run=cmd_enrich)

    add = commands.add_parser(
        "add",
        help="look a paper up and add it to papers.yaml",
        description="Look a paper up by id or exact title and add it to papers.yaml. "
        "A lookup makes up to three requests (title search, title match, nothing "
        "more), each ending within --retry-budget + --timeout seconds.",
    )
    add.add_argument("paper", metavar="ID", help="ARXIV:2106.09685, ACL:..., DOI:..., an S2 paper id, or a title")
    add.add_argument("--section", required=True, help='e.g. "NLP / Methods" (see catalog/vocabulary.py)')
    add.add_argument("--kind", required=True, help="method, system, framework, survey or study")
    add.add_argument("--tags", action="append", default=[], help="comma-separated tags; repeatable")
    add.add_argument("--impl", action="append", default=[], help="reference implementation module(s)")
    add.add_argument("--id", help="the entry's slug (default: made from the title)")
    add.add_argument("--code", help="official code link")
    add.add_argument("--website", help="project website")
    _add_api_options(add)
    add.set_defaults(run=cmd_add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted; files already written are complete (every write is atomic)", file=sys.stderr)
        return 130
    except ImplSourceError as error:  # a reference implementation that does not parse
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file the command writes cannot be written, say
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug of ours: say so in one line, with the traceback only on request
        if os.environ.get("CATALOG_DEBUG"):
            raise
        print(
            f"internal error ({type(error).__name__}: {error}); please report it, with the command. "
            f"CATALOG_DEBUG=1 shows the traceback",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
