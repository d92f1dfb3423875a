# SPDX-License-Identifier: Apache-2.0
import inspect
import os

import pytest
import torch

from vkv.allocator import PagePool, cuda_usable
from vkv.threads import run_in_thread

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU (over host-mapped memory). Must be set before
    # any @triton.jit decorates, i.e. before vkv.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernels_run_on_the_cpu() -> bool:
    """Whether the Triton kernels run in the interpreter here (over CPU tensors): set above without a GPU; on a
    machine with one they are compiled for it."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# With pytest-xdist (`pytest -n 2 --dist loadgroup`, the README's command), the tests of one group run in one worker:
# the GPU tests (one fills the whole GPU; the other worker's would run out of memory beside it) and each module whose
# module-scoped fixture is costly or timed (set up once, not once a worker; the stress run's targets assume no second
# stress run beside it).
ONE_WORKER_MODULES = {"test_stress.py", "test_server.py", "test_device_full.py", "test_bad_input.py"}


def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist (above). On a machine with a GPU the kernels are compiled for it (TRITON_INTERPRET
    unset), so the cases that run them over CPU tensors (marked cpu_kernels, not gpu) cannot run there: skipped with
    the way to run them."""
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.xdist_group("gpu"))
        elif item.path.name in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    if kernels_run_on_the_cpu():
        return
    skip = pytest.mark.skip(
        reason="runs the Triton kernels on the CPU, in the interpreter; here they are compiled for the GPU "
        "(`CUDA_VISIBLE_DEVICES= pytest` hides the GPU and runs them, as on a machine without one)"
    )
    for item in items:
        if item.get_closest_marker("cpu_kernels") is not None and item.get_closest_marker("gpu") is None:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test's body runs in a vkv.threads.Thread, out of the stack depth pytest's own calls leave: at some depths
    CPython 3.11 and 3.12 map and unmap memory on each call (that module says why), which made a test of the engine on
    the CPU 3x slower. Tests marked main_thread (they set signal handlers) run where pytest calls them."""
    if pyfuncitem.get_closest_marker("main_thread") is not None or inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    run_in_thread(lambda: pyfuncitem.obj(**args), name=f"test {pyfuncitem.name}")
    return True


BACKENDS = [
    pytest.param("host", id="host"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU")],
    ),
]

PAGE = 2 << 20  # the default page on both backends


def skip_unless_kernels_run_on(backend: str) -> None:
    """On a machine with a GPU the Triton kernels are compiled for it, so they cannot run over the host
    backend's CPU tensors (that needs TRITON_INTERPRET=1 before vkv.kernels is imported); the cuda
    parameter of the same test runs them there."""
    if backend == "host" and not kernels_run_on_the_cpu():
        pytest.skip("the kernels are compiled for the GPU here; the host backend needs TRITON_INTERPRET=1")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def pool(backend):
    pool = PagePool(backend, budget_bytes=64 * PAGE)
    yield pool
    pool.close()


def device_of(backend: str) -> torch.device:
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")
