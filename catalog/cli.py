"""The `catalog` command: the pipeline's stages, one subcommand each.

    catalog check     validate papers.yaml and the metadata store (exit 1 on any error)
    catalog render    write the site's Markdown sources into mkdocs.yml's docs_dir (build/docs)
    catalog build     render, then build the static site with MkDocs (build/site)
    catalog readme    rewrite the list in README.md (--check: exit 1 if it is out of date)

Paths default to the files of the repository in the current directory.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from catalog.impls import find_impls
from catalog.load import load_catalog
from catalog.readme import README, ReadmeError, render_list, replace_list
from catalog.render import SiteInfo, fill_shells, render_docs
from catalog.store import write_atomically
from catalog.store import StoreError, load_store
from catalog.validate import validate
from catalog.views import impl_views, paper_views

DEFAULT_PAPERS = "papers.yaml"
DEFAULT_STORE = "catalog/metadata.json"
MKDOCS_CONFIG = "mkdocs.yml"
SITE_SOURCES = "site"


def cmd_check(args) -> int:
    catalog = load_catalog(args.papers)
    try:
        store = load_store(args.store)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    problems = validate(catalog, store.records, find_impls(), strict_impl=args.strict_impl)
    for problem in problems:
        print(problem, file=sys.stderr)
    errors = sum(problem.severity == "error" for problem in problems)
    warnings = len(problems) - errors
    print(f"{args.papers}: {len(catalog.entries)} entries, {errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def _load_checked(args):
    """Load and validate; print the problems. Returns (catalog, store), or None if there are errors."""
    catalog = load_catalog(args.papers)
    try:
        store = load_store(args.store)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    problems = validate(catalog, store.records, find_impls())
    errors = [problem for problem in problems if problem.severity == "error"]
    for problem in errors:
        print(problem, file=sys.stderr)
    return None if errors else (catalog, store)


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


def _render(args, use_shells: bool):
    views = _views(args)
    if views is None:
        return None
    config, site, impls, papers = views
    written, filled = render_docs(papers, impls, Path(SITE_SOURCES), Path(config["docs_dir"]), site, use_shells)
    print(f"rendered {len(papers)} entries, {len(impls)} implementations: {written} files in {config['docs_dir']}"
          + (f", {len(filled)} pages to fill after the build" if use_shells else ""))
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
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", MKDOCS_CONFIG,
               "--site-dir", str(site_dir)]
    # Material prints an end-of-life banner on every build; the README's "Moving to Zensical" covers it.
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    status = subprocess.run(command, env=environment).returncode
    if status == 0:
        fill_shells(site_dir, filled, site)
        print(f"filled {len(filled)} pages; the site is in {site_dir}")
    return status


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catalog", description="Awesome Adapters catalog tools.")
    parser.add_argument("--papers", default=DEFAULT_PAPERS, help="the index (default: %(default)s)")
    parser.add_argument("--store", default=DEFAULT_STORE, help="the metadata store (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate papers.yaml; exit 1 on any error")
    check.add_argument("--strict-impl", action="store_true",
                       help="an impl naming a module that does not exist is an error, not a warning")
    check.set_defaults(run=cmd_check)

    render = commands.add_parser("render", help="write the site's sources into build/docs")
    render.set_defaults(run=cmd_render)
    build = commands.add_parser("build", help="render, then build the site with MkDocs (--strict)")
    build.add_argument("--out", help="site folder (default: mkdocs.yml's site_dir, build/site)")
    build.set_defaults(run=cmd_build)

    readme = commands.add_parser("readme", help="rewrite the list in README.md from papers.yaml")
    readme.add_argument("--check", action="store_true", help="change nothing; exit 1 if the list is out of date")
    readme.set_defaults(run=cmd_readme)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
