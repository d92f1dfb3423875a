# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures of the kernel tests.

Without a GPU the kernels run in Triton's interpreter over CPU tensors. TRITON_INTERPRET is read when
@triton.jit decorates, so it is set here, before any test module imports vkv.kernels.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
HERE = Path(__file__).parent

# Tolerances of a kernel against the float32 reference computed from the same (rounded) inputs.
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


# On the GPU, run 1 in GPU_SAMPLE of the GPU-only parameter combinations (VKV_GPU_SAMPLE=N: 1 in N; all of
# them with VKV_FULL_MATRIX=1).
GPU_SAMPLE = int(os.environ.get("VKV_GPU_SAMPLE", "5"))


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.gpu tests (and parameters) of this folder when there is no GPU.

    On the GPU the full cross product of the GPU-only axes is thousands of cases; by default a fixed,
    deterministic sample of them runs (every axis value still appears many times), VKV_FULL_MATRIX=1
    runs them all.
    """
    if ON_GPU:
        if os.environ.get("VKV_FULL_MATRIX"):
            return
        keep, drop = [], []
        for item in items:
            sampled_out = HERE in item.path.parents and item.get_closest_marker("gpu") is not None
            sampled_out = sampled_out and zlib.crc32(item.nodeid.encode()) % GPU_SAMPLE != 0
            (drop if sampled_out else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if HERE in item.path.parents and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda") if ON_GPU else torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed(request) -> None:
    # Fresh but reproducible data per test: the seed depends on the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def assert_close():
    """assert_close(actual, expected, dtype): dtype-tied tolerances; NaN anywhere fails (poisoned outputs)."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        assert not torch.isnan(actual).any(), "output has NaN: an element was not written (or NaN was read)"
        torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCES[dtype])

    return check


@pytest.fixture
def token_major_kv():
    """kv(num_slots, max_seq_len, num_kv_heads, head_dim, dtype, device, num_layers=3, layer=1).

    Builds one buffer laid out like vkv's default token-major layout,
    region[slot][token][layer][k|v][kv_head][head_dim], with each slot padded (like slot_bytes rounded up
    to a page), fills it with random values and returns (k_view, v_view, buffer): layer ``layer``'s K and
    V as strided, non-contiguous [num_slots, max_seq_len, Hkv, D] views of it.
    """

    def build(num_slots, max_seq_len, num_kv_heads, head_dim, dtype, device, num_layers=3, layer=1):
        head_elems = num_kv_heads * head_dim
        token_elems = num_layers * 2 * head_elems
        slot_elems = (max_seq_len + 3) * token_elems  # padded slot, like round_up(..., page)
        buffer = torch.randn(num_slots * slot_elems, device=device).to(dtype)
        shape = (num_slots, max_seq_len, num_kv_heads, head_dim)
        strides = (slot_elems, token_elems, head_dim, 1)
        k = buffer.as_strided(shape, strides, 2 * layer * head_elems)
        v = buffer.as_strided(shape, strides, (2 * layer + 1) * head_elems)
        assert not k.is_contiguous()
        return k, v, buffer

    return build
