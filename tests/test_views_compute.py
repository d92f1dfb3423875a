# SPDX-License-Identifier: Apache-2.0
"""A Triton kernel and torch ops read and write the cache's strided views in place.

On the host backend the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py).
"""

import pytest
import torch
import triton
import triton.language as tl

from vkv import CacheConfig, KVCache

from .conftest import skip_unless_kernels_run_on


@triton.jit
def _axpy_rows(x_ptr, y_ptr, out_ptr, n, alpha, stride_xt, stride_yt, stride_ot, ROW: tl.constexpr):
    # x, y, out: [n, ROW] row-strided (head and dim flattened, unit stride inside a row)
    t = tl.program_id(0)
    cols = tl.arange(0, ROW)
    x = tl.load(x_ptr + t * stride_xt + cols)
    y = tl.load(y_ptr + t * stride_yt + cols)
    tl.store(out_ptr + t * stride_ot + cols, alpha * x + y)


@pytest.mark.parametrize("layout", ["token", "layer", "grouped"])
def test_triton_and_torch_over_mapped_views(pool, layout):
    skip_unless_kernels_run_on(pool.driver.name)
    cfg = CacheConfig(
        num_layers=3,
        num_kv_heads=2,
        head_dim=32,
        dtype=torch.float32,
        max_slots=3,
        max_seq_len=2048,
        layout=layout,
        group_layers=1 if layout == "grouped" else None,
    )
    with KVCache(cfg, pool) as cache:
        cache.allocate()
        slot = cache.allocate()
        n = 333
        cache.grow(slot, n)
        k0, v1, k2 = cache.key_view(0)[slot, :n], cache.value_view(1)[slot, :n], cache.key_view(2)[slot, :n]
        x = torch.randn(n, 2, 32, device=cache.device)
        y = torch.randn(n, 2, 32, device=cache.device)
        k0.copy_(x)  # torch writes a strided view
        v1.copy_(y)
        _axpy_rows[(n,)](k0, v1, k2, n, 0.5, k0.stride(0), v1.stride(0), k2.stride(0), ROW=64)
        expect = 0.5 * x + y
        torch.testing.assert_close(k2, expect, rtol=1e-6, atol=1e-6)
        # a torch op reading the views in place: attention of 4 queries over the slot's n tokens
        q = torch.randn(1, 2, 4, 32, device=cache.device)
        kt, vt = k2.transpose(0, 1).unsqueeze(0), v1.transpose(0, 1).unsqueeze(0)  # [1, H, n, D], strided
        got = torch.nn.functional.scaled_dot_product_attention(q, kt, vt)
        ref = torch.softmax(
            q.double() @ expect.double().transpose(0, 1).transpose(-1, -2) / 32**0.5, -1
        ) @ y.double().transpose(0, 1)
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
