# SPDX-License-Identifier: Apache-2.0
"""Pools of two models share one device budget through the ledger; an idle model's mapper thread gives
pages back when the other asks."""

import threading
import time

import pytest
import torch

from vkv import CacheConfig, KVCache, OutOfPagesError, PagePool
from vkv.allocator import Ledger, Mapper
from vkv.allocator import pool as pool_module

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


def test_a_refused_growth_changes_nothing(ledger):
    a = PagePool("host", 64 * PAGE, ledger=ledger, name="a", ledger_timeout_s=0.2)
    b = PagePool("host", 64 * PAGE, ledger=ledger, name="b", ledger_timeout_s=0.2)
    held = a.acquire(6)
    before = b.stats()
    with pytest.raises(OutOfPagesError):
        b.acquire(4)  # a holds 6 of 8 and nobody answers for it
    after = b.stats()
    # b may have created the 2 free pages while it waited for the rest: they went back to the driver
    assert after.created == after.released
    assert (after.live, after.in_use, after.free) == (before.live, before.in_use, before.free)
    assert _mapped(ledger) == {"a": 6, "b": 0}
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


def test_a_large_grow_maps_in_parts_while_the_idle_model_gives_pages_back(ledger, monkeypatch):
    """The busy model creates pages part by part as the idle one hands them back a part at a time,
    instead of waiting for all of them."""
    monkeypatch.setattr(pool_module, "RELEASE_PART", 2)
    parts: list[int] = []
    grow = ledger.grow

    def spy(entry, pages, **kwargs):
        on_part = kwargs["on_part"]
        kwargs["on_part"] = lambda n: (parts.append(n), on_part(n))
        return grow(entry, pages, **kwargs)

    with Mapper(idle_interval_s=0.002) as mapper:
        idle = PagePool("host", 64 * PAGE, ledger=ledger, name="idle")
        idle.release(idle.acquire(8))  # 8 free pages: the whole budget
        release_page = idle.driver.release_page  # slowed down like a GPU's (~20 us), so parts can be seen
        monkeypatch.setattr(idle.driver, "release_page", lambda page: (time.sleep(0.02), release_page(page)))
        mapper.add_idle(idle.answer_release_requests)
        busy = PagePool("host", 64 * PAGE, ledger=ledger, name="busy", ledger_timeout_s=5.0)
        monkeypatch.setattr(ledger, "grow", spy)
        pages = busy.acquire(7)
        assert len(pages) == 7 and sum(parts) == 7 and len(parts) > 1, parts
        assert _mapped(ledger) == {"idle": 1, "busy": 7}
        assert mapper.failed == 0, mapper.errors
        busy.release(pages)
        busy.close()
        idle.close()


def test_a_grow_in_parts_that_fails_withdraws_what_it_asked_for(ledger):
    """If the caller fails on a part (say the driver refuses a page), its requests to other models are
    taken back; the parts it was given stay counted for it to undo."""
    a, b = ledger.register("a"), ledger.register("b")
    ledger.grow(a, 8)
    ledger.set_in_use(a, 0)  # all of a's pages idle: b's grow asks a for them
    threading.Timer(0.05, ledger.shrink, (a, 2)).start()  # a gives 2 back, as its mapper thread would

    def refuse(n: int) -> None:
        raise RuntimeError(f"could not create {n} pages")

    with pytest.raises(RuntimeError, match="could not create 2 pages"):
        ledger.grow(b, 4, on_part=refuse, timeout_s=2.0)
    assert ledger.asked(a) == 0
    assert _mapped(ledger) == {"a": 6, "b": 2}
