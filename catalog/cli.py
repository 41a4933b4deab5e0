"""The `catalog` command: the pipeline's stages, one subcommand each.

    catalog check     validate papers.yaml and the metadata store (exit 1 on any error)

Paths default to the files of the repository in the current directory.
"""

import argparse
import sys

from catalog.impls import find_impls
from catalog.load import load_catalog
from catalog.store import StoreError, load_store
from catalog.validate import validate

DEFAULT_PAPERS = "papers.yaml"
DEFAULT_STORE = "catalog/metadata.json"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catalog", description="Awesome Adapters catalog tools.")
    parser.add_argument("--papers", default=DEFAULT_PAPERS, help="the index (default: %(default)s)")
    parser.add_argument("--store", default=DEFAULT_STORE, help="the metadata store (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="validate papers.yaml; exit 1 on any error")
    check.add_argument("--strict-impl", action="store_true",
                       help="an impl naming a module that does not exist is an error, not a warning")
    check.set_defaults(run=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
