"""Which reference implementations exist: the modules under reference_impls/, by slug.

A slug is the module path below the package, with dots: `lora` is reference_impls/lora.py and
`kernels.nf4` is reference_impls/kernels/nf4.py. Files starting with an underscore are plumbing.
"""

from pathlib import Path


def find_impls(package_dir: Path = Path("reference_impls")) -> dict[str, Path]:
    """Slug -> absolute path of every implementation module below package_dir."""
    found = {}
    package_dir = package_dir.resolve()
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir).with_suffix("")
        if any(part.startswith("_") for part in relative.parts):
            continue
        found[".".join(relative.parts)] = path
    return found
