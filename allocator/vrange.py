# SPDX-License-Identifier: Apache-2.0
"""A reserved virtual range whose pages are mapped from a pool, by page index, on demand."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

from .errors import InvalidRequestError, VkvError
from .pool import PagePool


class VirtualRange:
    """``num_pages`` pages of contiguous virtual address space over a :class:`PagePool`. Thread-safe.

    ``map`` and ``unmap`` take page indices; both are all-or-nothing. ``tensor()`` is a uint8 view of
    the whole range: reading or writing a byte whose page is not mapped faults.

    Examples
    --------
    >>> pool = PagePool("host", budget_bytes=64 << 20)
    >>> r = VirtualRange(pool, num_pages=8)
    >>> r.map([0, 1])
    2
    >>> r.tensor()[: r.page_size].fill_(7).sum().item() == 7 * r.page_size
    True
    >>> r.close()
    """

    def __init__(self, pool: PagePool, num_pages: int):
        if num_pages <= 0:
            raise InvalidRequestError(f"num_pages must be positive, got {num_pages}")
        self.pool = pool
        self.driver = pool.driver
        self.page_size = pool.page_size
        self.num_pages = num_pages
        self.nbytes = num_pages * self.page_size
        self.addr = self.driver.reserve(self.nbytes)
        self._pages: dict[int, Any] = {}  # page index -> physical page handle
        self._lock = threading.RLock()
        self._closed = False

    def _check_indices(self, indices: Iterable[int]) -> Iterable[int]:
        """Sorted, unique, in-range page indices (a range passes through as it is)."""
        if self._closed:
            raise InvalidRequestError("this virtual range has been closed")
        if isinstance(indices, range) and indices.step == 1:
            out, lo, hi = indices, indices.start, indices.stop - 1
        elif isinstance(indices, list) and len(indices) == 1:  # one page: the common case of a decode step
            out = [int(indices[0])]
            lo = hi = out[0]
        else:
            out = sorted(set(map(int, indices)))
            lo, hi = (out[0], out[-1]) if out else (0, 0)
        if out and (lo < 0 or hi >= self.num_pages):
            raise InvalidRequestError(f"page index out of range [0, {self.num_pages}): {lo}..{hi}")
        return out

    def is_mapped(self, index: int) -> bool:
        return index in self._pages

    def mapped(self) -> list[int]:
        """Sorted indices of the mapped pages."""
        with self._lock:
            return sorted(self._pages)

    @property
    def num_mapped(self) -> int:
        return len(self._pages)

    def map(self, indices: Iterable[int]) -> int:
        """Map every page in ``indices`` that is not mapped yet. Returns how many were mapped.

        All or nothing: if the pool is out of budget or the driver fails, the pages this call mapped are
        unmapped and returned, and the error is raised.
        """
        with self._lock:
            mapped = self._pages
            todo = [i for i in self._check_indices(indices) if i not in mapped]
            if not todo:
                return 0
            pages = self.pool.acquire(len(todo))
            done: list[int] = []
            driver_map, addr, size = self.driver.map, self.addr, self.page_size
            try:
                for index, page in zip(todo, pages, strict=True):
                    driver_map(addr + index * size, page)
                    done.append(index)
            except BaseException:
                self._undo(done, pages)
                raise
            self._pages.update(zip(todo, pages, strict=True))
            return len(todo)

    def alias(self, pairs: Iterable[tuple[int, int]], source: VirtualRange | None = None) -> int:
        """Map the physical page behind ``source``'s page ``src`` at this range's page ``dst`` too, for
        each (src, dst) pair: both addresses then read and write the same bytes. ``source`` defaults to
        this range and must draw from the same pool. Every dst must be unmapped and every src mapped.
        All or nothing. Returns how many pages were aliased."""
        source = self if source is None else source
        if source.pool is not self.pool:
            raise InvalidRequestError("can only alias pages of a range that draws from the same pool")
        with self._lock, source._lock:
            pairs = [(int(s), int(d)) for s, d in pairs]
            self._check_indices(d for _, d in pairs)
            source._check_indices(s for s, _ in pairs)
            if len({d for _, d in pairs}) != len(pairs):
                raise InvalidRequestError("a destination page appears twice")
            for s, d in pairs:
                if d in self._pages:
                    raise InvalidRequestError(f"destination page {d} is already mapped")
                if s not in source._pages:
                    raise InvalidRequestError(f"source page {s} is not mapped")
            pages = [source._pages[s] for s, _ in pairs]
            done: list[int] = []
            for page in pages:
                self.pool.retain(page)
            try:
                for (_, d), page in zip(pairs, pages, strict=True):
                    self.driver.map(self.addr + d * self.page_size, page)
                    done.append(d)
            except BaseException:
                self._undo(done, pages)
                raise
            self._pages.update((d, page) for (_, d), page in zip(pairs, pages, strict=True))
            return len(pairs)

    def page(self, index: int) -> Any:
        """The physical page mapped at ``index`` (KeyError when none is)."""
        return self._pages[index]

    def _undo(self, done: list[int], pages: list[Any]) -> None:
        try:
            for index in done:
                self.driver.unmap(self.addr + index * self.page_size)
        except VkvError:
            return  # the range is in an unknown state; do not hand its pages to anyone else
        self.pool.release(pages)

    def unmap(self, indices: Iterable[int]) -> int:
        """Unmap the mapped pages among ``indices`` and return them to the pool. Returns how many.

        The caller must make sure no device work still uses them (the cache synchronizes first).
        """
        with self._lock:
            todo = [i for i in self._check_indices(indices) if i in self._pages]
            released = []
            try:
                for start, stop in _runs(todo):  # one driver call per run of adjacent pages
                    self.driver.unmap_range(self.addr + start * self.page_size, (stop - start) * self.page_size)
                    released.extend(self._pages.pop(index) for index in range(start, stop))
            finally:
                self.pool.release(released)
            return len(todo)

    def tensor(self) -> torch.Tensor:
        """A uint8 tensor over the whole range (it does not own the memory; close() invalidates it)."""
        if self._closed:
            raise InvalidRequestError("this virtual range has been closed")
        return self.driver.tensor(self.addr, self.nbytes)

    def close(self) -> None:
        """Unmap every page, return them to the pool, and give the address range back."""
        with self._lock:
            if self._closed:
                return
            self.unmap(list(self._pages))
            self._closed = True
            self.driver.free_range(self.addr, self.nbytes)

    def __enter__(self) -> VirtualRange:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive values in sorted, distinct ``indices``."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
