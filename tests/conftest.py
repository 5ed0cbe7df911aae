import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # test helpers import as top-level modules

# Tiny models run fastest on one thread, and several threads thrash when processes share 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed() -> int:
    torch.manual_seed(0)
    return 0


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
