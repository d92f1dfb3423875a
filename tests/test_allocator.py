# SPDX-License-Identifier: Apache-2.0
"""The driver, the page pool and virtual ranges, on the real backends."""

import os

import pytest
import torch

from vkv.allocator import DriverError, InvalidRequestError, OutOfPagesError, PagePool, VirtualRange, get_driver

from .conftest import PAGE


def test_default_page_size_is_2mib(pool):
    assert pool.page_size == PAGE


def test_a_page_keeps_its_data_across_unmap_and_remap_elsewhere(pool):
    drv = pool.driver
    base = drv.reserve(4 * PAGE)
    (page,) = pool.acquire(1)
    data = torch.randint(0, 256, (PAGE,), dtype=torch.uint8, device=drv.device)
    drv.map(base, page)
    drv.tensor(base, PAGE).copy_(data)
    drv.unmap(base)
    drv.map(base + 3 * PAGE, page)  # same physical page, another address
    assert torch.equal(drv.tensor(base + 3 * PAGE, PAGE), data)
    drv.unmap(base + 3 * PAGE)
    pool.release([page])
    drv.free_range(base, 4 * PAGE)


def test_unmapping_runs_of_pages_leaves_the_others_intact(pool):
    """Unmap takes runs of adjacent pages in one driver call each; the pages around them keep their data."""
    with VirtualRange(pool, 8) as r:
        r.map(range(8))
        words = r.tensor().view(torch.int32)
        per_page = PAGE // 4
        for i in range(8):
            words[i * per_page : (i + 1) * per_page].fill_(i + 1)
        assert r.unmap([6, 1, 2, 3, 5]) == 5  # runs [1, 4) and [5, 7)
        assert r.mapped() == [0, 4, 7]
        for i in (0, 4, 7):
            assert bool((words[i * per_page : (i + 1) * per_page] == i + 1).all())
        assert pool.stats().free == 5
        assert r.map([2]) == 1 and r.mapped() == [0, 2, 4, 7]


def test_one_page_mapped_twice_aliases(pool):
    drv = pool.driver
    base = drv.reserve(2 * PAGE)
    (page,) = pool.acquire(1)
    drv.map(base, page)
    drv.map(base + PAGE, page)
    drv.tensor(base, PAGE).fill_(0x5A)
    drv.synchronize()
    assert drv.tensor(base + PAGE, PAGE).eq(0x5A).all()
    drv.unmap(base)
    drv.unmap(base + PAGE)
    pool.release([page])
    drv.free_range(base, 2 * PAGE)


def test_driver_errors_name_the_call_and_code(pool):
    drv = pool.driver
    base = drv.reserve(PAGE)
    (page,) = pool.acquire(1)
    with pytest.raises(DriverError) as info:
        drv.free_range(base + 1, PAGE)  # not an address the driver gave: it refuses
    assert info.value.call in ("cuMemAddressFree", "munmap")
    assert info.value.code != 0 and info.value.name in str(info.value)
    with pytest.raises(InvalidRequestError, match="not a multiple of the page size"):
        drv.map(base + 4096, page)
    pool.release([page])
    drv.free_range(base, PAGE)


def test_pool_reuses_pages_instead_of_creating(pool):
    pages = pool.acquire(5)
    pool.release(pages)
    again = pool.acquire(3)
    s = pool.stats()
    assert (s.created, s.reused, s.in_use, s.free) == (5, 3, 3, 2)
    assert set(map(id, again)) <= set(map(id, pages))
    pool.release(again)


def test_pool_budget_is_enforced_and_a_refusal_changes_nothing(backend):
    pool = PagePool(backend, budget_bytes=4 * PAGE)
    held = pool.acquire(3)
    before = pool.stats()
    with pytest.raises(OutOfPagesError, match="need 2 more pages"):
        pool.acquire(2)
    assert pool.stats() == before
    pool.release(held)
    pool.close()


def test_shrink_really_releases_pages(backend):
    pool = PagePool(backend, budget_bytes=8 * PAGE)
    pool.release(pool.acquire(6))
    if backend == "host":  # the memfd really holds the bytes, then really gives them back
        fd = pool.driver._fd
        r = VirtualRange(pool, 6)
        r.map(range(6))
        r.tensor().fill_(1)
        r.close()
        held = os.fstat(fd).st_blocks
        assert held * 512 >= 6 * PAGE
    assert pool.shrink(keep=2) == 4
    s = pool.stats()
    assert (s.live, s.free, s.released) == (2, 2, 4)
    if backend == "host":
        assert os.fstat(fd).st_blocks * 512 <= 2 * PAGE
    pool.close()
    assert pool.stats().live == 0


def test_lowering_the_budget_below_use_is_refused(backend):
    pool = PagePool(backend, budget_bytes=8 * PAGE)
    held = pool.acquire(4)
    with pytest.raises(OutOfPagesError, match="4 pages are in use"):
        pool.set_budget(2 * PAGE)
    assert pool.budget_bytes == 8 * PAGE
    pool.release(held)
    pool.set_budget(2 * PAGE)  # free pages over the new budget are released
    assert pool.stats().live == 2
    pool.close()


def test_range_maps_lazily_and_all_or_nothing(backend):
    pool = PagePool(backend, budget_bytes=3 * PAGE)
    r = VirtualRange(pool, num_pages=16)
    assert r.map([2, 3]) == 2 and r.map([3]) == 0
    with pytest.raises(OutOfPagesError):
        r.map([5, 6, 7])  # only one more page fits the budget
    assert r.mapped() == [2, 3] and pool.stats().in_use == 2
    with pytest.raises(InvalidRequestError, match=r"indices\[1\] must be an int in \[0, 15\], got 16"):
        r.map([15, 16])
    assert r.mapped() == [2, 3]
    t = r.tensor()
    t[2 * PAGE : 4 * PAGE].fill_(9)
    assert t[2 * PAGE : 4 * PAGE].sum().item() == 9 * 2 * PAGE
    assert r.unmap([0, 2]) == 1 and r.mapped() == [3]
    r.close()
    assert pool.stats().in_use == 0
    with pytest.raises(InvalidRequestError, match="closed"):
        r.map([0])
    pool.close()


class _FailingMap:
    """A real driver whose n-th map call fails: exercises the rollback path (fault injection)."""

    def __init__(self, driver, fail_at: int):
        self._driver, self._left = driver, fail_at

    def __getattr__(self, name):
        return getattr(self._driver, name)

    def map(self, addr, handle):
        self._left -= 1
        if self._left == 0:
            raise DriverError("cuMemMap", 2, "CUDA_ERROR_OUT_OF_MEMORY", "injected")
        self._driver.map(addr, handle)


def test_a_driver_failure_mid_map_rolls_back(pool):
    r = VirtualRange(pool, num_pages=8)
    real = r.driver
    r.driver = _FailingMap(real, fail_at=3)
    with pytest.raises(DriverError, match="injected"):
        r.map(range(5))
    r.driver = real
    assert r.mapped() == [] and pool.stats().in_use == 0
    assert r.map(range(5)) == 5  # the addresses were really unmapped: mapping again works
    r.close()


def test_unknown_backend_is_refused():
    with pytest.raises(InvalidRequestError, match="unknown backend 'tpu'"):
        get_driver("tpu")


def test_host_page_size_must_be_a_multiple_of_the_os_page():
    with pytest.raises(InvalidRequestError, match="multiple of"):
        get_driver("host", page_size=1000)
