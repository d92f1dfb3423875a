# SPDX-License-Identifier: Apache-2.0
"""The per-model KV cache: one virtual range, slots for requests, pages mapped as requests grow.

The invariant every kernel relies on, and the one place it is kept: a kernel may read tokens
[0, n) of a slot only after ``grow(slot, n)`` has returned, which maps every page those tokens touch.
``capacity(slot)`` says how many tokens are readable now.
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass

import torch

from vkv.allocator import InvalidRequestError, PagePool, PoolStats, VirtualRange

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
    ):
        self.config = config
        self.pool = pool if pool is not None else PagePool(backend, budget_bytes)
        self.layout = KVLayout(config, self.pool.page_size)
        self.range = VirtualRange(self.pool, self.layout.num_pages)
        self._buffer = self.range.tensor().view(config.dtype)
        self._allocated = [False] * config.max_slots
        self._pages_per_plane = [0] * config.max_slots
        self._lock = threading.RLock()
        # Bumped whenever pages are unmapped: a plan made at an older generation must re-check capacities.
        self.generation = 0

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

    def can_allocate(self) -> bool:
        return not all(self._allocated)

    def allocate(self) -> int:
        """Take a free slot (the lowest) and return its index. It holds no tokens until grown."""
        with self._lock:
            for slot, used in enumerate(self._allocated):
                if not used:
                    self._allocated[slot] = True
                    return slot
        raise InvalidRequestError(f"all {self.config.max_slots} slots are in use; free one first")

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
            return mapped

    def free(self, slot: int) -> int:
        """Release ``slot``: wait for the device, unmap its pages, return them to the pool. Returns pages
        unmapped. Views keep pointing at the slot's addresses, which fault until grown again."""
        with self._lock:
            self._check_slot(slot)
            pages = self.layout.slot_pages(slot, self._pages_per_plane[slot])
            if pages:
                self.pool.driver.synchronize()  # no kernel may still read what is unmapped
            unmapped = self.range.unmap(pages)
            self.generation += 1
            self._pages_per_plane[slot] = 0
            self._allocated[slot] = False
            return unmapped

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
                mapped_bytes=mapped * self.pool.page_size,
                reserved_bytes=self.layout.total_bytes,
                tokens_capacity=sum(self.layout.tokens_in(p) for p in self._pages_per_plane),
                pool=self.pool.stats(),
            )

    def close(self) -> None:
        """Free every slot's pages back to the pool and give the virtual range back. Views die with it."""
        with self._lock:
            if self.range.num_mapped:
                self.pool.driver.synchronize()
            self.range.close()
            self.generation += 1
            self._allocated = [False] * self.config.max_slots
            self._pages_per_plane = [0] * self.config.max_slots

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
