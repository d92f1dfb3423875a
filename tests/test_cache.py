# SPDX-License-Identifier: Apache-2.0
"""The per-model KV cache over real mapped memory: layout, growth, sharing, budgets, bad input."""

import pytest
import torch

from vkv import CacheConfig, InvalidRequestError, KVCache, OutOfPagesError, PagePool

from .conftest import PAGE

LAYOUTS = ["token", "layer", "grouped"]
# 2 layers x 2 kv heads x 64 dims x fp32: 2 KiB a token (token-major) -> 1024 tokens a 2 MiB page.
SMALL = dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=4, max_seq_len=3000)


def _config(layout="token", **kw) -> CacheConfig:
    # grouped: 4 layers in 2 planes of 2 layers, so its rows are SMALL's token-major rows (2 KiB)
    group = {"num_layers": 4, "group_layers": 2} if layout == "grouped" else {}
    return CacheConfig(**{**SMALL, "layout": layout, **group, **kw})


def _snapshot(cache: KVCache):
    return cache.stats(), [cache.capacity(s) for s in range(cache.config.max_slots)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_sit_where_the_design_says(pool, layout):
    cfg = _config(layout)
    with KVCache(cfg, pool) as cache:
        slot = cache.allocate()
        cache.allocate()
        slot = cache.allocate()  # slot 2: a non-zero slot offset
        cache.grow(slot, 1500)
        raw = cache.range.tensor().view(cfg.dtype)
        L, H, D, e = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4
        for layer in range(L):
            for kv, view in enumerate((cache.key_view(layer), cache.value_view(layer))):
                assert view.shape == (cfg.max_slots, cfg.max_seq_len, H, D) and view.stride()[-1] == 1
                data = torch.randn(1500, H, D, device=view.device)
                view[slot, :1500] = data
                for t in (0, 1, 777, 1499):  # byte address from DESIGN.md's formulas, computed independently
                    if layout == "token":
                        slot_bytes = -(-cfg.max_seq_len * cfg.token_bytes // PAGE) * PAGE
                        addr = slot * slot_bytes + t * cfg.token_bytes + (2 * layer + kv) * H * D * e
                    elif layout == "grouped":  # plane layer // G; a row holds K, V of each of its G layers
                        G = cfg.group_layers
                        row = G * 2 * H * D * e
                        slot_bytes = -(-cfg.max_seq_len * row // PAGE) * PAGE
                        plane = (layer // G) * cfg.max_slots * slot_bytes
                        addr = plane + slot * slot_bytes + t * row + (2 * (layer % G) + kv) * H * D * e
                    else:
                        slot_bytes = -(-cfg.max_seq_len * H * D * e // PAGE) * PAGE
                        addr = (2 * layer + kv) * cfg.max_slots * slot_bytes + slot * slot_bytes + t * H * D * e
                    assert torch.equal(raw[addr // e : addr // e + H * D].view(H, D), data[t])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_growth_maps_only_the_missing_pages_of_that_slot(pool, layout):
    cfg = _config(layout, max_seq_len=10000)
    planes = {"token": 1, "layer": 2 * cfg.num_layers, "grouped": cfg.num_layers // 2}[layout]
    row = cfg.token_bytes // planes
    with KVCache(cfg, pool) as cache:
        a, b = cache.allocate(), cache.allocate()
        assert cache.grow(a, 1) == planes
        assert cache.grow(a, PAGE // row) == 0  # still within the first page of each plane
        assert cache.grow(a, PAGE // row + 1) == planes
        assert cache.grow(a, 10) == 0  # shrinking requests are no-ops
        assert cache.capacity(a) == min(cfg.max_seq_len, 2 * PAGE // row) and cache.capacity(b) == 0
        assert cache.stats().mapped_pages == 2 * planes
        waste = cache.stats().mapped_bytes - (PAGE // row + 1) * cfg.token_bytes
        assert waste < planes * PAGE  # under one page per plane: token-major wastes < 1 page a request


@pytest.mark.parametrize("layout", LAYOUTS)
def test_data_survives_other_slots_growth_and_frees(pool, layout):
    cfg = _config(layout)
    with KVCache(cfg, pool) as cache:
        keep = cache.allocate()
        cache.grow(keep, 1200)
        written = [
            torch.randn(1200, cfg.num_kv_heads, cfg.head_dim, device=cache.device) for _ in range(2 * cfg.num_layers)
        ]
        for layer in range(cfg.num_layers):
            cache.key_view(layer)[keep, :1200] = written[2 * layer]
            cache.value_view(layer)[keep, :1200] = written[2 * layer + 1]
        for _ in range(3):
            other = cache.allocate()
            cache.grow(other, 3000)
            cache.key_view(1)[other, :3000] = torch.randn(3000, cfg.num_kv_heads, cfg.head_dim, device=cache.device)
            cache.free(other)
        cache.grow(keep, 2900)
        for layer in range(cfg.num_layers):
            assert torch.equal(cache.key_view(layer)[keep, :1200], written[2 * layer])
            assert torch.equal(cache.value_view(layer)[keep, :1200], written[2 * layer + 1])


def test_a_page_freed_by_one_model_is_reused_by_another(backend):
    pool = PagePool(backend, budget_bytes=6 * PAGE)
    a = KVCache(_config(), pool)
    b = KVCache(_config("layer", num_layers=3, num_kv_heads=1, head_dim=128, dtype=torch.float16), pool)
    sa = a.allocate()
    a.grow(sa, 3000)  # 3 pages
    a.free(sa)  # deferred: a keeps its 3 pages mapped until the pool needs them
    assert a.stats().idle_pages == 3 and pool.stats().in_use == 3
    sb = b.allocate()
    b.grow(sb, 10)  # 6 planes, one page each: the budget is short, so a gives its 3 idle pages back
    s = pool.stats()
    assert (s.created, s.reused, s.in_use) == (6, 3, 6)
    assert a.stats().mapped_pages == 0 and a.capacity(sa) == 0
    b.free(sb)
    b.trim()  # an idle model gives everything back
    assert pool.stats().in_use == 0 and pool.stats().free == 6
    sb = b.allocate()
    b.grow(sb, 10)
    assert pool.stats().created == 6  # nothing created twice
    a.close()
    b.close()
    pool.close()


def test_budget_shared_by_two_models(backend):
    pool = PagePool(backend, budget_bytes=4 * PAGE)
    a, b = KVCache(_config(), pool), KVCache(_config(max_slots=2), pool)
    sa = a.allocate()
    a.grow(sa, 3000)  # 3 pages
    sb = b.allocate()
    before = _snapshot(b), pool.stats()
    with pytest.raises(OutOfPagesError):
        b.grow(sb, 2100)  # needs 3, 1 left
    assert (_snapshot(b), pool.stats()) == before
    a.free(sa)
    assert b.grow(sb, 2100) == 3
    a.close()
    b.close()
    pool.close()


def test_a_growth_idle_pages_cannot_cover_is_refused_without_evicting_them(backend):
    """Found by the stateful test: a refused growth used to unmap freed slots' pages first."""
    pool = PagePool(backend, budget_bytes=4 * PAGE)
    a, b = KVCache(_config(), pool), KVCache(_config(max_slots=2), pool)
    sa, keep = a.allocate(), a.allocate()
    a.grow(sa, 1000)  # 1 page
    a.grow(keep, 2000)  # 2 pages
    a.free(sa)  # 1 idle page, 1 page left in the budget
    sb = b.allocate()
    before = _snapshot(a), a.stats(), pool.stats()
    with pytest.raises(OutOfPagesError):
        b.grow(sb, 3000)  # 3 pages: free + idle make only 2
    assert (_snapshot(a), a.stats(), pool.stats()) == before and a.stats().idle_pages == 1
    assert b.grow(sb, 2000) == 2  # this one the idle page covers
    assert a.stats().idle_pages == 0
    a.close()
    b.close()
    pool.close()


def test_bad_input_is_refused_and_changes_nothing(pool):
    with KVCache(_config(), pool) as cache:
        slot = cache.allocate()
        cache.grow(slot, 10)
        cases = [
            (lambda: cache.grow(7, 10), "slot 7 is out of range"),
            (lambda: cache.grow(-1, 10), "out of range"),
            (lambda: cache.grow(slot, 3001), "expected an int in \\[0, 3000\\]"),
            (lambda: cache.grow(slot, -5), "cannot grow"),
            (lambda: cache.grow(slot, 10.5), "cannot grow"),
            (lambda: cache.grow("0", 10), "slot must be an int"),
            (lambda: cache.grow(1, 10), "slot 1 is not allocated"),
            (lambda: cache.free(3), "not allocated"),
            (lambda: cache.key_view(2), "layer 2 is out of range"),
            (lambda: cache.value_view(-1), "out of range"),
        ]
        for call, message in cases:
            before = _snapshot(cache)
            with pytest.raises(InvalidRequestError, match=message):
                call()
            assert _snapshot(cache) == before
        cache.free(slot)
        before = _snapshot(cache)
        with pytest.raises(InvalidRequestError, match="already freed"):
            cache.free(slot)
        assert _snapshot(cache) == before
        for _ in range(4):
            cache.allocate()
        with pytest.raises(InvalidRequestError, match="all 4 slots are in use"):
            cache.allocate()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dtype=torch.int8), "dtype torch.int8 is not supported"),
        (dict(layout="paged"), "layout 'paged' is not supported"),
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(max_seq_len=2.5), "max_seq_len must be a positive int"),
        (dict(layout="grouped"), r"needs group_layers, a positive divisor of num_layers = 2; got None"),
        (dict(layout="grouped", group_layers=3), r"positive divisor of num_layers = 2; got 3"),
        (dict(layout="grouped", group_layers=True), r"positive divisor of num_layers = 2; got True"),
        (dict(group_layers=2), r"group_layers = 2 is only for layout='grouped', not layout='token'"),
    ],
)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(InvalidRequestError, match=message):
        CacheConfig(**{**SMALL, **change})


def test_close_returns_every_page(pool):
    cache = KVCache(_config(), pool)
    for _ in range(3):
        cache.grow(cache.allocate(), 2500)
    assert pool.stats().in_use == 9
    cache.close()
    assert pool.stats().in_use == 0 and pool.stats().free == 9
