"""Shared pytest setup.

`gpu`-marked tests need CUDA: where none is present they are skipped with that reason (they run where a GPU is
lent, through `make test-all`). `make test` deselects them and `slow` tests altogether.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine); run `make test-all` on a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
