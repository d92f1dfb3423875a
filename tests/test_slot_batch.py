# SPDX-License-Identifier: Apache-2.0
"""SlotBatch (vkv.integrations.batch): a left-padded [B, S] batch over slots, against float64 attention over each
row's unpadded tokens; pads never stored; reorder, crop and graph-mode settling."""

import pytest
import torch

from vkv import CacheConfig, InvalidRequestError, KVCache
from vkv.attention import AttentionWrapper
from vkv.integrations.batch import SlotBatch

from .conftest import skip_unless_kernels_run_on

HQ, HKV, D, LAYERS = 4, 2, 64, 2


def _setup(pool, graphs=False, rows=3):
    skip_unless_kernels_run_on(pool.driver.name)
    dtype = torch.float32 if pool.driver.name == "host" else torch.bfloat16
    cfg = CacheConfig(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, dtype=dtype, max_slots=2 * rows, max_seq_len=64)
    cache = KVCache(cfg, pool)
    return cache, SlotBatch(AttentionWrapper(cache, HQ), max_rows=rows, graphs=graphs), dtype


def _reference(q, k, v, scale):
    """float64 causal attention of the last len(q) of a row's tokens over all of them. q [n, Hq, D], k/v [m, Hkv, D]."""
    q, k, v = q.double(), k.double().repeat_interleave(HQ // HKV, 1), v.double().repeat_interleave(HQ // HKV, 1)
    n, m = q.shape[0], k.shape[0]
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(torch.arange(m)[None, :] > (m - n + torch.arange(n))[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def _step(batch, mask, dtype, device, history, graphs=False):
    """One forward of every layer over the new columns of ``mask`` ([B, S] of this step, 0 = pad) with fresh
    random q/k/v; checks each row's output against the reference over its tokens so far (pads left out)."""
    b, s = mask.shape
    step = batch.begin(b, s, torch.cat([torch.ones(b, batch.seen, dtype=torch.long), mask], 1) if batch.seen else mask)
    for layer in range(LAYERS):
        q, k, v = (torch.randn(b, h, s, D, dtype=dtype, device=device) for h in (HQ, HKV, HKV))
        if graphs and s == 1:
            out = batch.decode_step(layer, q, k, v, D**-0.5)
        else:
            batch.store(layer, k, v)
            out = batch.attend(layer, q)
        assert out.shape == (b, s, HQ, D)
        for row in range(b):
            keep = mask[row].bool().to(device)
            hk, hv = history[layer][row]
            hk = history[layer][row][0] = torch.cat([hk, k[row].transpose(0, 1)[keep]])
            hv = history[layer][row][1] = torch.cat([hv, v[row].transpose(0, 1)[keep]])
            got = out[row][keep]
            if got.numel():
                want = _reference(q[row].transpose(0, 1)[keep].cpu(), hk.cpu(), hv.cpu(), D**-0.5)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)
            assert not out[row][~keep].any()  # a pad's output is zero
    return step


def _history(device, dtype, rows):
    return [[[torch.empty(0, HKV, D, dtype=dtype, device=device)] * 2 for _ in range(rows)] for _ in range(LAYERS)]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_left_padded_steps_match_the_reference_and_store_no_pad(pool, graphs):
    cache, batch, dtype = _setup(pool, graphs)
    device = cache.device
    history = _history(device, dtype, 3)
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    _step(batch, mask, dtype, device, history, graphs)
    for _ in range(3):
        _step(batch, torch.ones(3, 1, dtype=torch.long), dtype, device, history, graphs)
    batch.settle()
    assert batch.seen == 8 and batch.lens == [5, 8, 4]
    for row, slot in enumerate(batch.rows):  # the slot holds exactly the row's tokens, in order
        for layer in range(LAYERS):
            n = batch.lens[row]
            assert torch.equal(cache.key_view(layer)[slot, :n], history[layer][row][0])
            assert torch.equal(cache.value_view(layer)[slot, :n], history[layer][row][1])
    cache.close()


def test_a_forward_that_stops_half_way_is_not_counted(pool):
    for graphs in (False, True):
        cache, batch, dtype = _setup(pool, graphs)
        history = _history(cache.device, dtype, 3)
        _step(batch, torch.ones(3, 4, dtype=torch.long), dtype, cache.device, history, graphs)
        batch.begin(3, 1, None)
        q, k, v = (torch.randn(3, h, 1, D, dtype=dtype, device=cache.device) for h in (HQ, HKV, HKV))
        batch.store(0, k, v)
        batch.attend(0, q)  # layer 1 never runs
        assert batch.lens == [4, 4, 4]
        batch.settle()
        assert batch.lens == [4, 4, 4]  # eager: the step waits to be replaced; graphs: dropped
        _step(batch, torch.ones(3, 1, dtype=torch.long), dtype, cache.device, history, graphs)  # goes on from 4
        cache.close()


def test_layers_out_of_order_and_right_padding_are_refused(pool):
    cache, batch, dtype = _setup(pool)
    q, k, v = (torch.randn(2, h, 3, D, dtype=dtype, device=cache.device) for h in (HQ, HKV, HKV))
    with pytest.raises(InvalidRequestError, match="no step begun"):
        batch.store(0, k, v)
    with pytest.raises(InvalidRequestError, match="left padding"):
        batch.begin(2, 3, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert batch.rows is None and cache.stats().slots_in_use == 0
    batch.begin(2, 3, None)
    with pytest.raises(InvalidRequestError, match="expects layer 0 to store"):
        batch.attend(0, q)
    batch.store(0, k, v)
    with pytest.raises(InvalidRequestError, match="expects layer 0 to attend"):
        batch.store(1, k, v)
    with pytest.raises(InvalidRequestError, match=r"states must be \[2, 2, 3, 64\]"):
        batch.begin(2, 3, None)
        batch.store(0, k[:, :1], v)
    cache.close()


def test_select_copies_rows_by_sharing_their_pages_and_crop_shortens_them(pool):
    cache, batch, dtype = _setup(pool, rows=3)
    history = _history(cache.device, dtype, 3)
    _step(batch, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]), dtype, cache.device, history)
    before = [
        [cache.key_view(layer)[slot, : batch.lens[r]].clone() for layer in range(LAYERS)]
        for r, slot in enumerate(batch.rows)
    ]
    pads = list(batch.pads)
    batch.select([1, 1, 0])  # row 2 dropped, row 1 copied
    assert batch.pads == [pads[1], pads[1], pads[0]] and len(set(batch.rows)) == 3
    assert cache.stats().slots_in_use == 3
    for r, parent in enumerate([1, 1, 0]):
        for layer in range(LAYERS):
            assert torch.equal(cache.key_view(layer)[batch.rows[r], : batch.lens[r]], before[parent][layer])
    with pytest.raises(InvalidRequestError, match=r"row indices must be in \[0, 3\)"):
        batch.select([0, 3, 1])
    batch.crop(-2)
    assert batch.seen == 2 and batch.lens == [2, 2, 1]
    batch.crop(0)
    assert batch.rows is None and cache.stats().slots_in_use == 0
    cache.close()
