# SPDX-License-Identifier: Apache-2.0
"""With host-side hints the launchers never read device tensors (CUDA-graph capturable, no host sync)."""

import pytest
import torch

from vkv.kernels import decode_attention, extend_attention, paged_decode_attention, store_kv

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")


def test_hinted_launchers_read_nothing_on_the_host(device):
    k = torch.randn(3, 48, 2, 64, device=device)
    v = torch.randn_like(k)
    slots = torch.tensor([0, 2], dtype=torch.int32, device=device)
    lens = torch.tensor([40, 5], dtype=torch.int32, device=device)
    q = torch.randn(2, 8, 64, device=device)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=device)
    q_new = torch.randn(5, 8, 64, device=device)
    k_new, v_new = torch.randn(5, 2, 64, device=device), torch.randn(5, 2, 64, device=device)
    positions = torch.tensor([37, 38, 39, 3, 4], dtype=torch.int32, device=device)
    token_slots = torch.tensor([0, 0, 0, 2, 2], dtype=torch.int32, device=device)
    table = torch.arange(6, dtype=torch.int32, device=device).view(2, 3)
    pages = k.view(9, 16, 2, 64)

    with pytest.MonkeyPatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, _forbidden)
        store_kv(k_new, v_new, k, v, token_slots, positions)
        decode_attention(q, k, v, slots, lens, num_splits=3)
        decode_attention(q, k, v, slots, lens, max_len=40)
        paged_decode_attention(q, pages, pages, table, lens, num_splits=2)
        extend_attention(q_new, k, v, slots, cu, lens, max_new_tokens=3)


def _forbidden(*args, **kwargs):
    raise AssertionError("the launcher read a device tensor on the host (a synchronisation)")
