"""Which reference implementations exist, and which papers.yaml entries each one implements.

A slug is the module path below reference_impls/, with dots: `lora` is reference_impls/lora.py and
`kernels.nf4` is reference_impls/kernels/nf4.py. Files starting with an underscore are plumbing.
Each module declares the entries it implements as data, `IMPLEMENTS = ("lora", ...)`; it is read
from the source without importing it, so the catalog never needs torch.
"""

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImplModule:
    slug: str
    path: Path  # absolute
    docstring: str
    implements: tuple[str, ...]  # entry ids, from the module's IMPLEMENTS
    has_demo: bool = False  # defines demo(), run by `python -m reference_impls.<slug>`


def find_impls(package_dir: Path = Path("reference_impls")) -> dict[str, ImplModule]:
    found = {}
    package_dir = package_dir.resolve()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir).with_suffix("")
        if any(part.startswith("_") for part in relative.parts):
            continue
        slug = ".".join(relative.parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        has_demo = any(isinstance(node, ast.FunctionDef) and node.name == "demo" for node in tree.body)
        found[slug] = ImplModule(slug, path, ast.get_docstring(tree) or "", _implements(tree), has_demo)
    return found


def _implements(tree: ast.Module) -> tuple[str, ...]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IMPLEMENTS" for t in node.targets):
            value = ast.literal_eval(node.value)
            return tuple(value)
    return ()
