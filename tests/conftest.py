import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A scratch copy of papers.yaml and the metadata store; the cwd is its root."""
    (tmp_path / "catalog").mkdir()
    shutil.copy(REPO / "papers.yaml", tmp_path / "papers.yaml")
    shutil.copy(REPO / "catalog" / "metadata.json", tmp_path / "catalog" / "metadata.json")
    monkeypatch.chdir(tmp_path)
    return tmp_path
