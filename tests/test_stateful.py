# SPDX-License-Identifier: Apache-2.0
"""Random allocate / grow / write / share / free / trim sequences over two caches sharing one pool.

After every step: every readable token holds what was last written there (checked against a shadow
copy), and the page accounting adds up (pool, ranges, slots, shared pages counted once). Freed slots
keep their pages until the pool is short (deferred reclamation), so growth often reclaims them.
"""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vkv import CacheConfig, KVCache, OutOfPagesError, PagePool
from vkv.allocator import Mapper

from .conftest import BACKENDS, PAGE

CONFIGS = [  # three models of different geometry and layout; 1024, 2048 and 2048 tokens a page in their planes
    CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=3, max_seq_len=2500),
    CacheConfig(
        num_layers=2, num_kv_heads=1, head_dim=128, dtype=torch.float16, max_slots=3, max_seq_len=4500, layout="layer"
    ),
    # 2 planes of 2 layers: a layer's K and V sit inside the row, not at its start
    CacheConfig(4, 1, 64, torch.float32, max_slots=3, max_seq_len=3000, layout="grouped", group_layers=2),
]
MODELS = range(len(CONFIGS))


def make_machine(backend: str):
    class CacheMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.pool = PagePool(backend, budget_bytes=10 * PAGE)
            self.caches = [KVCache(cfg, self.pool) for cfg in CONFIGS]
            self.shadow: list[dict[int, torch.Tensor]] = [{} for _ in MODELS]  # slot -> [capacity, L, 2, H, D]
            self.frozen: list[dict[int, int]] = [{} for _ in MODELS]  # slot -> tokens shared with another slot
            self.max_created = 0

        def _slots(self):
            return [(m, s) for m in MODELS for s in self.shadow[m]]

        def _read(self, m: int, slot: int, n: int) -> torch.Tensor:
            c = self.caches[m]
            kv = [
                view[slot, :n]
                for layer in range(c.config.num_layers)
                for view in (c.key_view(layer), c.value_view(layer))
            ]
            return (
                torch.stack(kv, dim=1).view(n, c.config.num_layers, 2, c.config.num_kv_heads, c.config.head_dim).cpu()
            )

        def _write(self, m: int, slot: int, start: int, stop: int) -> None:
            c, cfg = self.caches[m], self.caches[m].config
            data = torch.randn(stop - start, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim).to(cfg.dtype)
            for layer in range(cfg.num_layers):
                c.key_view(layer)[slot, start:stop] = data[:, layer, 0].to(c.device)
                c.value_view(layer)[slot, start:stop] = data[:, layer, 1].to(c.device)
            old = self.shadow[m][slot]
            if stop > old.shape[0]:
                old = torch.cat([old, torch.empty(stop - old.shape[0], *old.shape[1:], dtype=old.dtype)])
            old[start:stop] = data
            self.shadow[m][slot] = old

        @rule(m=st.sampled_from(MODELS))
        def allocate(self, m):
            c = self.caches[m]
            if c.can_allocate():
                slot = c.allocate()
                assert slot not in self.shadow[m]
                cfg = c.config
                self.shadow[m][slot] = torch.empty(
                    0, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, dtype=cfg.dtype
                )
                self.frozen[m][slot] = 0
                if c.capacity(slot):  # a reused slot: its kept pages hold stale data; give it fresh data
                    self._write(m, slot, 0, c.capacity(slot))

        @precondition(lambda self: self._slots())
        @rule(data=st.data(), tokens=st.integers(0, 4500))
        def grow(self, data, tokens):
            m, slot = data.draw(st.sampled_from(self._slots()))
            c = self.caches[m]
            tokens = min(tokens, c.config.max_seq_len)
            before = c.capacity(slot), c.stats()
            try:
                c.grow(slot, tokens)
            except OutOfPagesError:
                assert (c.capacity(slot), c.stats()) == before
                return
            cap = c.capacity(slot)
            assert cap >= tokens
            if cap > before[0]:  # fill the newly readable tokens so every readable token is known
                self._write(m, slot, before[0], cap)

        @precondition(lambda self: self._slots())
        @rule(data=st.data())
        def overwrite(self, data):
            m, slot = data.draw(st.sampled_from(self._slots()))
            cap, low = self.caches[m].capacity(slot), self.frozen[m][slot]
            if cap > low:  # tokens below `low` are a shared prefix: the contract says nobody writes them
                start = data.draw(st.integers(low, cap - 1))
                self._write(m, slot, start, data.draw(st.integers(start + 1, cap)))

        @precondition(lambda self: any(len(self.shadow[m]) >= 2 for m in MODELS))
        @rule(data=st.data())
        def share_prefix(self, data):
            m = data.draw(st.sampled_from([m for m in MODELS if len(self.shadow[m]) >= 2]))
            src, dst = data.draw(st.permutations(sorted(self.shadow[m])))[:2]
            c = self.caches[m]
            if not c.capacity(src):
                return
            n = data.draw(st.integers(1, c.capacity(src)))
            try:
                c.share_prefix(src, dst, n)
            except OutOfPagesError:
                return
            self.shadow[m][dst] = self.shadow[m][src][:n].clone()
            self.frozen[m][dst] = n
            self.frozen[m][src] = max(self.frozen[m][src], n)
            if c.capacity(dst) > n:  # the rest of the copied partial page is unspecified: write it
                self._write(m, dst, n, c.capacity(dst))

        @precondition(lambda self: self._slots())
        @rule(data=st.data())
        def free(self, data):
            m, slot = data.draw(st.sampled_from(self._slots()))
            self.caches[m].free(slot)
            del self.shadow[m][slot]
            del self.frozen[m][slot]

        @rule(m=st.sampled_from(MODELS))
        def trim(self, m):
            self.caches[m].trim()
            assert self.caches[m].stats().idle_pages == 0

        @rule(keep=st.integers(0, 4))
        def shrink(self, keep):
            self.pool.shrink(keep)

        @invariant()
        def data_intact(self):
            for m, slot in self._slots():
                cap = self.caches[m].capacity(slot)
                assert self.shadow[m][slot].shape[0] == cap
                if cap:
                    assert torch.equal(self._read(m, slot, cap), self.shadow[m][slot])

        @invariant()
        def step_check_agrees_with_capacity(self):
            """KVCache.uncovered (the step path's cheap check) clears exactly the mapped tokens of allocated slots."""
            for c in self.caches:
                for slot in range(c.config.max_slots):
                    if not c.is_allocated(slot):
                        assert c.uncovered([slot], [0]) == [(slot, 0)]
                        continue
                    cap = c.capacity(slot)
                    assert c.uncovered([slot], [cap]) == []
                    if cap < c.config.max_seq_len:
                        assert c.uncovered([slot], [cap + 1]) == [(slot, cap + 1)]

        @invariant()
        def pages_add_up(self):
            s = self.pool.stats()
            physical = set()
            for c in self.caches:
                lay = c.layout
                expect = sorted(
                    p
                    for slot in range(c.config.max_slots)
                    for p in lay.slot_pages(slot, lay.pages_per_plane(c.capacity(slot)))
                )
                assert c.range.mapped() == expect
                physical |= {int(c.range.page(i)) for i in expect}
            assert s.in_use == len(physical)  # a page mapped in two slots is one page
            assert s.live == s.in_use + s.free == s.created - s.released
            assert s.live <= s.budget_pages
            # a page is created only when no free one could serve: creations never exceed the peak live
            self.max_created = max(self.max_created, s.live)
            assert s.created - s.released <= self.max_created

        def teardown(self):
            for c in self.caches:
                c.close()
            assert self.pool.stats().in_use == 0
            self.pool.close()

    return CacheMachine


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sequences_keep_data_and_accounting(backend):
    machine = make_machine(backend)
    machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
    machine.TestCase().runTest()


class MapperMachine(RuleBasedStateMachine):
    """Random admission / advise / held advise / ensure / free over one cache with a background mapper that maps
    long growths in jobs of two pages. After each drain: every allocated slot holds at least what was advised for
    it (plus headroom), the data written through ensure() is intact, and the mapped pages are exactly each slot's
    capacity."""

    CFG = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=4, max_seq_len=8192)
    HEADROOM = 100
    BUDGET_PAGES = 64  # room for every slot in full (32 pages): nothing is refused

    def __init__(self):
        super().__init__()
        self.pool = PagePool("host", budget_bytes=self.BUDGET_PAGES * PAGE)
        self.mapper = Mapper()
        self.cache = KVCache(self.CFG, self.pool, mapper=self.mapper, headroom_tokens=self.HEADROOM, job_pages=2)
        self.advised: dict[int, int] = {}  # allocated slot -> the most tokens advised since its allocation
        self.written: dict[int, torch.Tensor] = {}  # slot -> keys of layer 0 written over [0, n)

    @rule()
    def allocate(self):
        if self.cache.can_allocate():
            slot = self.cache.allocate()
            self.advised[slot], self.written[slot] = 0, torch.empty(0, 2, 64)

    @precondition(lambda self: self.advised)
    @rule(data=st.data(), tokens=st.integers(0, 8192), held=st.booleans())
    def advise(self, data, tokens, held):
        slot = data.draw(st.sampled_from(sorted(self.advised)))
        if held:
            with self.mapper.hold():
                self.cache.advise(slot, tokens)
        else:
            self.cache.advise(slot, tokens)
        self.advised[slot] = max(self.advised[slot], tokens)

    @precondition(lambda self: self.advised)
    @rule(data=st.data(), tokens=st.integers(1, 3000))
    def ensure_and_write(self, data, tokens):
        """The step path: make [0, tokens) readable (mapping now if the mapper is behind), then write it."""
        slot = data.draw(st.sampled_from(sorted(self.advised)))
        with self.mapper.hold():
            before = self.cache.capacity(slot)
            try:
                self.cache.ensure(slot, tokens)
            except OutOfPagesError:  # only with a short budget; nothing may have changed
                assert self.BUDGET_PAGES < 32 and self.cache.capacity(slot) == before
                return
            assert self.cache.capacity(slot) >= tokens
            keys = torch.randn(tokens, 2, 64)
            self.cache.key_view(0)[slot, :tokens] = keys
        old = self.written[slot]
        self.written[slot] = torch.cat([keys, old[tokens:]]) if old.shape[0] > tokens else keys

    @precondition(lambda self: self.advised)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.advised)))
        self.cache.free(slot)
        del self.advised[slot], self.written[slot]

    @rule()
    def drain_and_check(self):
        assert self.mapper.drain(10)
        assert self.mapper.failed == 0, self.mapper.errors
        c = self.cache
        for slot, tokens in self.advised.items():
            if tokens and self.BUDGET_PAGES >= 32:  # advised a length since its allocation, and the pool has room
                assert c.capacity(slot) >= min(tokens + self.HEADROOM, self.CFG.max_seq_len)
            n = self.written[slot].shape[0]
            assert torch.equal(c.key_view(0)[slot, :n], self.written[slot])
        lay = c.layout
        expect = sorted(
            p for slot in range(self.CFG.max_slots) for p in lay.slot_pages(slot, lay.pages_per_plane(c.capacity(slot)))
        )
        assert c.range.mapped() == expect

    def teardown(self):
        self.mapper.close()
        self.cache.close()
        assert self.pool.stats().in_use == 0
        self.pool.close()


class ShortMapperMachine(MapperMachine):
    """The same with 10 pages for up to 32: advice and ensure() get refused, concurrently with the mapper."""

    BUDGET_PAGES = 10


@pytest.mark.parametrize("machine", [MapperMachine, ShortMapperMachine], ids=["room", "short"])
def test_random_advice_with_a_mapper_keeps_data_and_maps_what_was_advised(machine):
    machine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    machine.TestCase().runTest()
