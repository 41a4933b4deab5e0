"""Which reference implementations exist, and which papers.yaml entries each one implements.

A slug is the module path below reference_impls/, with dots: `lora` is reference_impls/lora.py and
`kernels.nf4` is reference_impls/kernels/nf4.py. Files starting with an underscore are plumbing.
Each module declares, as data, the entries whose method it implements, `IMPLEMENTS = ("lora", ...)`,
and the frameworks, surveys and studies that provide, describe or use its methods,
`COVERED_BY = ("hf-peft", ...)`, and its family, `FAMILY = "Low-rank updates"` (one of
`vocabulary.IMPL_FAMILIES`, the implementations index's groups). They are read from the source
without importing it, so the catalog never needs torch. Together with each entry's `impl` list
they are the two sides of every link between the catalog and the code (catalog/validate.py
checks that both sides agree).
"""

import ast
from dataclasses import dataclass
from pathlib import Path

from catalog.vocabulary import IMPL_FAMILIES


@dataclass(frozen=True)
class ImplModule:
    slug: str
    path: Path  # absolute
    docstring: str
    implements: tuple[str, ...]  # entry ids, from the module's IMPLEMENTS
    has_demo: bool = False  # defines demo(), run by `python -m reference_impls.<slug>`
    covered_by: tuple[str, ...] = ()  # entry ids, from the module's COVERED_BY
    family: str = ""  # its FAMILY; "" where it names none

    def confirms(self, entry_id: str) -> bool:
        return entry_id in self.implements or entry_id in self.covered_by


class ImplSourceError(ValueError):
    """A module under reference_impls/ that is not valid Python (its file, line and the parser's message),
    or that names no family of catalog/vocabulary.py."""


def find_impls(package_dir: Path = Path("reference_impls")) -> dict[str, ImplModule]:
    found = {}
    package_dir = package_dir.resolve()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir).with_suffix("")
        if any(part.startswith("_") for part in relative.parts):
            continue
        slug = ".".join(relative.parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as error:
            raise ImplSourceError(f"{path.relative_to(package_dir.parent)}:{error.lineno}: {error.msg}") from None
        has_demo = any(isinstance(node, ast.FunctionDef) and node.name == "demo" for node in tree.body)
        family = "".join(_constant(tree, "FAMILY"))
        if family not in IMPL_FAMILIES:
            found_here = f"FAMILY = {family!r} is not" if family else "no FAMILY: a module names its family,"
            raise ImplSourceError(
                f"{path.relative_to(package_dir.parent)}:1: {found_here} one of those in catalog/vocabulary.py "
                f"({', '.join(IMPL_FAMILIES)})"
            )
        found[slug] = ImplModule(
            slug,
            path,
            ast.get_docstring(tree) or "",
            _constant(tree, "IMPLEMENTS"),
            has_demo,
            _constant(tree, "COVERED_BY"),
            family,
        )
    return found


def _constant(tree: ast.Module, name: str) -> tuple[str, ...]:
    """The tuple of strings assigned to `name` at the module's top level, or (). A lone string, as
    in `("lora")` without its comma, is one id, not a tuple of its letters."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            value = ast.literal_eval(node.value)
            return (value,) if isinstance(value, str) else tuple(value)
    return ()
