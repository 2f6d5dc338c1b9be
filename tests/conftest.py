"""Shared test set-up: flush denormals (randomly initialised constrained nets hit them and run
30x slower otherwise), two CPU threads like CI, and the cuda marker's skip."""

import pytest
import torch

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
