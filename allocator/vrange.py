# SPDX-License-Identifier: Apache-2.0
"""A reserved virtual range whose pages are mapped from a pool, by page index, on demand."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .checks import INT64_MAX, check_int, check_ints, check_positive
from .driver import Driver
from .errors import InvalidRequestError
from .pool import PagePool


class VirtualRange:
    """``num_pages`` pages of contiguous virtual address space over a :class:`PagePool`. Thread-safe.

    ``map``, ``unmap`` and ``alias`` take page indices; all are all-or-nothing: on any error the range
    and the pool are as before (pages this call unmapped are mapped again with the same physical pages,
    their data intact). ``mapped()`` is the truth about what is mapped. ``tensor()`` is a uint8 view of
    the whole range: reading or writing a byte whose page is not mapped faults. A range dropped without
    ``close()`` unmaps its pages and returns them to the pool when it is garbage-collected.

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
        if not isinstance(pool, PagePool):
            raise InvalidRequestError(f"pool must be a PagePool, got {type(pool).__name__}")
        self.num_pages = check_positive("num_pages", num_pages, hi=INT64_MAX // pool.page_size)
        self.pool = pool
        self.driver = pool.driver
        self.page_size = pool.page_size
        self.nbytes = self.num_pages * self.page_size
        self.addr = self.driver.reserve(self.nbytes)
        self._pages: dict[int, Any] = {}  # page index -> physical page handle
        self._lock = threading.RLock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _drop, self.driver, pool, self.addr, self.nbytes, self._pages)
        self._finalizer.atexit = False  # at exit the process's memory goes anyway

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequestError("this virtual range has been closed; expected an open one")

    def _check_indices(self, indices: Iterable[int], name: str = "indices") -> Iterable[int]:
        """Sorted, unique, in-range page indices (a range passes through as it is)."""
        self._check_open()
        if type(indices) is list and len(indices) == 1 and type(indices[0]) is int:  # a decode step's one page
            if not 0 <= indices[0] < self.num_pages:
                check_int(f"{name}[0]", indices[0], lo=0, hi=self.num_pages - 1)
            return indices
        if type(indices) is range and indices.step == 1:
            if indices and (indices.start < 0 or indices.stop > self.num_pages):
                raise InvalidRequestError(f"{name} must lie in [0, {self.num_pages}), got {indices}")
            return indices
        return sorted(set(check_ints(name, indices, lo=0, hi=self.num_pages - 1)))

    def mapped(self) -> list[int]:
        """Sorted indices of the mapped pages."""
        with self._lock:
            self._check_open()
            return sorted(self._pages)

    @property
    def num_mapped(self) -> int:
        self._check_open()
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
            pages, created = self.pool.take(len(todo))
            self._map_pages(todo, pages, created)
            return len(todo)

    def alias(self, pairs: Iterable[tuple[int, int]], source: VirtualRange | None = None) -> int:
        """Map the physical page behind ``source``'s page ``src`` at this range's page ``dst`` too, for
        each (src, dst) pair: both addresses then read and write the same bytes. ``source`` defaults to
        this range and must draw from the same pool. Every dst must be unmapped and every src mapped.
        All or nothing. Returns how many pages were aliased."""
        source = self if source is None else source
        if not isinstance(source, VirtualRange):
            raise InvalidRequestError(f"source must be a VirtualRange or None, got {type(source).__name__}")
        if source.pool is not self.pool:
            raise InvalidRequestError("can only alias pages of a range that draws from the same pool")
        with self._lock, source._lock:
            self._check_open()
            source._check_open()
            pairs = _pairs(pairs)
            self._check_indices([d for _, d in pairs], "pairs' destinations")
            source._check_indices([s for s, _ in pairs], "pairs' sources")
            if len({d for _, d in pairs}) != len(pairs):
                raise InvalidRequestError("a destination page appears twice in pairs; expected distinct ones")
            for s, d in pairs:
                if d in self._pages:
                    raise InvalidRequestError(f"destination page {d} is already mapped; expected unmapped ones")
                if s not in source._pages:
                    raise InvalidRequestError(f"source page {s} is not mapped; expected mapped ones")
            if not pairs:
                return 0
            pages = [source._pages[s] for s, _ in pairs]
            for page in pages:
                self.pool.retain(page)
            self._map_pages([d for _, d in pairs], pages, None)
            return len(pairs)

    def _map_pages(self, todo: list[int], pages: list[Any], created: int | None) -> None:
        """Map ``pages`` at ``todo``: taken from the pool (``created`` of them new) or retained references
        (``created`` None). On an error every page this call mapped is unmapped again and the pages go back
        (untaken, or released), then the error propagates."""
        driver_map, addr, size = self.driver.map, self.addr, self.page_size
        if len(todo) == 1:  # the hot path: a failed map leaves the address unmapped (driver contract)
            try:
                driver_map(addr + todo[0] * size, pages[0])
            except BaseException:
                self._give_back(pages, created)
                raise
            self._pages[todo[0]] = pages[0]
            return
        done = 0
        try:
            for index, page in zip(todo, pages, strict=True):
                driver_map(addr + index * size, page)
                done += 1
        except BaseException:
            stuck = _each(self.driver.unmap, [addr + index * size for index in todo[:done]])
            for i in stuck:  # still mapped (the undo itself failed): the range keeps them, truthfully
                self._pages[todo[i]] = pages[i]
            if stuck:
                self.pool.release([page for i, page in enumerate(pages) if i not in stuck])
            else:
                self._give_back(pages, created)
            raise
        self._pages.update(zip(todo, pages, strict=True))

    def _give_back(self, pages: list[Any], created: int | None) -> None:
        if created is None:
            self.pool.release(pages)
        else:
            self.pool.untake(pages, created)

    def page(self, index: int) -> Any:
        """The physical page mapped at ``index`` (InvalidRequestError when none is)."""
        self._check_open()
        index = check_int("index", index, lo=0, hi=self.num_pages - 1)
        if index not in self._pages:
            raise InvalidRequestError(f"index {index}: no page is mapped there")
        return self._pages[index]

    def unmap(self, indices: Iterable[int]) -> int:
        """Unmap the mapped pages among ``indices`` and return them to the pool. Returns how many.

        All or nothing: if a driver call fails, the runs this call unmapped are mapped again with the same
        pages. The caller must make sure no device work still uses them (the cache synchronizes first).
        """
        with self._lock:
            todo = [i for i in self._check_indices(indices) if i in self._pages]
            if not todo:
                return 0
            self._unmap_runs(todo)
            self.pool.release([self._pages.pop(index) for index in todo])
            return len(todo)

    def _unmap_runs(self, todo: list[int]) -> None:
        """Unmap the mapped, sorted pages ``todo`` (one driver call per run of adjacent pages), keeping them in
        ``_pages``. All or nothing: on an error the runs unmapped are mapped again with the same pages."""
        done: list[int] = []
        try:
            for start, stop in _runs(todo):
                self.driver.unmap_range(self.addr + start * self.page_size, (stop - start) * self.page_size)
                done.extend(range(start, stop))
        except BaseException:
            self._remap(done)
            raise

    def _remap(self, indices: list[int]) -> None:
        """Map ``indices`` again with the pages they had; one that cannot be is dropped and released."""
        size, pages = self.page_size, self._pages
        lost = _each(lambda i: self.driver.map(self.addr + i * size, pages[i]), indices)
        if lost:
            self.pool.release([pages.pop(indices[i]) for i in lost])

    def tensor(self) -> torch.Tensor:
        """A uint8 tensor over the whole range (it does not own the memory; close() invalidates it)."""
        self._check_open()
        return self.driver.tensor(self.addr, self.nbytes)

    def close(self) -> None:
        """Unmap every page, return them to the pool, and give the address range back. A close that raised
        may be called again."""
        with self._lock:
            if self._closed:
                return
            todo = sorted(self._pages)
            self._unmap_runs(todo)
            try:
                self.driver.free_range(self.addr, self.nbytes)
            except BaseException:
                self._remap(todo)
                raise
            self.pool.release([self._pages.pop(index) for index in todo])
            self._closed = True
            self._finalizer.detach()

    def __enter__(self) -> VirtualRange:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pairs(pairs: Any) -> list[tuple[int, int]]:
    if isinstance(pairs, (str, bytes, dict)) or not isinstance(pairs, Iterable):
        raise InvalidRequestError(f"pairs must be a sequence of (src, dst) pairs, got {type(pairs).__name__}")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidRequestError(f"pairs[{i}] must be a (src, dst) pair of ints, got {pair!r}")
        out.append((check_int(f"pairs[{i}][0]", pair[0]), check_int(f"pairs[{i}][1]", pair[1])))
    return out


def _each(call: Any, items: list[Any]) -> list[int]:
    """Call ``call(item)`` for every item, going on past failures; returns the positions that failed."""
    failed = []
    for i, item in enumerate(items):
        try:
            call(item)
        except BaseException:  # an undo: the original error propagates, this one is recorded by its effect
            failed.append(i)
    return failed


def _drop(driver: Driver, pool: PagePool, addr: int, nbytes: int, pages: dict[int, Any]) -> None:
    """The finalizer of a range collected without close(): wait for the device, unmap, give pages back."""
    driver.synchronize()
    for start, stop in _runs(sorted(pages)):
        driver.unmap_range(addr + start * driver.page_size, (stop - start) * driver.page_size)
    pool.release(list(pages.values()))
    pages.clear()
    driver.free_range(addr, nbytes)


def _runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive values in sorted, distinct ``indices``."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
