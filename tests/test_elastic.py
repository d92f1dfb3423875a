# SPDX-License-Identifier: Apache-2.0
"""Elastic memory in one process: deferred reclamation, slot reuse, prefix sharing, the background mapper."""

import threading
import time

import pytest
import torch

from vkv import CacheConfig, InvalidRequestError, KVCache, OutOfPagesError, PagePool
from vkv.allocator.mapper import Mapper

from .conftest import PAGE

# 2 KiB a token (token-major): 1024 tokens a page.
CFG = dict(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=4, max_seq_len=4096)


def _fill(cache: KVCache, slot: int, start: int, stop: int) -> list[torch.Tensor]:
    """Write fresh random K and V of every layer for tokens [start, stop); return them."""
    cfg, out = cache.config, []
    for layer in range(cfg.num_layers):
        for view in (cache.key_view(layer), cache.value_view(layer)):
            data = torch.randn(stop - start, cfg.num_kv_heads, cfg.head_dim, device=cache.device)
            view[slot, start:stop] = data
            out.append(data)
    return out


def _read(cache: KVCache, slot: int, start: int, stop: int) -> list[torch.Tensor]:
    return [
        view[slot, start:stop].clone()
        for layer in range(cache.config.num_layers)
        for view in (cache.key_view(layer), cache.value_view(layer))
    ]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_freed_slot_keeps_its_pages_and_admission_reuses_them_without_a_driver_call(pool):
    with KVCache(CacheConfig(**CFG), pool) as cache:
        a = cache.allocate()
        cache.grow(a, 3000)  # 3 pages
        cache.free(a)
        assert cache.stats().idle_pages == 3 and cache.capacity(a) == 3072
        before = pool.stats()
        b = cache.allocate(num_tokens=2500)  # a freed slot with enough pages is preferred
        assert b == a and cache.grow(b, 2500) == 0
        assert pool.stats() == before  # nothing created, reused or mapped: no driver call on admission


def test_allocate_prefers_the_best_fitting_kept_slot(pool):
    with KVCache(CacheConfig(**CFG), pool) as cache:
        slots = [cache.allocate() for _ in range(3)]
        for slot, n in zip(slots, (4000, 1000, 2000), strict=True):
            cache.grow(slot, n)
        for slot in slots:
            cache.free(slot)
        assert cache.allocate(num_tokens=1500) == slots[2]  # 2 pages: the smallest that holds 1500
        assert cache.allocate(num_tokens=100) == slots[1]
        assert cache.allocate() == slots[0]  # no size given: the slot holding the most
        with pytest.raises(InvalidRequestError, match=r"num_tokens must be an int in \[0, 4096\], got -1"):
            cache.allocate(num_tokens=-1)


def test_trim_gives_every_idle_page_back(pool):
    with KVCache(CacheConfig(**CFG), pool) as cache:
        for n in (3000, 500):
            slot = cache.allocate()
            cache.grow(slot, n)
        keep = cache.allocate()
        cache.grow(keep, 10)
        cache.free(0)
        cache.free(1)
        assert cache.trim() == 4
        assert cache.stats().idle_pages == 0 and pool.stats().in_use == 1 and cache.capacity(keep) == 1024


@pytest.mark.parametrize("layout", ["token", "layer", "grouped"])
def test_shared_prefix_reads_right_in_both_slots_and_survives_freeing_either(pool, layout):
    group = {"group_layers": 1} if layout == "grouped" else {}
    with KVCache(CacheConfig(**CFG, layout=layout, **group), pool) as cache:
        src, dst = cache.allocate(), cache.allocate()
        cache.grow(src, 2600)
        prefix = _fill(cache, src, 0, 2600)
        created = pool.stats().created
        shared = cache.share_prefix(src, dst, 2500)  # 2 whole pages shared (per plane), the 3rd copied
        planes = cache.layout.planes
        full = 2500 * cache.layout.row_bytes // PAGE
        assert shared == full * planes
        assert pool.stats().created - created == (planes if 2500 * cache.layout.row_bytes % PAGE else 0)
        assert _same(_read(cache, dst, 0, 2500), [t[:2500] for t in prefix])
        cache.grow(dst, 3500)
        tail = _fill(cache, dst, 2500, 3500)  # dst's own tokens go to its own pages
        assert _same(_read(cache, src, 0, 2600), prefix)  # src untouched
        cache.free(src)  # shared pages stay mapped for dst
        assert _same(_read(cache, dst, 0, 2500), [t[:2500] for t in prefix])
        # the freed slot is taken by a new request that writes its own tokens: dst must not see them
        new = cache.allocate(num_tokens=2600)
        cache.grow(new, 2600)
        _fill(cache, new, 0, 2600)
        assert _same(_read(cache, dst, 0, 2500), [t[:2500] for t in prefix])
        assert _same(_read(cache, dst, 2500, 3500), tail)
        cache.free(dst)
        cache.free(new)
        cache.trim()
        assert pool.stats().in_use == 0


def test_share_prefix_refuses_bad_input_and_changes_nothing(pool):
    with KVCache(CacheConfig(**CFG), pool) as cache:
        src, dst = cache.allocate(), cache.allocate()
        cache.grow(src, 100)
        before = cache.stats(), cache.capacity(dst)
        for args, message in [
            ((src, dst, 2000), "holds 1024 mapped tokens"),
            ((src, src, 10), "different slots"),
            ((src, 3, 10), "dst 3 is not allocated"),
            ((src, dst, 0), "cannot share num_tokens = 0 tokens"),
        ]:
            with pytest.raises(InvalidRequestError, match=message):
                cache.share_prefix(*args)
            assert (cache.stats(), cache.capacity(dst)) == before


def test_ensure_maps_on_the_step_path_only_when_needed_and_fails_cleanly(backend):
    pool = PagePool(backend, budget_bytes=2 * PAGE)
    with KVCache(CacheConfig(**CFG), pool) as cache:
        slot = cache.allocate()
        assert cache.ensure(slot, 10) is True and cache.sync_grows == 1
        assert cache.ensure(slot, 1024) is False and cache.sync_grows == 1
        cache.ensure(slot, 2048)
        before = cache.stats(), cache.capacity(slot)
        with pytest.raises(OutOfPagesError):
            cache.ensure(slot, 2049)
        assert (cache.stats(), cache.capacity(slot)) == before
    pool.close()


def test_the_batch_forms_do_what_the_single_calls_do(backend):
    """ensure_many / advise_many: the same growth, counts and errors as ensure / advise slot by slot."""
    pool = PagePool(backend, budget_bytes=8 * PAGE)
    with KVCache(CacheConfig(**CFG), pool, headroom_tokens=64) as cache:  # no mapper: advise maps now
        a, b = cache.allocate(), cache.allocate()
        assert cache.ensure_many([a, b], [10, 0]) == 1 and cache.sync_grows == 1
        assert (cache.capacity(a), cache.capacity(b)) == (1024, 0)
        cache.advise_many([a, b], [1000, 5])  # a needs 1064 with headroom: a second page; b its first
        assert (cache.capacity(a), cache.capacity(b)) == (2048, 1024)
        assert cache.ensure_many([a, b], [2048, 1024]) == 0 and cache.sync_grows == 1
        before = cache.stats()
        for bad, message in (
            (([a, b], [1]), "one length"),
            (([a, 7], [1, 1]), "out of range"),
            (([a, True], [1, 1]), "must be an int"),
            (([a, b], [1, 5000]), "expected an int in"),
            (([a, b], [1, -1]), "expected an int in"),
        ):
            with pytest.raises(InvalidRequestError, match=message):
                cache.advise_many(*bad)
            with pytest.raises(InvalidRequestError, match=message):
                cache.ensure_many(*bad)
        assert cache.stats() == before
    pool.close()


def test_the_mapper_keeps_ahead_of_a_decode_loop(pool):
    """Four requests decode 1500 tokens each; the mapper, told after each step, maps ahead (64 tokens of
    headroom), so the step path almost never has to map."""
    with Mapper() as mapper, KVCache(CacheConfig(**CFG), pool, mapper=mapper, headroom_tokens=64) as cache:
        slots = [cache.allocate() for _ in range(4)]
        lengths = {s: 0 for s in slots}
        for s in slots:
            cache.advise(s, 16)  # admission: the prompt length is known
        mapper.drain(5)
        steps = 0
        for _ in range(1500):
            for s in slots:
                cache.ensure(s, lengths[s] + 1)  # the step path: check (map only if behind)
                cache.key_view(0)[s, lengths[s]] = 1.0
                lengths[s] += 1
                cache.advise(s, lengths[s] + 1)
                steps += 1
            time.sleep(0.0002)  # the step's compute, during which the mapper works
        assert mapper.failed == 0, mapper.errors
        assert cache.sync_grows <= steps // 100, f"{cache.sync_grows} of {steps} steps mapped synchronously"
        assert all(cache.capacity(s) >= 1501 for s in slots)


def test_mapper_runs_the_latest_job_per_key_and_keeps_errors():
    ran: list[str] = []
    with Mapper() as mapper:
        gate = __import__("threading").Event()
        mapper.submit("block", gate.wait)
        mapper.submit("a", lambda: ran.append("a1"))
        mapper.submit("a", lambda: ran.append("a2"))  # replaces a1, which has not started
        mapper.submit("b", lambda: 1 / 0)
        gate.set()
        assert mapper.drain(5)
        assert ran == ["a2"] and mapper.failed == 1 and isinstance(mapper.errors[-1], ZeroDivisionError)


def test_an_idle_hook_added_to_a_sleeping_mapper_runs_every_interval():
    """Without idle hooks the mapper sleeps until a job comes; adding a hook wakes it into its idle loop."""
    with Mapper(idle_interval_s=0.002) as mapper:
        time.sleep(0.02)  # asleep, no hooks
        ticks: list[float] = []
        mapper.add_idle(lambda: ticks.append(time.monotonic()))
        deadline = time.monotonic() + 5
        while len(ticks) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(ticks) >= 5


def test_a_held_mapper_starts_nothing_until_the_hold_ends():
    """The step path holds the mapper while it plans and launches: no job and no idle hook may start."""
    ran: list[str] = []
    with Mapper(idle_interval_s=0.001) as mapper:
        with mapper.hold():
            mapper.add_idle(lambda: ran.append("idle"))
            mapper.submit("a", lambda: ran.append("a"))
            with mapper.hold():  # holds nest
                pass
            assert mapper.held
            with pytest.raises(RuntimeError, match="never return"):
                mapper.drain()  # in this thread's own hold
            other = threading.Thread(target=lambda: ran.append(f"drained {mapper.drain(0.05)}"))
            other.start()
            other.join()  # another thread's drain waits for the hold to end: it times out
            time.sleep(0.02)
            assert ran == ["drained False"] and mapper.pending == 1
            ran.clear()
        assert mapper.drain(5)
        assert not mapper.held and ran[0] == "a"


def test_closing_a_held_mapper_still_runs_what_is_queued():
    ran: list[str] = []
    mapper = Mapper()
    with mapper.hold():
        mapper.submit("a", lambda: ran.append("a"))
        mapper.close(5)
    assert ran == ["a"]
    with pytest.raises(RuntimeError, match="closed"):
        mapper.submit("b", lambda: None)


@pytest.mark.parametrize("layout", ["token", "layer"])
def test_a_long_growth_is_mapped_in_jobs_of_job_pages(pool, layout):
    """advise of 10 pages with job_pages=4: the mapper maps them in jobs of at most 4 pages (of all planes),
    taking turns with other slots' jobs, and the slot ends up fully mapped."""
    cfg = CacheConfig(**{**CFG, "max_seq_len": 16 * 1024}, layout=layout)
    with Mapper() as mapper, KVCache(cfg, pool, mapper=mapper, headroom_tokens=0, job_pages=4) as cache:
        planes = cache.layout.planes
        a, b = cache.allocate(), cache.allocate()
        sizes: list[int] = []
        real_map = cache.range.map
        cache.range.map = lambda pages: sizes.append(len(pages)) or real_map(pages)
        tokens_a = cache.layout.tokens_in(10 if planes == 1 else 3)
        with mapper.hold():
            cache.advise(a, tokens_a)
            cache.advise(b, 1)
        assert mapper.drain(5) and mapper.failed == 0, mapper.errors
        assert cache.capacity(a) >= tokens_a and cache.capacity(b) >= 1
        if planes == 1:
            assert sizes == [4, 1, 4, 2]  # a's first part, then b's job, then a's remaining parts in turn
        else:  # a plane-page of every plane is the smallest part (more than 4 pages): one per job
            assert sizes == [planes, planes, planes, planes]
        assert cache.stats().mapped_pages == sum(sizes)
    with pytest.raises(InvalidRequestError, match="job_pages"):
        KVCache(cfg, pool, job_pages=0)


def test_a_smaller_later_advice_does_not_undo_a_larger_one(pool):
    """advise(925) then advise(0) before the mapper got to the first: the slot still gets 925 + headroom (the
    stateful test found the second job replacing the first)."""
    with Mapper() as mapper, KVCache(CacheConfig(**CFG), pool, mapper=mapper, headroom_tokens=100) as cache:
        slot = cache.allocate()
        with mapper.hold():
            cache.advise(slot, 925)
            cache.advise(slot, 0)
        assert mapper.drain(5) and mapper.failed == 0, mapper.errors
        assert cache.capacity(slot) >= 1025
        cache.free(slot)
        cache.trim()
        slot = cache.allocate()
        with mapper.hold():
            cache.advise(slot, 3000)  # this request's advice goes with it...
            cache.free(slot)
            again = cache.allocate()  # ...and the next request in the same slot starts from its own
            cache.advise(again, 0)
        assert again == slot and mapper.drain(5)
        assert cache.capacity(again) == 1024  # its 100 tokens of headroom: one page


def test_a_growth_the_pool_cannot_serve_in_full_maps_nothing(backend):
    """Background mapping is a wish: advice beyond what the pool can give must not take the last pages that
    another slot's step path needs."""
    pool = PagePool(backend, budget_bytes=6 * PAGE)
    with Mapper() as mapper, KVCache(CacheConfig(**CFG), pool, mapper=mapper, headroom_tokens=0, job_pages=1) as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.grow(a, 1024)  # 1 page
        cache.advise(b, 4096)  # 4 pages: fits, mapped in parts
        assert mapper.drain(5) and cache.capacity(b) == 4096
        cache.free(b)
        cache.trim()
        cache.grow(a, 3 * 1024)  # 3 pages in use, 3 left
        b = cache.allocate()
        cache.advise(b, 4096)  # 4 pages with 3 left: none of it
        assert mapper.drain(5) and mapper.failed == 0, mapper.errors
        assert cache.capacity(b) == 0
        cache.ensure(a, 4096)  # the step path still finds its page
        assert cache.capacity(a) == 4096
    pool.close()


def test_advice_that_comes_while_a_growth_runs_is_mapped_too(pool):
    """A mapper job maps one part and queues the rest; larger advice for the same slot that arrives meanwhile
    is where the growth ends."""
    with Mapper() as mapper, KVCache(CacheConfig(**CFG), pool, mapper=mapper, headroom_tokens=0, job_pages=1) as cache:
        slot = cache.allocate()
        started, release = threading.Event(), threading.Event()
        real_map = cache.range.map

        def blocking_map(pages):
            started.set()
            release.wait(5)
            return real_map(pages)

        cache.range.map = blocking_map
        cache.advise(slot, 2048)  # two pages: the first job maps one and queues the rest
        assert started.wait(5)
        cache.advise(slot, 4096)  # arrives while the first part is being mapped
        release.set()
        assert mapper.drain(5) and mapper.failed == 0, mapper.errors
        assert cache.capacity(slot) == 4096


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pages_are_unmapped_only_after_queued_gpu_work_finished():
    pool = PagePool("cuda", budget_bytes=8 * PAGE)
    with KVCache(CacheConfig(**CFG), pool) as cache:
        slot = cache.allocate()
        cache.grow(slot, 3000)
        data = _fill(cache, slot, 0, 3000)
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # keep the stream busy, then read the slot after the sleep
        copy = cache.key_view(0)[slot, :3000].clone()
        cache.free(slot)
        assert cache.trim() == 3  # must wait for the read above before unmapping
        torch.cuda.synchronize()
        assert torch.equal(copy, data[0])


def test_share_prefix_without_a_page_for_the_partial_page_changes_nothing(backend):
    pool = PagePool(backend, budget_bytes=4 * PAGE)
    with KVCache(CacheConfig(**CFG), pool) as cache:
        src, dst, other = cache.allocate(), cache.allocate(), cache.allocate()
        cache.grow(src, 3000)  # 3 pages
        cache.grow(other, 10)  # the 4th: nothing left for the copy of the partial page, and dst gives none back
        before = cache.stats(), cache.capacity(dst), cache.range.mapped()
        with pytest.raises(OutOfPagesError, match="partial last page"):
            cache.share_prefix(src, dst, 2500)
        assert (cache.stats(), cache.capacity(dst), cache.range.mapped()) == before
    pool.close()


def test_share_prefix_counts_the_pages_dst_gives_back(backend):
    """Issue 12, defect 16: dst's own page pays for the partial last page (it was refused: the fresh page
    was counted before dst's pages were released)."""
    pool = PagePool(backend, budget_bytes=4 * PAGE)
    with KVCache(CacheConfig(**CFG), pool) as cache:
        src, dst = cache.allocate(), cache.allocate()
        cache.grow(src, 3000)  # 3 pages
        cache.grow(dst, 10)  # the 4th, and the last of the budget
        data = _fill(cache, src, 0, 3000)
        assert cache.share_prefix(src, dst, 2500) == 2
        assert cache.capacity(dst) == 3072 and pool.stats().in_use == 4
        assert all(torch.equal(a, b[:2500]) for a, b in zip(_read(cache, dst, 0, 2500), data, strict=True))
    pool.close()
