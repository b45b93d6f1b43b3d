"""Test setup: never touch a hub (a failed lookup costs ~25 s here); Triton kernels in the
interpreter when there is no GPU."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# `python -m pytest` puts the repository root first on sys.path, where our `kernels/` folder would
# shadow the `kernels` distribution that transformers imports when it is installed (transformers
# >= 5.x requires it). The root stays importable (`tests.helpers`), after site-packages.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT] + [_ROOT]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tcp's cache (base models) for this test session only, never the user's ~/.cache/tcp; runs the
# tests launch inherit it, and a run a module fixture made is found again by the tests using it.
_CACHE = tempfile.mkdtemp(prefix="tcp-test-cache-")
os.environ["TCP_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402  (after the path and environment above)
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU tensors. Set before any test module imports
    # tcp.kernels: @triton.jit reads it when the kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
