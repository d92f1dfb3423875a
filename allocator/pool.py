# SPDX-License-Identifier: Apache-2.0
"""The physical page pool: pages are created once, handed out, taken back and handed out again.

Several virtual ranges (several models' caches) draw from one pool, so a page one model frees is
reused by another without a new cuMemCreate. The pool holds a byte budget: it never has more pages
alive (handed out + free) than the budget covers. ``shrink`` really releases free pages.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .driver import Driver, get_driver
from .errors import InvalidRequestError, OutOfPagesError
from .ledger import Ledger


@dataclass(frozen=True, slots=True)
class PoolStats:
    page_size: int
    budget_pages: int
    live: int  # pages that exist now: in_use + free
    in_use: int  # handed out (mapped somewhere)
    free: int  # created, not handed out, kept for reuse
    created: int  # cumulative driver page creations
    released: int  # cumulative driver page releases
    reused: int  # cumulative hand-outs served from the free list

    @property
    def budget_bytes(self) -> int:
        return self.budget_pages * self.page_size

    @property
    def in_use_bytes(self) -> int:
        return self.in_use * self.page_size


class PagePool:
    """A budgeted free list of physical pages over one driver. Thread-safe.

    A page handed out has a reference count: one per address it is mapped at (prefix sharing maps one
    page into several slots). It returns to the free list when the last reference is released.
    Under budget pressure ``acquire`` first asks the registered reclaimers (caches holding pages of
    finished requests) to give pages back.

    Parameters
    ----------
    driver : Driver | str | None
        A driver, or a backend name for :func:`get_driver` (None: cuda when usable, else host).
    budget_bytes : int | None
        Most bytes of pages alive at once. None: 90% of the device memory free now.
    ledger : Ledger | None
        The device-wide ledger shared with other processes: every page is counted there before it is
        created and uncounted after it is released, and requests from other models to give pages back
        are answered by :meth:`answer_release_requests` (run it from a Mapper's idle hook).
    name : str | None
        This pool's model name in the ledger.

    Examples
    --------
    >>> pool = PagePool("host", budget_bytes=64 << 20)
    >>> pages = pool.acquire(3)
    >>> pool.release(pages)
    >>> pool.stats().free
    3
    """

    def __init__(
        self,
        driver: Driver | str | None = None,
        budget_bytes: int | None = None,
        *,
        ledger: Ledger | None = None,
        name: str | None = None,
        ledger_timeout_s: float = 2.0,
    ):
        self.driver = driver if isinstance(driver, Driver) else get_driver(driver)
        self.page_size = self.driver.page_size
        self._lock = threading.Lock()
        self._free: list[Any] = []
        self._refs: dict[int, int] = {}  # int(page) -> addresses it is mapped at, for pages in use
        self._reclaimers: list[Callable[[int], int]] = []
        self._idle_counters: dict[Callable[[int], int], Callable[[], int]] = {}
        self._in_use = 0
        self._created = self._released = self._reused = 0
        if budget_bytes is None:
            budget_bytes = int(self.driver.memory_info()[0] * 0.9)
        self._budget = self._pages_for_budget(budget_bytes)
        self.ledger, self.ledger_timeout_s = ledger, ledger_timeout_s
        self._entry = None if ledger is None else ledger.register(name or f"pool-{os.getpid()}-{id(self):x}")

    def _pages_for_budget(self, budget_bytes: int) -> int:
        if budget_bytes < 0:
            raise InvalidRequestError(f"budget_bytes must be >= 0, got {budget_bytes}")
        return budget_bytes // self.page_size

    @property
    def budget_bytes(self) -> int:
        return self._budget * self.page_size

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget. Lowering it below what is in use is refused; free pages over it are released."""
        pages = self._pages_for_budget(budget_bytes)
        with self._lock:
            if pages < self._in_use:
                raise OutOfPagesError(
                    f"cannot lower the budget to {pages} pages: {self._in_use} pages are in use; free some first"
                )
            self._budget = pages
        self.shrink(keep=max(0, pages - self._in_use))

    def available(self) -> int:
        """Pages that acquire() can hand out now: free ones plus those the budget still allows creating."""
        with self._lock:
            return self._budget - self._in_use

    def obtainable(self) -> int:
        """Pages acquire() could hand out now, counting the idle pages the reclaimers would give back."""
        return self.available() + self._could_reclaim()

    def acquire(self, n: int) -> list[Any]:
        """Hand out ``n`` pages, reusing free ones first. All or nothing: raises OutOfPagesError, or the
        driver's DriverError, having handed out nothing."""
        if n < 0:
            raise InvalidRequestError(f"cannot acquire {n} pages")
        with self._lock:  # the hot path (a decode step's next page): every page comes from the free list
            free = self._free
            if 0 < n <= len(free) and self._in_use + n <= self._budget:
                pages = free[len(free) - n :]
                del free[len(free) - n :]
                self._reused += n
                self._in_use += n
                for page in pages:
                    self._refs[int(page)] = 1
                return pages
        short = n - self.available()
        if short > 0 and self._reclaimers and self._could_reclaim() >= short:  # else refuse with nothing changed
            self.reclaim(short)
        with self._lock:
            if self._in_use + n > self._budget:
                raise OutOfPagesError(
                    f"need {n} more pages of {self.page_size >> 10} KiB but only {self._budget - self._in_use} of "
                    f"the budget's {self._budget} are available ({self._in_use} in use)"
                )
            free = self._free
            reused = min(n, len(free))
            pages = free[len(free) - reused :]
            del free[len(free) - reused :]
            self._reused += reused
            self._in_use += n  # claim the rest of the budget before dropping the lock to create
            for page in pages:
                self._refs[int(page)] = 1
        if reused == n:
            return pages
        if self.ledger is not None:
            try:  # count the new pages device-wide first; may ask other processes to give pages back
                self.ledger.grow(self._entry, n - reused, timeout_s=self.ledger_timeout_s)
            except BaseException:
                with self._lock:
                    self._in_use -= n
                    for page in pages:
                        del self._refs[int(page)]
                    self._free.extend(pages)
                raise
        try:
            for _ in range(n - reused):
                page = self.driver.create_page()
                with self._lock:
                    self._created += 1
                    self._refs[int(page)] = 1
                pages.append(page)
        except BaseException:
            with self._lock:
                self._in_use -= n
                for page in pages:
                    del self._refs[int(page)]
                self._free.extend(pages)  # the ones created here stay alive (and counted) on the free list
            if self.ledger is not None and n - len(pages):  # uncount what was counted but never created
                self.ledger.shrink(self._entry, n - len(pages))
            raise
        return pages

    def retain(self, page: Any) -> None:
        """Add a reference to a page in use (it is being mapped at one more address)."""
        with self._lock:
            key = int(page)
            if key not in self._refs:
                raise InvalidRequestError("cannot retain a page that is not in use")
            self._refs[key] += 1

    def refcount(self, page: Any) -> int:
        """Addresses the page is mapped at (0 when it is not in use)."""
        with self._lock:
            return self._refs.get(int(page), 0)

    def add_reclaimer(self, reclaim: Callable[[int], int], idle: Callable[[], int] | None = None) -> None:
        """Register ``reclaim(pages) -> pages released``, asked for idle pages when the budget is short;
        ``idle()`` says how many it could give (published to the ledger so other models know whom to ask)."""
        with self._lock:
            self._reclaimers.append(reclaim)
            if idle is not None:
                self._idle_counters[reclaim] = idle

    def remove_reclaimer(self, reclaim: Callable[[int], int]) -> None:
        with self._lock:
            if reclaim in self._reclaimers:
                self._reclaimers.remove(reclaim)
            self._idle_counters.pop(reclaim, None)

    def _could_reclaim(self) -> int:
        """Idle pages the reclaimers could give back (unbounded if one of them cannot say)."""
        with self._lock:
            reclaimers, counters = list(self._reclaimers), dict(self._idle_counters)
        if any(r not in counters for r in reclaimers):
            return 1 << 62
        return sum(counters[r]() for r in reclaimers)

    def reclaim(self, pages: int) -> int:
        """Ask the reclaimers for ``pages`` idle pages back (onto the free list). Returns how many came."""
        got = 0
        for reclaim in list(self._reclaimers):
            if got >= pages:
                break
            got += reclaim(pages - got)
        return got

    def release(self, pages: list[Any]) -> None:
        """Drop one reference to each page (it was unmapped at one address); a page whose last reference
        goes returns to the free list."""
        with self._lock:
            refs = self._refs
            counts = {int(pages[0]): 1} if len(pages) == 1 else Counter(int(page) for page in pages)
            for key, count in counts.items():  # check all before changing any
                if refs.get(key, 0) < count:
                    raise InvalidRequestError("releasing a page more often than it is in use")
            for page in pages:
                key = int(page)
                refs[key] -= 1
                if refs[key] == 0:
                    del refs[key]
                    self._in_use -= 1
                    self._free.append(page)
            excess = len(self._free) + self._in_use - self._budget
        if excess > 0:  # the budget was lowered meanwhile
            self.shrink(keep=len(self._free) - excess)

    def shrink(self, keep: int = 0) -> int:
        """Really release free pages to the device/OS, keeping ``keep`` for reuse. Returns how many went."""
        with self._lock:
            victims, self._free = self._free[keep:], self._free[:keep]
        for i, page in enumerate(victims):
            try:
                self.driver.release_page(page)
            except BaseException:
                with self._lock:
                    self._free.extend(victims[i:])
                    self._released += i
                raise
        with self._lock:
            self._released += len(victims)
        if self.ledger is not None and victims:
            self.ledger.shrink(self._entry, len(victims))
        return len(victims)

    def answer_release_requests(self) -> int:
        """Give back the pages other models asked this one for through the ledger: free pages first,
        then idle pages the reclaimers (caches) hand over. Also publishes how many pages are in use.
        Returns the pages released. Meant for a Mapper's idle hook (the mapper thread)."""
        if self.ledger is None:
            return 0
        asked = self.ledger.asked(self._entry)
        released = 0
        if asked:
            released = self.shrink(keep=max(0, len(self._free) - asked))
            if released < asked:
                self.reclaim(asked - released)
                released += self.shrink(keep=max(0, len(self._free) - (asked - released)))
            self.ledger.clear_asked(self._entry, asked)
        with self._lock:
            in_use, counters = self._in_use, list(self._idle_counters.values())
        self.ledger.set_in_use(self._entry, max(0, in_use - sum(count() for count in counters)))
        return released

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                page_size=self.page_size,
                budget_pages=self._budget,
                live=self._in_use + len(self._free),
                in_use=self._in_use,
                free=len(self._free),
                created=self._created,
                released=self._released,
                reused=self._reused,
            )

    def close(self) -> None:
        """Release every free page. Pages still in use stay with their owners. Leaves the ledger when
        nothing is in use any more."""
        self.shrink(keep=0)
        if self.ledger is not None and self._entry is not None and self.stats().live == 0:
            self.ledger.unregister(self._entry)
            self._entry = None
