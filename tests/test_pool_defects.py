# SPDX-License-Identifier: Apache-2.0
"""Regression tests for the pool, range, driver and mapper defects of issue 12 (numbers as there)."""

import gc
import os
import threading
import time

import numpy as np
import pytest
import torch

from vkv import CacheConfig, KVCache
from vkv.allocator import InvalidRequestError, Ledger, LedgerBusyError, Mapper, PagePool, VirtualRange, get_driver
from vkv.allocator.host import HostDriver

from .conftest import PAGE
from .faults import Faults, FaultyDriver, FaultyLedger, Injected

CFG = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=4, max_seq_len=4096)


@pytest.fixture
def ledger(tmp_path):
    with Ledger.open(budget_bytes=16 * PAGE, page_size=PAGE, path=str(tmp_path / "ledger")) as ledger:
        yield ledger


def _alive(pool: PagePool) -> int:
    """Pages really alive: the memfd's allocated blocks."""
    driver = getattr(pool.driver, "inner", pool.driver)
    return os.fstat(driver._fd).st_blocks * 512 // pool.page_size


def _entry(ledger: Ledger, name: str):
    return next(e for e in ledger.entries() if e.name == name)


def test_1_a_driver_page_size_other_than_the_ledgers_is_refused(ledger):
    driver = HostDriver(page_size=4 * PAGE)
    with pytest.raises(InvalidRequestError, match=f"ledger counts pages of {PAGE} bytes.*{4 * PAGE} bytes"):
        PagePool(driver, 64 * PAGE, ledger=ledger, name="big")
    assert ledger.entries() == []


def test_5_shrink_keep_none_is_refused_and_pages_stay_distinct():
    pool = PagePool("host", 8 * PAGE)
    pool.release(pool.acquire(2))
    with pytest.raises(InvalidRequestError, match="keep must be an int"):
        pool.shrink(keep=None)
    s = pool.stats()
    assert (s.live, s.free, s.released, _alive(pool)) == (2, 2, 0, 2)
    a, b = pool.acquire(2)
    assert a != b  # the old shrink(None) released the pages and kept them listed: two slots on one page
    pool.release([a, b])
    pool.close()


def test_7_a_shrink_failing_part_way_changes_nothing(ledger):
    faults = Faults()
    pool = PagePool(FaultyDriver(get_driver("host"), faults), 8 * PAGE, ledger=ledger, name="a")
    pool.release(pool.acquire(4))
    faults.arm("release", 2)
    with pytest.raises(Injected):
        pool.shrink(keep=0)
    s = pool.stats()
    assert (s.live, s.free, s.released) == (4, 4, 0)
    assert _alive(pool) == 4 == _entry(ledger, "a").pages_mapped  # the old shrink left the ledger at 4, alive 3
    assert pool.shrink(keep=0) == 4
    assert _alive(pool) == 0 == _entry(ledger, "a").pages_mapped
    pool.close()


def test_8_in_use_published_while_an_acquire_grows_stays_within_the_ledgers_count(ledger):
    """The old pool published its in-use count (already raised by an acquire) before the ledger counted the
    new pages: set_in_use refused with "cannot use 1 pages: it has 0 mapped"."""
    pool = PagePool("host", 8 * PAGE, ledger=ledger, name="b", answer_interval_s=None)  # answered by hand, here
    grow, seen = ledger.grow, []

    def grow_late(entry, pages, **kwargs):
        pool.answer_release_requests()  # in the window between the pool's claim and the ledger's count
        seen.append(_entry(ledger, "b"))
        grow(entry, pages, **kwargs)

    ledger.grow = grow_late
    pages = pool.acquire(3)
    del ledger.grow
    assert seen and seen[0].pages_in_use <= seen[0].pages_mapped == 0
    pool.answer_release_requests()
    assert _entry(ledger, "b").pages_in_use == 3
    pool.release(pages)
    pool.close()


def test_8_the_mapper_keeps_its_first_errors_and_a_count_per_type():
    with Mapper() as mapper:

        def real():
            raise KeyError("the real one")

        def flood():
            raise ValueError("noise")

        mapper.submit("real", real)
        mapper.drain(5)
        for i in range(300):
            mapper.submit(i, flood)
        assert mapper.drain(10)
    assert mapper.failed == 301
    assert isinstance(mapper.errors.first[0], KeyError) and isinstance(mapper.errors[-1], ValueError)
    assert mapper.errors.counts == {"KeyError": 1, "ValueError": 300}


def test_13_acquire_of_a_float_is_refused_before_anything_changes():
    pool = PagePool("host", 8 * PAGE)
    pool.release(pool.acquire(1))
    before = pool.stats()
    with pytest.raises(InvalidRequestError, match="n must be an int, got float 1.5"):
        pool.acquire(1.5)
    assert pool.stats() == before
    pool.close()


@pytest.mark.parametrize("n", [True, np.bool_(True), "1", None, 2.0, torch.tensor(1)], ids=repr)
def test_14_acquire_refuses_what_is_not_an_int(n):
    pool = PagePool("host", 8 * PAGE)
    with pytest.raises(InvalidRequestError, match="n must be an int"):
        pool.acquire(n)
    assert pool.stats().in_use == 0
    pool.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda: get_driver("host", page_size=True),
        lambda: HostDriver(page_size=True),
        lambda: HostDriver(page_size=float(PAGE)),
        lambda: get_driver("host", device="0"),
        lambda: PagePool(driver=5),
        lambda: PagePool(driver="x"),
        lambda: PagePool("host", budget_bytes=PAGE + 1),
        lambda: PagePool("host", budget_bytes=float(4 * PAGE)),
        lambda: PagePool("host", budget_bytes=True),
        lambda: PagePool("host", 4 * PAGE, ledger="ledger"),
        lambda: PagePool("host", 4 * PAGE, name=3),
        lambda: VirtualRange(PagePool("host", 4 * PAGE), num_pages=True),
        lambda: VirtualRange("pool", num_pages=4),
    ],
)
def test_14_constructors_refuse_bad_arguments(make):
    with pytest.raises(InvalidRequestError, match="must be|unknown backend|not a multiple"):
        make()


def test_14_the_default_budget_is_whole_pages():
    pool = PagePool("host")
    assert pool.budget_bytes % PAGE == 0 and pool.budget_bytes > 0
    pool.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.map([1.5]),
        lambda r: r.map([True]),
        lambda r: r.map(["1"]),
        lambda r: r.map("12"),
        lambda r: r.map([0, 2.0]),
        lambda r: r.unmap([0.0]),
        lambda r: r.unmap(["0"]),
        lambda r: r.alias([(0, 1.5)]),
        lambda r: r.alias([(True, 2)]),
        lambda r: r.alias([(0,)]),
        lambda r: r.alias([(0, 2)], source="r"),
    ],
)
def test_14_range_indices_must_be_ints_and_nothing_changes(call):
    pool = PagePool("host", 8 * PAGE)
    r = VirtualRange(pool, 8)
    r.map([0])
    r.tensor()[:PAGE].fill_(5)
    with pytest.raises(InvalidRequestError, match="must be"):
        call(r)
    assert r.mapped() == [0] and pool.stats().in_use == 1
    assert int(r.tensor()[:PAGE].sum()) == 5 * PAGE
    r.close()
    pool.close()


@pytest.mark.parametrize("pages", [["2097152"], [2097152.0], [True], "0", [12345 * PAGE]], ids=repr)
def test_14_release_refuses_anything_but_pages_it_handed_out(pages):
    pool = PagePool("host", 8 * PAGE)
    held = pool.acquire(2)  # host pages are offsets: 0 and PAGE
    pool.release(pool.acquire(1))
    before = pool.stats()
    with pytest.raises(InvalidRequestError):
        pool.release([held[0], *pages] if isinstance(pages, list) else pages)
    assert pool.stats() == before
    pool.release(held)
    pool.close()


def test_15_a_cache_dropped_without_close_gives_its_pages_back():
    pool = PagePool("host", 32 * PAGE)
    cache = KVCache(CFG, pool)
    slot = cache.allocate()
    cache.grow(slot, 3000)
    cache.free(cache.allocate())
    assert pool.stats().in_use > 0 and pool._live_reclaimers()
    del cache, slot
    gc.collect()
    assert pool.stats().in_use == 0 and pool._live_reclaimers() == []
    assert pool.stats().live == pool.stats().free
    pool.close()
    assert _alive(pool) == 0


def test_15_a_range_dropped_without_close_unmaps_and_gives_its_pages_back():
    pool = PagePool("host", 8 * PAGE)
    r = VirtualRange(pool, 8)
    r.map([1, 2, 5])
    del r
    gc.collect()
    assert pool.stats().in_use == 0 and pool.stats().free == 3
    pool.close()


def test_18_an_idle_model_gives_pages_back_without_a_mapper_hook(ledger):
    ledger.set_budget(8 * PAGE)
    idle_pool = PagePool("host", 64 * PAGE, ledger=ledger, name="idle")
    idle = KVCache(CFG, idle_pool)
    for _ in range(2):
        slot = idle.allocate()
        idle.grow(slot, 3000)  # 3 pages each
        idle.free(slot)  # 6 idle pages under freed slots
    busy_pool = PagePool("host", 64 * PAGE, ledger=ledger, name="busy", ledger_timeout_s=2.0)
    busy = KVCache(CFG, busy_pool)
    slot = busy.allocate()
    busy.grow(slot, 4096)  # 4 pages: 2 left in the budget, the idle model's own thread gives the rest
    assert busy.capacity(slot) == 4096 and _entry(ledger, "busy").pages_mapped == 4
    deadline = time.monotonic() + 2
    while _entry(ledger, "busy").pages_in_use != 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _entry(ledger, "busy").pages_in_use == 4  # what `vkv top` shows as IN USE
    assert idle_pool.answer_errors.total == busy_pool.answer_errors.total == 0
    names = {t.name for t in threading.enumerate()}
    assert {"vkv-pool-idle", "vkv-pool-busy"} <= names
    busy.close()
    idle.close()
    busy_pool.close()
    idle_pool.close()
    names = {t.name for t in threading.enumerate()}
    assert not {"vkv-pool-idle", "vkv-pool-busy"} & names


def test_18_the_pools_thread_stops_when_the_pool_is_collected(ledger):
    pool = PagePool("host", 8 * PAGE, ledger=ledger, name="gone")
    thread = pool._thread
    del pool
    gc.collect()
    thread.join(2)
    assert not thread.is_alive()


def test_18_answering_from_a_mapper_hook_too_never_shrinks_twice(ledger):
    pool = PagePool("host", 16 * PAGE, ledger=ledger, name="a")
    pool.release(pool.acquire(8))
    deadline = time.monotonic() + 2
    while _entry(ledger, "a").pages_in_use and time.monotonic() < deadline:  # the pool's thread publishes 0
        time.sleep(0.005)
    other = ledger.register("other")
    assert ledger.ask_release(other, 3) == 3
    with Mapper(idle_interval_s=0.001) as mapper:
        mapper.add_idle(pool.answer_release_requests)
        deadline = time.monotonic() + 2
        while _entry(ledger, "a").pages_mapped > 5 and time.monotonic() < deadline:
            pool.answer_release_requests()
        time.sleep(0.05)
    assert pool.stats().live == 5 == _entry(ledger, "a").pages_mapped == _alive(pool)
    assert mapper.failed == 0, mapper.errors
    pool.close()


def test_18_the_pools_thread_keeps_errors_and_survives_a_busy_ledger(ledger):
    class Failing(Faults):
        """Every ledger call of the thread fails: busy ones first, then a real error."""

        def __init__(self):
            super().__init__()
            self.plan = [LedgerBusyError("busy")] * 5 + [OSError("broken")] * 3

        def hit(self, kind):
            return self.plan.pop(0) if kind == "lock" and self.plan else None

    faults = Failing()
    pool = PagePool("host", 8 * PAGE, ledger=FaultyLedger(ledger, faults), name="t", answer_interval_s=0.001)
    deadline = time.monotonic() + 2
    while faults.plan and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.02)
    assert pool._thread.is_alive()
    assert dict(pool.answer_errors.counts) == {"OSError": 3}  # busy ledgers are retried, not recorded
    pages = pool.acquire(2)  # the thread still answers: it publishes the pages in use
    deadline = time.monotonic() + 2
    while _entry(ledger, "t").pages_in_use != 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert _entry(ledger, "t").pages_in_use == 2
    pool.release(pages)
    pool.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.map([0]),
        lambda r: r.unmap([0]),
        lambda r: r.alias([(0, 1)]),
        lambda r: r.mapped(),
        lambda r: r.num_mapped,
        lambda r: r.page(0),
        lambda r: r.tensor(),
    ],
)
def test_c1_a_closed_range_refuses_every_method(call):
    pool = PagePool("host", 8 * PAGE)
    r = VirtualRange(pool, 4)
    r.map([0])
    r.close()
    with pytest.raises(InvalidRequestError, match="has been closed"):
        call(r)
    r.close()  # closing again is a no-op
    assert pool.stats().in_use == 0
    pool.close()
