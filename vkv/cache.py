# SPDX-License-Identifier: Apache-2.0
"""The per-model KV cache: one virtual range, slots for requests, pages mapped as requests grow.

Elastic behaviour: a freed slot keeps its pages (deferred reclamation) until the pool runs short, then
gives them back once the device has finished the work queued before the free; ``allocate`` prefers a
free slot that still holds enough pages, so admitting a request needs no driver call. With a mapper,
``advise`` maps a slot's next pages in the background and ``ensure`` (the step path) only checks.

The invariant every kernel relies on, and the one place it is kept: a kernel may read tokens
[0, n) of a slot only after ``grow(slot, n)`` has returned, which maps every page those tokens touch.
``capacity(slot)`` says how many tokens are readable now; :meth:`KVCache._sync` derives it, and the step
path's copy of it, from the slot's one record.

Every operation is all or nothing: its checks run first, then its steps, each undone if a later one
raises (an interrupt included). The range's map and unmap are all or nothing themselves; after any failure
the cache re-reads what the range really maps, so it never believes an unmapped page is mapped.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vkv.allocator import InvalidRequestError, OutOfPagesError, PagePool, PoolStats, VirtualRange
from vkv.allocator.checks import check_count, check_positive, is_int
from vkv.allocator.mapper import Mapper

from .layout import CacheConfig, KVLayout


@dataclass(frozen=True, slots=True)
class CacheStats:
    slots_in_use: int
    mapped_pages: int
    idle_pages: int  # mapped under freed slots, kept for reuse until the pool needs them
    mapped_bytes: int
    reserved_bytes: int
    tokens_capacity: int  # tokens readable across all slots
    pool: PoolStats


@dataclass(slots=True)
class Slot:
    """One slot's state: the cache's only record of it."""

    allocated: bool = False
    pages: int = 0  # pages mapped in each plane: pages [0, pages) of every plane of the slot
    freed_at: object = None  # the device event of the free, waited for before the pages are unmapped
    wish: int = 0  # the most tokens advise() asked for since the allocation; mapper jobs grow toward it
    sharing: bool = False  # may map a page another slot maps too


def _grow_ahead(cache: weakref.ref[KVCache], slot: int) -> None:
    """A mapper job; it holds the cache weakly, so a cache dropped without close() is still collected."""
    alive = cache()
    if alive is not None:
        alive._grow_ahead(slot)


class KVCache:
    """A model's KV cache over a contiguous virtual range whose pages come from a (shared) pool.

    Parameters
    ----------
    config : CacheConfig
        Geometry, dtype, slots and layout.
    pool : PagePool | None
        The pool to draw pages from; share one pool between models to share memory. None: a new pool
        on ``backend`` with ``budget_bytes``.
    backend : str | None
        ``"cuda"``, ``"host"`` or None (cuda when usable); only used when ``pool`` is None.
    budget_bytes : int | None
        The new pool's budget; only used when ``pool`` is None.
    device : int | None
        The device index of the new pool (default the current device); with ``pool``, it must be the pool's.
    mapper : Mapper | None
        A background mapper for :meth:`advise`; None: advise maps synchronously.
    headroom_tokens : int
        Tokens :meth:`advise` maps beyond what was asked, so decode steps find their pages mapped.
    job_pages : int
        At most this many pages (of all planes) per mapper job, but at least one page of every plane
        (2 x num_layers pages in the layer-major layout): a longer growth is queued again in parts, behind
        other slots' jobs. A growth that the pool could not serve in full is not started.

    Every method raises InvalidRequestError once the cache is closed, but for close() itself and the pool's
    callbacks (release_idle, idle_pages: they then give nothing).

    Examples
    --------
    >>> import torch
    >>> cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32,
    ...                   max_slots=4, max_seq_len=1024)
    >>> cache = KVCache(cfg, backend="host", budget_bytes=64 << 20)
    >>> slot = cache.allocate()
    >>> cache.grow(slot, 100)  # maps the pages tokens [0, 100) of this slot touch
    1
    >>> k = cache.key_view(layer=0)  # [max_slots, max_seq_len, kv_heads, head_dim]
    >>> k[slot, :100] = 1.0
    >>> cache.free(slot); cache.close()
    """

    def __init__(
        self,
        config: CacheConfig,
        pool: PagePool | None = None,
        *,
        backend: str | None = None,
        budget_bytes: int | None = None,
        device: int | None = None,
        mapper: Mapper | None = None,
        headroom_tokens: int = 64,
        job_pages: int = 4,
    ):
        if not isinstance(config, CacheConfig):
            raise InvalidRequestError(f"config must be a CacheConfig, got {type(config).__name__}")
        if pool is not None and not isinstance(pool, PagePool):
            raise InvalidRequestError(f"pool must be a PagePool or None, got {type(pool).__name__}")
        if mapper is not None and not isinstance(mapper, Mapper):
            raise InvalidRequestError(f"mapper must be a Mapper or None, got {type(mapper).__name__}")
        self.headroom_tokens = check_count("headroom_tokens", headroom_tokens, hi=1 << 31)
        job_pages = check_positive("job_pages", job_pages, hi=1 << 20)
        if pool is not None and device is not None and check_count("device", device) != pool.device:
            raise InvalidRequestError(f"device {device} was asked for but the pool is device {pool.device}'s")
        self.config, self.mapper = config, mapper
        self.pool = pool if pool is not None else PagePool(backend, budget_bytes, device=device)
        try:
            self.layout = KVLayout(config, self.pool.page_size)
            self.range = VirtualRange(self.pool, self.layout.num_pages)
        except BaseException:
            if pool is None:
                self.pool.close()
            raise
        self._job_step = max(1, job_pages // self.layout.planes)  # pages per plane a mapper job maps
        self._buffer = self.range.tensor().view(config.dtype)
        self._slots = [Slot() for _ in range(config.max_slots)]
        # The step path's copy of each slot's readable tokens (-1 for a free slot), written by _sync alone.
        self._readable = [-1] * config.max_slots
        # Guards the wishes; never held while mapping, so advise() does not wait for a running job.
        self._wish_lock = threading.Lock()
        self._lock = threading.RLock()
        self._closed = False
        self._self = weakref.ref(self)
        # Bumped whenever a slot is freed or pages are unmapped: plans made before must re-check.
        self.generation = 0
        self.sync_grows = 0  # ensure() calls that had to map on the step path (the mapper fell behind)
        self.pool.add_reclaimer(self.release_idle, idle=self.idle_pages)

    @property
    def device(self) -> torch.device:
        return self.pool.driver.device

    # -- slots ---------------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._closed:
            raise InvalidRequestError("this cache has been closed")

    def _slot(self, slot: int, *, allocated: bool = True, name: str = "slot") -> tuple[int, Slot]:
        """The checked slot index and its record."""
        self._open()
        slots = self._slots
        if type(slot) is not int or not 0 <= slot < len(slots):
            if not is_int(slot):
                raise InvalidRequestError(f"{name} must be an int, got {type(slot).__name__}")
            if not 0 <= slot < len(slots):
                raise InvalidRequestError(f"{name} {slot} is out of range [0, {len(slots)})")
            slot = int(slot)
        record = slots[slot]
        if allocated and not record.allocated:
            raise InvalidRequestError(f"{name} {slot} is not allocated (never allocated, or already freed)")
        return slot, record

    def _tokens(self, value: int, slot: int, verb: str) -> int:
        """``value`` as a token count in [0, max_seq_len]; the error says ``verb`` (what was asked of ``slot``)."""
        top = self.config.max_seq_len
        if type(value) is int and 0 <= value <= top:
            return value
        if not is_int(value) or not 0 <= value <= top:
            raise InvalidRequestError(
                f"cannot {verb} slot {slot} to num_tokens = {value!r}; expected an int in [0, {top}]"
            )
        return int(value)

    def _sync(self, slot: int) -> None:
        """Derive what the step path may read of ``slot`` from its record (after any change to it)."""
        record = self._slots[slot]
        self._readable[slot] = self.layout.tokens_in(record.pages) if record.allocated else -1

    def _resync(self, slots: Sequence[int]) -> None:
        """After a failure: set each slot's pages to what the range really maps (the whole pages of every
        plane), so the cache never believes an unmapped page mapped."""
        try:
            mapped = set(self.range.mapped())
        except InvalidRequestError:  # the range was closed
            mapped = set()
        for slot in slots:
            record = self._slots[slot]
            firsts = self.layout.slot_pages(slot, 1)
            record.pages = min(
                next((i for i in range(record.pages) if first + i not in mapped), record.pages) for first in firsts
            )
            self._sync(slot)

    def _shrink_to(self, slot: int, pages: int) -> None:
        """An undo step: unmap ``slot``'s pages from ``pages`` on (the device is not using them). Best effort:
        the error being undone is the one to raise; if this fails too, the slot keeps what the range maps."""
        record = self._slots[slot]
        if record.pages > pages:
            try:
                self.range.unmap(self.layout.slot_pages(slot, record.pages, pages))
            except Exception:
                self._resync([slot])
                return
            record.pages = pages
            self._sync(slot)

    def can_allocate(self) -> bool:
        self._open()
        return not all(s.allocated for s in self._slots)

    def allocate(self, num_tokens: int = 0) -> int:
        """Take a free slot and return its index.

        Prefers a freed slot whose kept pages already hold ``num_tokens`` (the smallest such: no driver
        call), else the free slot holding the most pages, else the lowest empty one. Its contents are
        stale until written; ``capacity`` says how many tokens are mapped already.
        """
        self._open()
        top = self.config.max_seq_len
        if not is_int(num_tokens) or not 0 <= num_tokens <= top:
            raise InvalidRequestError(f"num_tokens must be an int in [0, {top}], got {num_tokens!r}")
        with self._lock:
            self._open()
            slots = self._slots
            free = [s for s, record in enumerate(slots) if not record.allocated]
            if not free:
                raise InvalidRequestError(f"all {self.config.max_slots} slots are in use; free one first")
            fits = [s for s in free if slots[s].pages and self.layout.tokens_in(slots[s].pages) >= num_tokens]
            if fits and num_tokens:
                slot = min(fits, key=lambda s: slots[s].pages)
            else:
                slot = max(free, key=lambda s: (slots[s].pages, -s))
            record = slots[slot]
            with self._wish_lock:
                record.wish = 0
            record.allocated, record.freed_at = True, None
            self._sync(slot)
            return slot

    def grow(self, slot: int, num_tokens: int) -> int:
        """Make tokens [0, num_tokens) of ``slot`` readable and writable; returns the pages it mapped.

        Maps only the missing pages of this slot; growing to fewer tokens than it holds is a no-op.
        All or nothing: if the pool's budget or the driver refuses, nothing is mapped and the error
        (OutOfPagesError, DriverError) is raised.
        """
        with self._lock:
            slot, record = self._slot(slot)
            need = self.layout.pages_per_plane(self._tokens(num_tokens, slot, "grow"))
            have = record.pages
            if need <= have:
                return 0
            try:
                mapped = self.range.map(self.layout.slot_pages(slot, need, have))
            except BaseException:
                self._resync([slot])
                raise
            record.pages = need
            self._sync(slot)
            return mapped

    def ensure(self, slot: int, num_tokens: int) -> bool:
        """The step path: make sure tokens [0, num_tokens) of ``slot`` are mapped before a kernel reads
        them. Normally the mapper got there first and this only checks; otherwise it maps now, counts
        it in ``sync_grows`` and returns True."""
        if not self.uncovered([slot], [num_tokens]):
            return False
        with self._lock:  # grow checks the arguments and maps only what is missing
            if self.grow(slot, num_tokens):
                self.sync_grows += 1
                return True
            return False

    def _checked(self, pairs: list[tuple[int, int]], what: str) -> list[tuple[int, int]]:
        """Every (slot, count) pair of a batch checked before any is applied."""
        return [(s, self._tokens(n, s, what)) for s, n in ((self._slot(s)[0], n) for s, n in pairs)]

    def ensure_many(self, slots: Sequence[int], num_tokens: Sequence[int]) -> int:
        """:meth:`ensure` for a step's batch (slot i needs ``num_tokens[i]`` tokens) in one call. Returns how
        many slots had to grow synchronously. All or nothing: every pair is checked first, and a growth that
        fails part-way unmaps what it mapped for the slots before."""
        todo = self.uncovered(slots, num_tokens)
        if not todo:
            return 0
        with self._lock:
            todo = self._checked(todo, "ensure")
            before = {s: self._slots[s].pages for s, _ in todo}
            grown = 0
            try:
                for slot, n in todo:
                    grown += self.grow(slot, n) > 0
            except BaseException:
                for slot, pages in before.items():
                    self._shrink_to(slot, pages)
                raise
            self.sync_grows += grown
            return grown

    def advise_many(self, slots: Sequence[int], num_tokens: Sequence[int]) -> None:
        """:meth:`advise` for a step's batch in one call; every pair is checked before any is applied, and
        a synchronous growth (no mapper) that fails part-way is undone for the slots before."""
        todo = self.uncovered(slots, num_tokens, self.headroom_tokens)
        if not todo:
            return
        todo = self._checked(todo, "advise")
        if self.mapper is not None:  # queues jobs only: never waits for the cache lock a running job holds
            for slot, n in todo:
                self.advise(slot, n)
            return
        with self._lock:
            before = {s: (self._slots[s].pages, self._slots[s].wish) for s, _ in todo}
            try:
                for slot, n in todo:
                    self.advise(slot, n)
            except BaseException:
                for slot, (pages, wish) in before.items():
                    self._slots[slot].wish = wish
                    self._shrink_to(slot, pages)
                raise

    def uncovered(self, slots: Sequence[int], counts: Sequence[int], extra: int = 0) -> list[tuple[int, int]]:
        """The (slot, count) pairs a step may not read yet: all but allocated in-range int slots whose mapped
        tokens already cover the int ``count + extra``. The step path's cheap batch check (one list lookup a
        slot, no validation layers); the pairs it returns need the full checks (and a clear error or a grow)."""
        try:
            if isinstance(slots, (str, bytes, dict)) or isinstance(counts, (str, bytes, dict)):
                raise TypeError
            lengths = len(slots), len(counts)
        except TypeError:
            raise InvalidRequestError(
                f"slots and num_tokens must be sequences of ints, got {type(slots).__name__} and "
                f"{type(counts).__name__}"
            ) from None
        if lengths[0] != lengths[1]:
            raise InvalidRequestError(
                f"slots and num_tokens must be of one length (a count per slot), got {lengths[0]} and {lengths[1]}"
            )
        readable = self._readable  # -1 for free slots (all of them once closed), so only allocated slots pass
        max_slots = len(readable)
        return [
            (slot, n)
            for slot, n in zip(slots, counts, strict=True)
            if not (
                type(slot) is int
                and 0 <= slot < max_slots
                and type(n) is int
                and n >= 0
                and n + extra <= readable[slot]
            )
        ]

    def advise(self, slot: int, num_tokens: int) -> None:
        """Say that ``slot`` will soon hold ``num_tokens`` tokens (a new prompt, the next decode steps).
        The mapper maps them plus ``headroom_tokens`` in the background; without a mapper, now. The largest
        advice since the slot's allocation counts (a smaller one later changes nothing). A background failure
        (out of pages) is left for :meth:`ensure` to meet on the step path."""
        slot, record = self._slot(slot)
        num_tokens = self._tokens(num_tokens, slot, "advise")
        with self._wish_lock:
            before = record.wish
            target = record.wish = max(before, min(num_tokens + self.headroom_tokens, self.config.max_seq_len))
        if self.layout.tokens_in(record.pages) >= target:
            return
        try:
            if self.mapper is None:
                with contextlib.suppress(OutOfPagesError):  # as the mapper would: ensure() maps or raises later
                    self.grow(slot, target)
            else:
                self.mapper.submit((id(self), slot), functools.partial(_grow_ahead, self._self, slot))
        except BaseException:
            with self._wish_lock:
                record.wish = before
            raise

    def _grow_ahead(self, slot: int) -> None:
        """A mapper job: one part of ``slot``'s growth toward its wish; the rest goes back in the queue."""
        with self._lock:
            record = self._slots[slot]
            if self._closed or not record.allocated:
                return  # freed (or closed) while the job waited
            target, have = record.wish, record.pages
            if self.layout.planes * (self.layout.pages_per_plane(target) - have) > self.pool.obtainable():
                return  # the whole growth does not fit: map none of it (headroom is a wish; ensure() maps or raises)
            part = min(target, self.layout.tokens_in(have + self._job_step))
            try:
                self.grow(slot, part)
            except OutOfPagesError:  # another model took the pages meanwhile
                return
            if self.layout.tokens_in(record.pages) < record.wish:  # the rest, behind the other slots' jobs
                self.mapper.submit((id(self), slot), functools.partial(_grow_ahead, self._self, slot))

    def share_prefix(self, src: int, dst: int, num_tokens: int) -> int:
        """Give ``dst`` the first ``num_tokens`` tokens of ``src`` without copying whole pages.

        The pages wholly inside the prefix are mapped into ``dst`` too (one physical page, two
        addresses, reference-counted, so freeing either slot never unmaps a page the other uses); the
        partial last page gets a fresh page and a copy. ``dst``'s own pages, if any, are released first
        (their pages count toward the fresh ones). ``dst`` may then grow and write past ``num_tokens``;
        neither slot may write below it. Returns the pages shared without a copy. If a step fails, ``dst``
        gets back as many pages as it held (its old contents are gone) and the error is raised.
        """
        with self._lock:
            src, source = self._slot(src, name="src")
            dst, target = self._slot(dst, name="dst")
            if src == dst:
                raise InvalidRequestError("src and dst must be different slots")
            held = self.layout.tokens_in(source.pages)
            if not is_int(num_tokens) or not 0 < num_tokens <= held:
                raise InvalidRequestError(
                    f"cannot share num_tokens = {num_tokens!r} tokens of slot {src}: it holds {held} mapped tokens "
                    f"(expected an int in [1, {held}])"
                )
            layout, page = self.layout, self.pool.page_size
            full, rest = divmod(int(num_tokens) * layout.row_bytes, page)
            need = layout.planes if rest else 0  # fresh pages for the partial last page
            own = 0 if target.sharing else layout.planes * target.pages  # dst's pages that go back to the pool
            if self.pool.available() + own < need:
                self.pool.reclaim(need - own - self.pool.available())
            if self.pool.available() + own < need:
                raise OutOfPagesError(
                    f"need {need} pages for the partial last page of the shared prefix ({rest} bytes a plane) "
                    f"but the pool has {self.pool.available()} available and slot {dst} gives back {own}"
                )
            old = target.pages
            if old:
                self.pool.driver.synchronize()  # dst's old contents may still be in use by queued work
                try:
                    self.range.unmap(layout.slot_pages(dst, old))
                except BaseException:
                    self._resync([dst])
                    raise
                target.pages = 0
                self._sync(dst)
                self.generation += 1
            pairs = list(zip(layout.slot_pages(src, full), layout.slot_pages(dst, full), strict=True))
            try:
                self.range.alias(pairs)
                target.pages = full
                if rest:
                    self.range.map(layout.slot_pages(dst, full + 1, full))
                    target.pages = full + 1
                    raw = self.range.tensor()
                    for s_page, d_page in zip(
                        layout.slot_pages(src, full + 1, full), layout.slot_pages(dst, full + 1, full), strict=True
                    ):
                        raw[d_page * page : d_page * page + rest].copy_(raw[s_page * page : s_page * page + rest])
            except BaseException:
                self._undo_share(dst, old)
                raise
            target.sharing = bool(pairs)
            source.sharing = source.sharing or bool(pairs)
            self._sync(dst)
            return len(pairs)

    def _undo_share(self, dst: int, old: int) -> None:
        """Give ``dst`` back ``old`` pages a plane (fresh ones) after a failed share_prefix."""
        target = self._slots[dst]
        self._shrink_to(dst, 0)
        if target.pages:
            return  # the aliases could not be unmapped: dst keeps them
        target.sharing = False
        with contextlib.suppress(Exception):  # best effort, as _shrink_to: the share's error is the one raised
            self.range.map(self.layout.slot_pages(dst, old))
            target.pages = old
        self._sync(dst)

    def free(self, slot: int) -> None:
        """Release ``slot``. Its pages stay mapped for reuse until the pool needs them (then
        :meth:`release_idle` unmaps them once the device has finished the work queued before this call).
        A slot that shares pages gives them back now; if that fails, the slot stays allocated."""
        with self._lock:
            slot, record = self._slot(slot)
            event = self.pool.driver.record_event() if record.pages else None
            if record.sharing and record.pages:
                # A page shared with another slot must never be handed to this slot's next request
                # (it would write over the other's prefix): give this slot's pages back now.
                self.pool.driver.wait_event(event)
                try:
                    self.range.unmap(self.layout.slot_pages(slot, record.pages))
                except BaseException:
                    self._resync([slot])
                    raise
                record.pages, event = 0, None
            record.allocated, record.freed_at, record.sharing = False, event, False
            self._sync(slot)
            self.generation += 1
            if self.mapper is not None:
                self.mapper.cancel((id(self), slot))

    def release_idle(self, max_pages: int | None = None) -> int:
        """Unmap the pages kept by freed slots (largest first) until ``max_pages`` pages are back in the
        pool (all of them with None). Returns the pages the pool got back. The pool calls this when its
        budget runs short; it skips (returns 0) while another thread holds this cache, or once it is closed.
        All or nothing: the chosen slots' pages are unmapped in one call of the range."""
        if max_pages is not None:
            max_pages = check_count("max_pages", max_pages)
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            if self._closed:
                return 0
            slots, planes = self._slots, self.layout.planes
            idle = [s for s, record in enumerate(slots) if not record.allocated and record.pages]
            chosen, pages = [], 0
            for slot in sorted(idle, key=lambda s: slots[s].pages, reverse=True):
                if max_pages is not None and pages >= max_pages:
                    break
                chosen.append(slot)
                pages += planes * slots[slot].pages
            if not chosen:
                return 0
            for slot in chosen:
                self.pool.driver.wait_event(slots[slot].freed_at)
            before = self.pool.stats().in_use
            try:
                self.range.unmap([i for s in chosen for i in self.layout.slot_pages(s, slots[s].pages)])
            except BaseException:
                self._resync(chosen)
                raise
            for slot in chosen:
                slots[slot].pages, slots[slot].freed_at, slots[slot].sharing = 0, None, False
                self._sync(slot)
            self.generation += 1
            return before - self.pool.stats().in_use
        finally:
            self._lock.release()

    def idle_pages(self) -> int:
        """Pages kept mapped by freed slots (what :meth:`release_idle` could give back); 0 once closed."""
        return self.layout.planes * sum(s.pages for s in self._slots if not s.allocated)

    def trim(self) -> int:
        """Give every page kept by freed slots back to the pool (an idle model shrinks). Returns pages."""
        self._open()
        return self.release_idle(None)

    def is_allocated(self, slot: int) -> bool:
        return self._slot(slot, allocated=False)[1].allocated

    def capacity(self, slot: int) -> int:
        """Tokens of ``slot`` that are mapped now (readable by kernels)."""
        return self.layout.tokens_in(self._slot(slot, allocated=False)[1].pages)

    # -- views ---------------------------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        self._open()
        if not is_int(layer) or not 0 <= layer < self.config.num_layers:
            raise InvalidRequestError(f"layer {layer!r} is out of range [0, {self.config.num_layers})")

    def key_view(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys, ``[max_slots, max_seq_len, num_kv_heads, head_dim]``, strided.

        Only tokens below ``capacity(slot)`` may be touched; the view dies with close()."""
        self._check_layer(layer)
        return self.layout.view(self._buffer, int(layer), 0)

    def value_view(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s values; see :meth:`key_view`."""
        self._check_layer(layer)
        return self.layout.view(self._buffer, int(layer), 1)

    # -- accounting ----------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        with self._lock:
            self._open()
            mapped = self.range.num_mapped
            return CacheStats(
                slots_in_use=sum(s.allocated for s in self._slots),
                mapped_pages=mapped,
                idle_pages=self.idle_pages(),
                mapped_bytes=mapped * self.pool.page_size,
                reserved_bytes=self.layout.total_bytes,
                tokens_capacity=sum(self.layout.tokens_in(s.pages) for s in self._slots),
                pool=self.pool.stats(),
            )

    def close(self) -> None:
        """Free every slot's pages back to the pool and give the virtual range back. Views die with it.
        A second close does nothing; if the range cannot be closed, the cache stays open and usable."""
        with self._lock:
            if self._closed:
                return
            if self.range.num_mapped:
                self.pool.driver.synchronize()
            try:
                self.range.close()
            except BaseException:
                self._resync(range(len(self._slots)))
                raise
            self._closed = True
            self.pool.remove_reclaimer(self.release_idle)
            if self.mapper is not None:
                for slot in range(self.config.max_slots):
                    self.mapper.cancel((id(self), slot))
            self._slots = [Slot() for _ in self._slots]
            self._readable = [-1] * len(self._slots)
            self.generation += 1

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
