"""Which reference implementations exist: the modules under reference_impls/, by slug.

A slug is the module path below the package, with dots: `lora` is reference_impls/lora.py and
`kernels.nf4` is reference_impls/kernels/nf4.py. Files starting with an underscore are plumbing.
"""

from pathlib import Path

import reference_impls

PACKAGE_DIR = Path(reference_impls.__file__).parent


def find_impls(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        relative = path.relative_to(package_dir).with_suffix("")
        if any(part.startswith("_") for part in relative.parts):
            continue
        found[".".join(relative.parts)] = path
    return found
