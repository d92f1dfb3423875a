# SPDX-License-Identifier: Apache-2.0
"""Regression tests of issue 12's cache defects (2, 9, 10, 14, 15); 16 is in test_elastic.py."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from vkv import CacheConfig, KVCache
from vkv.allocator import InvalidRequestError, Mapper, OutOfPagesError, PagePool, VkvError
from vkv.allocator.driver import get_driver

from .conftest import PAGE
from .faults import Faults, FaultyDriver

# layer-major: a slot's pages lie in 4 planes, so unmapping one slot takes 4 driver calls
LAYER = dict(
    num_layers=2, num_kv_heads=4, head_dim=128, dtype=torch.float32, max_slots=4, max_seq_len=2048, layout="layer"
)


def _believed(cache: KVCache) -> set[int]:
    layout = cache.layout
    return {
        page
        for slot in range(cache.config.max_slots)
        for page in layout.slot_pages(slot, layout.pages_per_plane(cache.capacity(slot)))
    }


def _faulty(backend: str, layout: str = "layer", budget_pages: int = 64) -> tuple[KVCache, Faults]:
    faults = Faults()
    pool = PagePool(FaultyDriver(get_driver(backend), faults), budget_pages * PAGE)
    return KVCache(CacheConfig(**{**LAYER, "layout": layout}), pool), faults


def _idle(cache: KVCache) -> None:
    slot = cache.allocate()
    cache.grow(slot, 1500)  # 2 pages in each of 4 planes
    cache.free(slot)


def _share(cache: KVCache) -> None:
    src, dst = cache.allocate(), cache.allocate()
    cache.grow(src, 2000)
    cache.share_prefix(src, dst, 1500)


def _two(cache: KVCache) -> None:
    cache.grow(cache.allocate(), 1500)
    cache.grow(cache.allocate(), 1000)


SECOND_UNMAPS = {  # (setup, an operation whose second unmap call fails)
    "trim": (_idle, lambda c: c.trim()),
    "close": (_two, lambda c: c.close()),
    "free": (_share, lambda c: c.free(1)),
    "share_prefix": (_two, lambda c: c.share_prefix(0, 1, 1200)),
}


@pytest.mark.parametrize("name", list(SECOND_UNMAPS))
def test_a_failed_unmap_leaves_no_page_believed_mapped_that_is_not(backend, name):
    """Defect 2: the second unmap of an operation failing left the cache believing the first's pages mapped
    (reading them segfaulted)."""
    cache, faults = _faulty(backend)
    setup, op = SECOND_UNMAPS[name]
    setup(cache)
    faults.arm("unmap", 2)
    with pytest.raises(VkvError):
        op(cache)
    assert faults.fired == ["unmap"]
    assert _believed(cache) <= set(cache.range.mapped())  # reading what capacity() promises cannot fault
    cache.close()


def test_a_batch_with_a_bad_element_changes_nothing(backend):
    """Defect 9: ensure_many / advise_many grew the slots before the bad one, then raised."""
    pool = PagePool(backend, 16 * PAGE)
    with KVCache(CacheConfig(**LAYER), pool) as cache:
        a = cache.allocate()
        for batch in (([a, 7], [10, 1]), ([a, a], [10, 5000]), ([a, True], [10, 1]), ([a, a], [10, 1.5])):
            for call in (cache.ensure_many, cache.advise_many):
                with pytest.raises(InvalidRequestError):
                    call(*batch)
                assert cache.capacity(a) == 0 and pool.stats().in_use == 0 and cache.sync_grows == 0


def test_a_batch_growth_that_fails_part_way_is_undone(backend):
    """Defect 9: the slots a batch grew before one the pool could not serve kept their pages."""
    pool = PagePool(backend, 6 * PAGE)  # a slot's first pages take 4 (a page in each plane)
    with KVCache(CacheConfig(**LAYER), pool) as cache:
        a, b = cache.allocate(), cache.allocate()
        with pytest.raises(OutOfPagesError):
            cache.ensure_many([a, b], [10, 10])
        assert (cache.capacity(a), cache.capacity(b), cache.sync_grows, pool.stats().in_use) == (0, 0, 0, 0)
        assert cache.ensure_many([a], [10]) == 1 and cache.capacity(a) == 1024


def test_every_method_refuses_a_closed_cache(backend):
    """Defect 10: views and allocate still worked after close() (the view then segfaulted)."""
    cache = KVCache(CacheConfig(**LAYER), backend=backend, budget_bytes=16 * PAGE)
    slot = cache.allocate()
    cache.grow(slot, 10)
    cache.close()
    cache.close()  # twice is fine
    calls = [
        lambda: cache.key_view(0),
        lambda: cache.value_view(0),
        lambda: cache.allocate(),
        lambda: cache.can_allocate(),
        lambda: cache.grow(slot, 20),
        lambda: cache.ensure(slot, 20),
        lambda: cache.ensure_many([slot], [20]),
        lambda: cache.advise(slot, 20),
        lambda: cache.advise_many([slot], [20]),
        lambda: cache.share_prefix(slot, 1, 5),
        lambda: cache.free(slot),
        lambda: cache.trim(),
        lambda: cache.capacity(slot),
        lambda: cache.is_allocated(slot),
        lambda: cache.stats(),
    ]
    for call in calls:
        with pytest.raises(InvalidRequestError, match="this cache has been closed"):
            call()
    assert cache.release_idle() == 0 and cache.idle_pages() == 0  # the pool's callbacks give nothing
    assert cache.pool.stats().in_use == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mapper="x"), "mapper must be a Mapper"),
        (dict(pool="x"), "pool must be a PagePool"),
        (dict(headroom_tokens=True), "headroom_tokens must be an int"),
        (dict(headroom_tokens=-1), "headroom_tokens must be an int in"),
        (dict(job_pages=True), "job_pages must be an int"),
        (dict(job_pages=2.0), "job_pages must be an int"),
    ],
)
def test_bad_cache_arguments_are_refused(kwargs, message):
    """Defect 14: KVCache(mapper="x") and friends were accepted (and failed later, or never)."""
    with pytest.raises(InvalidRequestError, match=message):
        KVCache(CacheConfig(**LAYER), **{"backend": "host", "budget_bytes": 16 * PAGE, **kwargs})


def test_a_config_must_be_a_cache_config():
    with pytest.raises(InvalidRequestError, match="config must be a CacheConfig"):
        KVCache(dict(LAYER), backend="host", budget_bytes=16 * PAGE)


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "max_slots", "max_seq_len"])
@pytest.mark.parametrize("value", [True, 2.0, "2", None, 1 << 40, np.bool_(True), torch.tensor(2)])
def test_config_counts_must_be_ints_of_a_sane_size(field, value):
    """Defect 14: bools (True is 1) and floats were taken as counts; huge ones failed deep inside."""
    with pytest.raises(InvalidRequestError, match=f"{field} must be a positive int"):
        CacheConfig(**{**LAYER, field: value})


def test_a_config_too_large_for_the_address_space_is_refused():
    with pytest.raises(InvalidRequestError, match="would reserve"):
        KVCache(CacheConfig(**{**LAYER, "max_slots": 1 << 31, "max_seq_len": 1 << 31}), backend="host")


def test_numpy_ints_count_and_bools_do_not(backend):
    with KVCache(CacheConfig(**{**LAYER, "max_slots": np.int64(4)}), backend=backend, budget_bytes=16 * PAGE) as cache:
        assert type(cache.config.max_slots) is int
        slot = cache.allocate(np.int64(10))
        assert cache.grow(np.int64(slot), np.int32(10)) == 4 and cache.capacity(np.int64(slot)) == 1024
        assert cache.ensure_many([np.int64(slot)], [np.int64(2000)]) == 1
        for call, message in [
            (lambda: cache.allocate(num_tokens=10**9), r"num_tokens must be an int in \[0, 2048\]"),
            (lambda: cache.allocate(num_tokens=True), "num_tokens must be an int"),
            (lambda: cache.grow(True, 10), "slot must be an int"),
            (lambda: cache.grow(slot, True), "expected an int in"),
            (lambda: cache.capacity(np.bool_(False)), "slot must be an int"),
            (lambda: cache.key_view(True), "layer True is out of range"),
            (lambda: cache.ensure_many(3, [1]), "must be sequences of ints"),
            (lambda: cache.release_idle(max_pages=1.5), "max_pages must be an int"),
        ]:
            before = cache.stats()
            with pytest.raises(InvalidRequestError, match=message):
                call()
            assert cache.stats() == before


def test_a_cache_dropped_without_close_gives_its_pages_back(backend):
    """Defect 15 (the cache's part): nothing keeps a dropped cache alive, so its range gives the pages back.
    Needs the pool's weak reclaimers and self-finalising ranges (the pool's part)."""
    pool = PagePool(backend, 32 * PAGE)
    mapper = Mapper()
    try:
        cache = KVCache(CacheConfig(**LAYER), pool, mapper=mapper)
        slot = cache.allocate()
        cache.grow(slot, 100)
        with mapper.hold():
            cache.advise(slot, 1500)  # a job waits in the mapper's queue
            dropped = weakref.ref(cache)
            del cache
            gc.collect()
            assert dropped() is None, [type(r).__name__ for r in gc.get_referrers(dropped())]
        assert mapper.drain(5) and mapper.failed == 0, mapper.errors
        assert pool.stats().in_use == 0
    finally:
        mapper.close()
        pool.close()


def test_the_grown_slots_are_the_pages_the_range_maps(backend):
    """The cache's one record per slot agrees with the range after a mixed run (no failure)."""
    cache, _ = _faulty(backend, layout="token")
    slots = [cache.allocate() for _ in range(3)]
    for slot, n in zip(slots, (100, 900, 1500), strict=True):
        cache.grow(slot, n)
    cache.share_prefix(slots[2], slots[0], 700)
    cache.free(slots[1])
    assert _believed(cache) == set(cache.range.mapped())
    cache.trim()
    assert _believed(cache) == set(cache.range.mapped())
    cache.close()
