import os
import shutil
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on the CPU. The variable must be set
# before any kernel is defined, so here, before the test modules import them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent


# What `catalog` reads from the working directory: enough to check, render and build the site.
REPO_INPUTS = ["papers.yaml", "catalog/metadata.json", "mkdocs.yml", "README.md", "CONTRIBUTING.md", "site",
               "reference_impls", "benchmarks/results"]


def copy_repo_inputs(target: Path) -> Path:
    for name in REPO_INPUTS:
        source, destination = REPO / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, destination)
    return target


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A scratch copy of the catalog's inputs; the cwd is its root, so the real files stay untouched."""
    copy_repo_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
