# SPDX-License-Identifier: Apache-2.0
"""Pools of two models share one device budget through the ledger; an idle model's mapper thread gives
pages back when the other asks."""

import pytest
import torch

from vkv import CacheConfig, KVCache, OutOfPagesError, PagePool
from vkv.allocator import Ledger, Mapper

from .conftest import PAGE


@pytest.fixture
def ledger(tmp_path):
    with Ledger.open(budget_bytes=8 * PAGE, page_size=PAGE, path=str(tmp_path / "ledger")) as ledger:
        yield ledger


def _mapped(ledger: Ledger) -> dict[str, int]:
    return {e.name: e.pages_mapped for e in ledger.entries()}


def test_pages_are_counted_before_creation_and_uncounted_after_release(ledger):
    pool = PagePool("host", 64 * PAGE, ledger=ledger, name="a")
    pages = pool.acquire(5)
    assert _mapped(ledger) == {"a": 5}
    pool.release(pages)
    assert _mapped(ledger) == {"a": 5}  # free pages still exist
    pool.shrink(keep=2)
    assert _mapped(ledger) == {"a": 2}
    pool.close()
    assert _mapped(ledger) == {}  # nothing alive: the pool left the ledger


def test_released_pages_are_counted_out_only_after_the_device_has_caught_up(ledger):
    """A driver may free unmapped, released pages only once the work queued before has run: the pool waits for the
    device (driver.synchronize) after releasing and before the ledger counts the pages out, so no other process
    maps new pages while these still hold memory."""
    from vkv.allocator.host import HostDriver

    seen = []

    class Watched(HostDriver):  # the real host driver; its synchronize notes what the ledger counted then
        def synchronize(self) -> None:
            seen.append((self.released, _mapped(ledger)))
            super().synchronize()

        def release_page(self, handle) -> None:
            super().release_page(handle)
            self.released += 1

    driver = Watched(page_size=PAGE)
    driver.released = 0
    pool = PagePool(driver, 64 * PAGE, ledger=ledger, name="a")
    pool.release(pool.acquire(5))
    pool.shrink(keep=1)
    assert seen == [(4, {"a": 5})] and _mapped(ledger) == {"a": 1}  # released, synchronized, then counted out
    pool.close()


def test_a_release_waits_for_the_device_while_another_thread_waits_too_but_not_during_a_capture(ledger):
    """Two threads releasing at once both wait (a lock taken without blocking made the second skip its wait, and
    bench/stress.py saw its pages counted out 30-60 ms before the GPU freed them); during a CUDA graph capture
    (CAPTURE_GATE.capture, vkv.engine's) the wait is skipped, and a capture waits for the waits under way."""
    import threading

    from vkv.allocator.driver import CAPTURE_GATE
    from vkv.allocator.host import HostDriver

    first_in, go_on, calls = threading.Event(), threading.Event(), []

    class Slow(HostDriver):  # the first synchronize blocks until told to go on
        def synchronize(self) -> None:
            calls.append(threading.current_thread().name)
            if len(calls) == 1:
                first_in.set()
                assert go_on.wait(10)

    pool = PagePool(Slow(page_size=PAGE), 64 * PAGE, ledger=ledger, name="a")
    pool.release(pool.acquire(6))
    waiter = threading.Thread(target=pool.shrink, kwargs={"keep": 3}, name="first")
    waiter.start()
    assert first_in.wait(10)
    pool.shrink(keep=1)  # this thread's release, while "first" waits on the device
    assert calls == ["first", threading.current_thread().name] and _mapped(ledger) == {"a": 4}
    entered = threading.Event()

    def capture() -> None:
        with CAPTURE_GATE.capture():
            entered.set()

    capturer = threading.Thread(target=capture)
    capturer.start()
    assert not entered.wait(0.3)  # a capture waits for the sync under way
    go_on.set()
    waiter.join(10)
    capturer.join(10)
    assert entered.is_set() and _mapped(ledger) == {"a": 1}
    with CAPTURE_GATE.capture():
        pool.release(pool.acquire(2))
        pool.shrink(keep=0)  # no device sync during a capture
    assert len(calls) == 2 and _mapped(ledger) == {"a": 0}
    pool.close()


def test_a_refused_growth_changes_nothing(ledger):
    a = PagePool("host", 64 * PAGE, ledger=ledger, name="a", ledger_timeout_s=0.2)
    b = PagePool("host", 64 * PAGE, ledger=ledger, name="b", ledger_timeout_s=0.2)
    held = a.acquire(6)
    before = b.stats()
    with pytest.raises(OutOfPagesError):
        b.acquire(4)  # a holds 6 of 8 and nobody answers for it
    assert b.stats() == before and _mapped(ledger) == {"a": 6, "b": 0}
    a.release(held)
    a.close()
    b.close()


def test_an_idle_model_gives_pages_back_from_its_mapper_thread(ledger):
    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=4, max_seq_len=4096)
    with Mapper(idle_interval_s=0.002) as mapper:
        idle_pool = PagePool("host", 64 * PAGE, ledger=ledger, name="idle")
        mapper.add_idle(idle_pool.answer_release_requests)
        idle = KVCache(cfg, idle_pool)
        for _ in range(2):
            slot = idle.allocate()
            idle.grow(slot, 3000)  # 3 pages each
            idle.free(slot)  # kept (deferred): 6 idle pages under freed slots
        busy_pool = PagePool("host", 64 * PAGE, ledger=ledger, name="busy", ledger_timeout_s=2.0)
        busy = KVCache(cfg, busy_pool)
        slot = busy.allocate()
        busy.grow(slot, 4096)  # 4 pages: the budget has 2 left, the idle model gives back the rest
        assert busy.capacity(slot) == 4096
        mapped = _mapped(ledger)
        assert mapped["busy"] == 4 and sum(mapped.values()) <= 8
        assert mapper.failed == 0, mapper.errors
        busy.close()
        idle.close()
        busy_pool.close()
        idle_pool.close()


def test_share_prefix_refused_by_the_device_budget_changes_nothing(ledger):
    """The pool's own budget allows the fresh page for the partial last page, the device budget (ledger)
    does not and nobody gives pages back: the sharing fails and both slots are as they were."""
    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=4, max_seq_len=4096)
    other = PagePool("host", 64 * PAGE, ledger=ledger, name="other")
    held = other.acquire(6)  # in use: nothing to give back
    pool = PagePool("host", 64 * PAGE, ledger=ledger, name="a", ledger_timeout_s=0.1)
    with KVCache(cfg, pool) as cache:
        src, dst = cache.allocate(), cache.allocate()
        cache.grow(src, 2048)  # the last 2 pages of the device budget
        cache.key_view(0)[src, :2048] = 3.0
        before = cache.stats(), cache.capacity(src), cache.capacity(dst), _mapped(ledger)
        with pytest.raises(OutOfPagesError):
            cache.share_prefix(src, dst, 1500)  # page 0 shared, page 1 needs a fresh page: none left
        assert (cache.stats(), cache.capacity(src), cache.capacity(dst), _mapped(ledger)) == before
        assert bool((cache.key_view(0)[src, :2048] == 3.0).all())
    other.release(held)
    other.close()
    pool.close()
