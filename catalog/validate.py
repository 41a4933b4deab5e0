"""Stage 2: checks across entries, on the records the loader produced.

The schema (catalog/schema.py) judges each entry alone; this module judges the catalog as a whole:
the same id or the same paper listed twice, papers without a metadata record, and `impl` links to
reference implementations that do not exist (a warning, or an error with strict_impl).
"""

from collections.abc import Iterable

from catalog import identifiers
from catalog.impls import ImplModule
from catalog.load import LoadedCatalog, Problem
from catalog.schema import Entry


def validate(
    catalog: LoadedCatalog, stored_ids: Iterable[str], impls: dict[str, ImplModule], strict_impl: bool = False
) -> list[Problem]:
    """All problems of the catalog: the loader's, then the cross-entry ones, in file order."""
    stored_ids = set(stored_ids)
    problems = list(catalog.problems)
    at = lambda entry, field, message, severity="error": problems.append(
        Problem(catalog.path, entry.line_of(field), message, entry.id, field, severity)
    )

    first_seen: dict[tuple[str, str], Entry] = {}  # (what, compared value) -> first entry with it
    for entry in catalog.entries:
        for what, value in [("id", entry.id)] + identifiers.duplicate_keys(entry.title, entry.identifiers):
            earlier = first_seen.setdefault((what, value), entry)
            if earlier is entry:
                continue
            if what == "id":
                at(entry, what, f"duplicate id: already used by the entry at {catalog.path}:{earlier.line}")
            else:
                at(
                    entry,
                    what,
                    f"same paper as entry {earlier.id!r} ({catalog.path}:{earlier.line}): "
                    f"same {identifiers.label(what)}",
                )

        if entry.paper and entry.id not in stored_ids:
            at(entry, "id", "no metadata record in the store; run `catalog enrich` (or add it with `catalog add`)")

        for slug in entry.impl:
            if slug not in impls:
                at(
                    entry,
                    "impl",
                    f"reference implementation {slug!r} does not exist (no reference_impls/"
                    f"{slug.replace('.', '/')}.py)",
                    "error" if strict_impl else "warning",
                )
            elif entry.id not in impls[slug].implements:
                at(
                    entry,
                    "impl",
                    f"reference_impls/{slug.replace('.', '/')}.py does not implement this entry yet "
                    f"(the entry is not in the module's IMPLEMENTS)",
                    "error" if strict_impl else "warning",
                )

    # The other direction: a module may only claim entries that exist and link back to it. Not for a
    # file that did not load (empty, not YAML, ...): every claim would be reported, burying its one error.
    if not catalog.complete:
        return sorted(problems, key=lambda problem: problem.line)
    by_id = {entry.id: entry for entry in catalog.entries}
    broken = {problem.entry_id for problem in catalog.problems}  # already reported; do not cascade
    for slug, module in impls.items():
        for entry_id in module.implements:
            entry = by_id.get(entry_id)
            if entry is None and entry_id not in broken:
                problems.append(
                    Problem(
                        str(module.path), 0, f"IMPLEMENTS names {entry_id!r}, which is not an entry of {catalog.path}"
                    )
                )
            elif entry is not None and slug not in entry.impl:
                at(entry, "impl", f"reference_impls/{slug.replace('.', '/')}.py implements this entry; add {slug!r}")

    return sorted(problems, key=lambda problem: problem.line)
