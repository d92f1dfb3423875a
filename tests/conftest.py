# SPDX-License-Identifier: Apache-2.0
import os

import pytest
import torch

from vkv.allocator import PagePool, cuda_usable

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU (over host-mapped memory). Must be set before
    # any @triton.jit decorates, i.e. before vkv.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = [
    pytest.param("host", id="host"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU")],
    ),
]

PAGE = 2 << 20  # the default page on both backends


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
