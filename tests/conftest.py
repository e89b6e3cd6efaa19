"""Shared test helpers: a seeded generator, the `slow` marker, thread-count restoration."""
from __future__ import annotations

import os

import pytest
import torch

SLOW_ENV = "TORCHSGD8_SLOW_TESTS"


def pytest_configure(config):
    config.addinivalue_line("markers", f"slow: long-running test; runs only when {SLOW_ENV}=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow test; set {SLOW_ENV}=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so every test sees the same random numbers on every run."""
    return torch.Generator().manual_seed(20240611)


@pytest.fixture
def restore_threads():
    """Lets a test change torch's intra-op thread count; puts the original back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
