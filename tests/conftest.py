"""Shared test set-up: flush denormals (randomly initialised constrained nets hit them and run
30x slower otherwise), two CPU threads like CI, the cuda marker's skip, and without a GPU
Triton's interpreter (FG-SGD's Triton kernels then run on CPU tensors, where a test asks)."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # FG-SGD's Triton kernels run through the interpreter (CPU tensors)
    assert "triton" not in sys.modules, "TRITON_INTERPRET must be set before triton is imported"
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_flush_denormal(True)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """One torch thread for the test: with tiny tensors it is as fast as two, and immune to a
    busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
