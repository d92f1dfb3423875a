# SPDX-License-Identifier: Apache-2.0
"""The examples in the docstrings run, where they can run without a GPU: each module's examples pass and
there is at least one (an example marked ``+SKIP`` everywhere would count for nothing)."""

import doctest
import importlib

import pytest

ON_CPU = pytest.mark.cpu_kernels  # their examples run the kernels over CPU tensors
MODULES = [
    pytest.param("vkv.attention", marks=ON_CPU),
    "vkv.cache",
    "vkv.allocator.pool",
    "vkv.allocator.ledger",
    "vkv.allocator.errorlog",
    "vkv.allocator.vrange",
    pytest.param("vkv.kernels.store", marks=ON_CPU),
    pytest.param("vkv.kernels.decode", marks=ON_CPU),
    pytest.param("vkv.kernels.extend", marks=ON_CPU),
    pytest.param("vkv.kernels.paged_decode", marks=ON_CPU),
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no example that runs"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output)"
