# SPDX-License-Identifier: Apache-2.0
"""The per-model KV cache: one virtual range, slots for requests, pages mapped as requests grow.

Elastic behaviour: a freed slot keeps its pages (deferred reclamation) until the pool runs short, then
gives them back once the device has finished the work queued before the free; ``allocate`` prefers a
free slot that still holds enough pages, so admitting a request needs no driver call. With a mapper,
``advise`` maps a slot's next pages in the background and ``ensure`` (the step path) only checks.

The invariant every kernel relies on, and the one place it is kept: a kernel may read tokens
[0, n) of a slot only after ``grow(slot, n)`` has returned, which maps every page those tokens touch.
``capacity(slot)`` says how many tokens are readable now.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vkv.allocator import InvalidRequestError, OutOfPagesError, PagePool, PoolStats, VirtualRange
from vkv.allocator.mapper import Mapper

from .layout import CacheConfig, KVLayout


def _is_index(value) -> bool:
    """True for ints and int-like scalars (numpy ints), False for bools, floats and everything else."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class CacheStats:
    slots_in_use: int
    mapped_pages: int
    idle_pages: int  # mapped under freed slots, kept for reuse until the pool needs them
    mapped_bytes: int
    reserved_bytes: int
    tokens_capacity: int  # tokens readable across all slots
    pool: PoolStats


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
    mapper : Mapper | None
        A background mapper for :meth:`advise`; None: advise maps synchronously.
    headroom_tokens : int
        Tokens :meth:`advise` maps beyond what was asked, so decode steps find their pages mapped.
    job_pages : int
        At most this many pages (of all planes) per mapper job, but at least one page of every plane
        (2 x num_layers pages in the layer-major layout): a longer growth is queued again in parts, behind
        other slots' jobs. A growth that the pool could not serve in full is not started.

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
        mapper: Mapper | None = None,
        headroom_tokens: int = 64,
        job_pages: int = 4,
    ):
        if not _is_index(headroom_tokens) or headroom_tokens < 0:
            raise InvalidRequestError(f"headroom_tokens must be an int >= 0, got {headroom_tokens!r}")
        if not _is_index(job_pages) or job_pages < 1:
            raise InvalidRequestError(f"job_pages must be an int >= 1, got {job_pages!r}")
        self.config = config
        self.pool = pool if pool is not None else PagePool(backend, budget_bytes)
        self.mapper, self.headroom_tokens = mapper, headroom_tokens
        self.layout = KVLayout(config, self.pool.page_size)
        self._job_step = max(1, job_pages // self.layout.planes)  # pages per plane a mapper job maps
        self.range = VirtualRange(self.pool, self.layout.num_pages)
        self._buffer = self.range.tensor().view(config.dtype)
        self._allocated = [False] * config.max_slots
        self._pages_per_plane = [0] * config.max_slots
        # Tokens the step path may read without further checks: the mapped tokens of an allocated slot, -1
        # for a free one. Kept in step with _allocated and _pages_per_plane by _note(slot).
        self._readable = [-1] * config.max_slots
        self._freed_at: list[object] = [None] * config.max_slots  # device event of each free
        # Tokens advise() asked for since each slot's allocation (the largest: a smaller, later advice must not
        # undo a larger one), reset by allocate(); mapper jobs grow toward it. Written under _wish_lock, which is
        # never held while mapping, so advise() does not wait for a running job.
        self._wish = [0] * config.max_slots
        self._wish_lock = threading.Lock()
        self._sharing: set[int] = set()  # slots that may map a page another slot maps too
        self._lock = threading.RLock()
        # Bumped whenever a slot is freed or pages are unmapped: plans made before must re-check.
        self.generation = 0
        self.sync_grows = 0  # ensure() calls that had to map on the step path (the mapper fell behind)
        self.pool.add_reclaimer(self.release_idle, idle=self.idle_pages)

    @property
    def device(self) -> torch.device:
        return self.pool.driver.device

    # -- slots ---------------------------------------------------------------------------------------

    def _check_slot(self, slot: int, *, allocated: bool = True) -> None:
        if not _is_index(slot):
            raise InvalidRequestError(f"slot must be an int, got {type(slot).__name__}")
        if not 0 <= slot < self.config.max_slots:
            raise InvalidRequestError(f"slot {slot} is out of range [0, {self.config.max_slots})")
        if allocated and not self._allocated[slot]:
            raise InvalidRequestError(f"slot {slot} is not allocated (never allocated, or already freed)")

    def _note(self, slot: int) -> None:
        """Refresh ``_readable[slot]`` after its allocation or its pages changed (under the lock)."""
        self._readable[slot] = self.layout.tokens_in(self._pages_per_plane[slot]) if self._allocated[slot] else -1

    def can_allocate(self) -> bool:
        return not all(self._allocated)

    def allocate(self, num_tokens: int = 0) -> int:
        """Take a free slot and return its index.

        Prefers a freed slot whose kept pages already hold ``num_tokens`` (the smallest such: no driver
        call), else the free slot holding the most pages, else the lowest empty one. Its contents are
        stale until written; ``capacity`` says how many tokens are mapped already.
        """
        if not _is_index(num_tokens) or num_tokens < 0:
            raise InvalidRequestError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        with self._lock:
            free = [s for s, used in enumerate(self._allocated) if not used]
            if not free:
                raise InvalidRequestError(f"all {self.config.max_slots} slots are in use; free one first")
            held = self._pages_per_plane
            fits = [s for s in free if held[s] and self.layout.tokens_in(held[s]) >= num_tokens]
            slot = min(fits, key=held.__getitem__) if fits and num_tokens else max(free, key=lambda s: (held[s], -s))
            self._allocated[slot] = True
            self._freed_at[slot] = None
            with self._wish_lock:
                self._wish[slot] = 0
            self._note(slot)
            return slot

    def grow(self, slot: int, num_tokens: int) -> int:
        """Make tokens [0, num_tokens) of ``slot`` readable and writable; returns the pages it mapped.

        Maps only the missing pages of this slot; growing to fewer tokens than it holds is a no-op.
        All or nothing: if the pool's budget or the driver refuses, nothing is mapped and the error
        (OutOfPagesError, DriverError) is raised.
        """
        with self._lock:
            self._check_slot(slot)
            if not _is_index(num_tokens) or not 0 <= num_tokens <= self.config.max_seq_len:
                raise InvalidRequestError(
                    f"cannot grow slot {slot} to {num_tokens!r} tokens; "
                    f"expected an int in [0, {self.config.max_seq_len}]"
                )
            have, need = self._pages_per_plane[slot], self.layout.pages_per_plane(num_tokens)
            if need <= have:
                return 0
            mapped = self.range.map(self.layout.slot_pages(slot, need, have))
            self._pages_per_plane[slot] = need
            self._note(slot)
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

    def ensure_many(self, slots: Sequence[int], num_tokens: Sequence[int]) -> int:
        """:meth:`ensure` for a step's batch (slot i needs ``num_tokens[i]`` tokens) in one call. Returns how
        many slots had to grow synchronously."""
        return sum(self.ensure(slot, n) for slot, n in self.uncovered(slots, num_tokens))

    def advise_many(self, slots: Sequence[int], num_tokens: Sequence[int]) -> None:
        """:meth:`advise` for a step's batch in one call."""
        for slot, n in self.uncovered(slots, num_tokens, self.headroom_tokens):
            self.advise(slot, n)

    def uncovered(self, slots: Sequence[int], counts: Sequence[int], extra: int = 0) -> list[tuple[int, int]]:
        """The (slot, count) pairs a step may not read yet: all but allocated in-range int slots whose mapped
        tokens already cover the int ``count + extra``. The step path's cheap batch check (one list lookup a
        slot, no validation layers); the pairs it returns need the full checks (and a clear error or a grow)."""
        if len(slots) != len(counts):
            raise InvalidRequestError(
                f"slots and num_tokens must be of one length (a count per slot), got {len(slots)} and {len(counts)}"
            )
        readable = self._readable  # -1 for free slots, so only allocated slots pass
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
        self._check_slot(slot)
        if not _is_index(num_tokens) or not 0 <= num_tokens <= self.config.max_seq_len:
            raise InvalidRequestError(
                f"cannot advise slot {slot} of {num_tokens!r} tokens; expected an int in [0, {self.config.max_seq_len}]"
            )
        with self._wish_lock:
            target = self._wish[slot] = max(
                self._wish[slot], min(num_tokens + self.headroom_tokens, self.config.max_seq_len)
            )
        if self.capacity(slot) >= target:
            return
        if self.mapper is None:
            with contextlib.suppress(OutOfPagesError):  # as the mapper would: ensure() maps or raises later
                self.grow(slot, target)
        else:
            self.mapper.submit((id(self), slot), lambda: self._grow_ahead(slot))

    def _grow_ahead(self, slot: int) -> None:
        """A mapper job: one part of ``slot``'s growth toward its wish; the rest goes back in the queue."""
        with self._lock:
            if not self._allocated[slot]:
                return  # freed while the job waited
            target, have = self._wish[slot], self._pages_per_plane[slot]
            if self.layout.planes * (self.layout.pages_per_plane(target) - have) > self.pool.obtainable():
                return  # the whole growth does not fit: map none of it (headroom is a wish; ensure() maps or raises)
            part = min(target, self.layout.tokens_in(have + self._job_step))
            try:
                self.grow(slot, part)
            except OutOfPagesError:  # another model took the pages meanwhile
                return
            if self.capacity(slot) < self._wish[slot]:  # the rest, behind the other slots' jobs
                self.mapper.submit((id(self), slot), lambda: self._grow_ahead(slot))

    def share_prefix(self, src: int, dst: int, num_tokens: int) -> int:
        """Give ``dst`` the first ``num_tokens`` tokens of ``src`` without copying whole pages.

        The pages wholly inside the prefix are mapped into ``dst`` too (one physical page, two
        addresses, reference-counted, so freeing either slot never unmaps a page the other uses); the
        partial last page gets a fresh page and a copy. ``dst``'s own pages, if any, are released first.
        ``dst`` may then grow and write past ``num_tokens``; neither slot may write below it. Returns the
        pages shared without a copy.
        """
        with self._lock:
            self._check_slot(src)
            self._check_slot(dst)
            if src == dst:
                raise InvalidRequestError("src and dst must be different slots")
            if not _is_index(num_tokens) or not 0 < num_tokens <= self.capacity(src):
                raise InvalidRequestError(
                    f"cannot share {num_tokens!r} tokens of slot {src}: it holds {self.capacity(src)} mapped tokens"
                )
            layout, page = self.layout, self.pool.page_size
            prefix_bytes = num_tokens * layout.row_bytes
            full, rest = divmod(prefix_bytes, page)
            need = layout.planes if rest else 0  # fresh pages for the partial last page, checked before any change
            if self.pool.available() < need:
                self.pool.reclaim(need - self.pool.available())
            if self.pool.available() < need:
                raise OutOfPagesError(
                    f"need {need} pages for the partial last page of the shared prefix ({rest} bytes a plane) "
                    f"but the pool has {self.pool.available()} available"
                )
            if self._pages_per_plane[dst]:
                self.pool.driver.synchronize()  # dst's old contents may still be in use by queued work
                self.range.unmap(layout.slot_pages(dst, self._pages_per_plane[dst]))
                self._pages_per_plane[dst] = 0
                self._note(dst)
                self._sharing.discard(dst)
                self.generation += 1
            pairs = list(zip(layout.slot_pages(src, full), layout.slot_pages(dst, full), strict=True))
            self.range.alias(pairs)
            if rest:
                try:
                    self.range.map(layout.slot_pages(dst, full + 1, full))
                except BaseException:
                    self.range.unmap([d for _, d in pairs])
                    raise
                raw = self.range.tensor()
                for s_page, d_page in zip(
                    layout.slot_pages(src, full + 1, full), layout.slot_pages(dst, full + 1, full), strict=True
                ):
                    raw[d_page * page : d_page * page + rest].copy_(raw[s_page * page : s_page * page + rest])
            self._pages_per_plane[dst] = full + (1 if rest else 0)
            self._note(dst)
            if pairs:
                self._sharing |= {src, dst}
            return len(pairs)

    def free(self, slot: int) -> None:
        """Release ``slot``. Its pages stay mapped for reuse until the pool needs them (then
        :meth:`release_idle` unmaps them once the device has finished the work queued before this call)."""
        with self._lock:
            self._check_slot(slot)
            if self.mapper is not None:
                self.mapper.cancel((id(self), slot))
            self._freed_at[slot] = self.pool.driver.record_event() if self._pages_per_plane[slot] else None
            self._allocated[slot] = False
            self._note(slot)
            self.generation += 1
            if slot in self._sharing:
                # A page shared with another slot must never be handed to this slot's next request
                # (it would write over the other's prefix): give this slot's pages back now.
                self._unmap_slot(slot)

    def _unmap_slot(self, slot: int) -> int:
        """Unmap every page of ``slot`` once the device is done with it; returns pages unmapped."""
        self.pool.driver.wait_event(self._freed_at[slot])
        unmapped = self.range.unmap(self.layout.slot_pages(slot, self._pages_per_plane[slot]))
        self._pages_per_plane[slot] = 0
        self._note(slot)
        self._freed_at[slot] = None
        self._sharing.discard(slot)
        self.generation += 1
        return unmapped

    def release_idle(self, max_pages: int | None = None) -> int:
        """Unmap the pages kept by freed slots (largest first) until ``max_pages`` pages are back in the
        pool (all of them with None). Returns the pages the pool got back. The pool calls this when its
        budget runs short; it skips (returns 0) while another thread holds this cache."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            before = self.pool.stats().in_use
            idle = [s for s, used in enumerate(self._allocated) if not used and self._pages_per_plane[s]]
            for slot in sorted(idle, key=self._pages_per_plane.__getitem__, reverse=True):
                if max_pages is not None and before - self.pool.stats().in_use >= max_pages:
                    break
                self._unmap_slot(slot)
            return before - self.pool.stats().in_use
        finally:
            self._lock.release()

    def idle_pages(self) -> int:
        """Pages kept mapped by freed slots (what :meth:`release_idle` could give back)."""
        held, used = self._pages_per_plane, self._allocated
        return self.layout.planes * sum(p for p, u in zip(held, used, strict=True) if not u)

    def trim(self) -> int:
        """Give every page kept by freed slots back to the pool (an idle model shrinks). Returns pages."""
        return self.release_idle(None)

    def is_allocated(self, slot: int) -> bool:
        self._check_slot(slot, allocated=False)
        return self._allocated[slot]

    def capacity(self, slot: int) -> int:
        """Tokens of ``slot`` that are mapped now (readable by kernels)."""
        self._check_slot(slot, allocated=False)
        return self.layout.tokens_in(self._pages_per_plane[slot])

    # -- views ---------------------------------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not _is_index(layer) or not 0 <= layer < self.config.num_layers:
            raise InvalidRequestError(f"layer {layer!r} is out of range [0, {self.config.num_layers})")

    def key_view(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys, ``[max_slots, max_seq_len, num_kv_heads, head_dim]``, strided.

        Only tokens below ``capacity(slot)`` may be touched."""
        self._check_layer(layer)
        return self.layout.view(self._buffer, layer, 0)

    def value_view(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s values; see :meth:`key_view`."""
        self._check_layer(layer)
        return self.layout.view(self._buffer, layer, 1)

    # -- accounting ----------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        with self._lock:
            mapped = self.range.num_mapped
            return CacheStats(
                slots_in_use=sum(self._allocated),
                mapped_pages=mapped,
                idle_pages=self.idle_pages(),
                mapped_bytes=mapped * self.pool.page_size,
                reserved_bytes=self.layout.total_bytes,
                tokens_capacity=sum(self.layout.tokens_in(p) for p in self._pages_per_plane),
                pool=self.pool.stats(),
            )

    def close(self) -> None:
        """Free every slot's pages back to the pool and give the virtual range back. Views die with it."""
        with self._lock:
            self.pool.remove_reclaimer(self.release_idle)
            if self.mapper is not None:
                for slot in range(self.config.max_slots):
                    self.mapper.cancel((id(self), slot))
            if self.range.num_mapped:
                self.pool.driver.synchronize()
            self.range.close()
            self._sharing.clear()
            self.generation += 1
            self._allocated = [False] * self.config.max_slots
            self._pages_per_plane = [0] * self.config.max_slots
            self._readable = [-1] * self.config.max_slots

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
