"""Stage 2: checks across entries, on the records the loader produced.

The schema (catalog/schema.py) judges each entry alone; this module judges the catalog as a whole:
the same id or the same paper listed twice, papers without a metadata record, and the links between
entries and reference implementations: an entry without one, a module that does not exist, or a
link that the module does not confirm (each a warning, or an error with strict_impl), and a module
that claims an entry which does not link back (always an error).
"""

from collections.abc import Iterable

from catalog import identifiers
from catalog.impls import ImplModule
from catalog.load import LoadedCatalog, Problem
from catalog.schema import Entry
from catalog.vocabulary import CONFIRMED_BY, LINK_KINDS


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

        severity = "error" if strict_impl else "warning"
        if not entry.impl:
            link = LINK_KINDS[entry.kind]
            hint = "the module that implements it" if link == "implements" else f"the modules of the methods it {link}"
            at(entry, "impl", f"links to no reference implementation: name {hint}", severity)
        wanted = CONFIRMED_BY[entry.kind]
        for slug in entry.impl:
            module = impls.get(slug)
            path = f"reference_impls/{slug.replace('.', '/')}.py"
            if module is None:
                at(entry, "impl", f"reference implementation {slug!r} does not exist (no {path})", severity)
            elif not module.confirms(entry.id):
                at(
                    entry,
                    "impl",
                    f"{path} does not confirm this link yet (the entry is not in the module's {wanted})",
                    severity,
                )
            elif entry.id not in (module.implements if wanted == "IMPLEMENTS" else module.covered_by):
                other = "COVERED_BY" if wanted == "IMPLEMENTS" else "IMPLEMENTS"
                at(entry, "impl", f"{path} lists this {entry.kind} in {other}; a {entry.kind} belongs in {wanted}")

    # The other direction: a module may only claim entries that exist and link back to it. Not for a
    # file that did not load (empty, not YAML, ...): every claim would be reported, burying its one error.
    if not catalog.complete:
        return sorted(problems, key=lambda problem: problem.line)
    by_id = {entry.id: entry for entry in catalog.entries}
    broken = {problem.entry_id for problem in catalog.problems}  # already reported; do not cascade
    for slug, module in impls.items():
        for name, claimed in (("IMPLEMENTS", module.implements), ("COVERED_BY", module.covered_by)):
            for entry_id in claimed:
                entry = by_id.get(entry_id)
                if entry is None and entry_id not in broken:
                    message = f"{name} names {entry_id!r}, which is not an entry of {catalog.path}"
                    problems.append(Problem(str(module.path), 0, message))
                elif entry is not None and slug not in entry.impl:
                    at(
                        entry,
                        "impl",
                        f"reference_impls/{slug.replace('.', '/')}.py lists this entry in {name}; add {slug!r}",
                    )

    return sorted(problems, key=lambda problem: problem.line)
