"""Shared test helpers: a seeded generator, the `slow` marker, thread-count restoration, runs under
another CPU kernel set; Triton's interpreter where there is no GPU."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

SLOW_ENV = "TORCHSGD8_SLOW_TESTS"

# Without a GPU, tests/test_triton.py runs the Triton kernels in Triton's interpreter. triton reads this when it is
# imported (its own library, tl.min and the like, is decorated then), and test modules that import
# torch._inductor import triton while they are collected, so it is set here, before any of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
def fresh_dynamo():
    """A test that compiles starts and ends with dynamo's caches and counters empty: frame counts are its own,
    and no compiled code outlives it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


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


@pytest.fixture(scope="session")
def run_with_kernel_set():
    """run(isa, argv, timeout, settings=None) -> CompletedProcess of argv with TORCHSGD8_CPU_ISA=isa and the
    other environment settings given (read once per process, hence a subprocess). Skips when isa is this
    process's own kernel set and no settings are given (tested in process) or when this CPU or build has
    no such kernels; fails on any other error."""
    from torchsgd8 import _C

    def run(isa: str, argv: list[str], timeout: float, settings: dict | None = None) -> subprocess.CompletedProcess:
        if _C.cpu_isa() == isa.upper() and not settings:
            pytest.skip(f"{isa} is the kernel set of this process")
        proc = subprocess.run(argv, env=dict(os.environ, TORCHSGD8_CPU_ISA=isa, **(settings or {})),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 and "but this CPU or build lacks" in proc.stderr:
            pytest.skip(f"this CPU or build has no {isa} kernels")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return run
