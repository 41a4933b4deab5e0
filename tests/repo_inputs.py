"""The catalog's inputs, copied into a scratch folder (tests and benchmarks). Imports nothing heavy."""

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What `catalog` reads from the working directory: enough to check, render and build the site.
REPO_INPUTS = [
    "papers.yaml",
    "catalog/metadata.json",
    "mkdocs.yml",
    "README.md",
    "CONTRIBUTING.md",
    "site",
    "reference_impls",
    "benchmarks/results",
]


def copy_repo_inputs(target: Path) -> Path:
    for name in REPO_INPUTS:
        source, destination = REPO / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination)
    return target
