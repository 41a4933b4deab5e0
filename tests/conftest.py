import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on the CPU. The variable must be set
# before any kernel is defined, so here, before the test modules import them; set, not defaulted,
# so that a TRITON_INTERPRET=0 in the environment cannot turn the kernel tests into PyTorch-only ones.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from repo_inputs import REPO, copy_repo_inputs  # noqa: F401 (re-exported for the tests)

# The fake Semantic Scholar API's fixtures. They need the catalog's packages, which the kernel-only
# environments (.venv-gpu-triton, a lent GPU machine) do not install: there they are not loaded.
if importlib.util.find_spec("werkzeug") and importlib.util.find_spec("pydantic"):
    pytest_plugins = ["s2_helpers"]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A scratch copy of the catalog's inputs; the cwd is its root, so the real files stay untouched."""
    copy_repo_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
