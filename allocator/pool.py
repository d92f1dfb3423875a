# SPDX-License-Identifier: Apache-2.0
"""The physical page pool: pages are created once, handed out, taken back and handed out again.

Several virtual ranges (several models' caches) draw from one pool, so a page one model frees is
reused by another without a new cuMemCreate. The pool holds a budget (:mod:`.budget`): it never has more
pages alive (handed out + free) than the budget covers. ``shrink`` really releases free pages. Every
operation is all-or-nothing: on an error the pages alive, the pool's counts and the budget's (the
ledger's) are as before.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .budget import Budget, LedgerBudget, LocalBudget
from .checks import INT64_MAX, check_count, check_multiple
from .driver import CAPTURE_GATE, Driver, get_driver
from .errorlog import ErrorLog
from .errors import MEMORY_EXHAUSTED, DeviceFullError, DriverError, InvalidRequestError, OutOfPagesError
from .ledger import Ledger, LedgerBusyError

ANSWER_INTERVAL_S = 0.005
DEFAULT_BUDGET_FRACTION = 0.9  # of the device's free memory, when no budget is given


def default_budget_bytes(driver: Driver) -> int:
    """A pool's budget when none is given: 90% of the device's free memory now."""
    return int(driver.memory_info()[0] * DEFAULT_BUDGET_FRACTION)


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
    device_full: int = 0  # cumulative growths refused because the device had no memory for new pages

    @property
    def budget_bytes(self) -> int:
        return self.budget_pages * self.page_size


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
    device : int | None
        The device index, for a driver made here (default: the current device, see
        :func:`~vkv.allocator.driver.current_device`); with a Driver given, its index if not None. One pool per
        device: pools of different devices share no pages and no budget.
    budget_bytes : int | None
        Most bytes of pages alive at once, a multiple of the page size. None: 90% of the device memory
        free now, rounded down to whole pages.
    ledger : Ledger | None
        The device-wide ledger shared with other processes, the one of this pool's device: every page is
        counted there before it is created and uncounted after it is released. A thread of the pool
        (``vkv-pool-<name>``) answers other models' requests to give pages back and publishes how many pages
        are in use.
    name : str | None
        This pool's model name in the ledger.
    ledger_timeout_s : float
        How long a growth may wait for other models to give pages back.
    answer_interval_s : float | None
        How often the pool's thread answers the ledger. None: no thread; call
        :meth:`answer_release_requests` yourself (e.g. from a Mapper's idle hook).

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
        device: int | None = None,
        ledger: Ledger | None = None,
        name: str | None = None,
        ledger_timeout_s: float = 2.0,
        answer_interval_s: float | None = ANSWER_INTERVAL_S,
    ):
        if ledger is not None and not isinstance(ledger, Ledger):
            raise InvalidRequestError(f"ledger must be a vkv Ledger or None, got {type(ledger).__name__}")
        if name is not None and not isinstance(name, str):
            raise InvalidRequestError(f"name must be a str or None, got {type(name).__name__}")
        _check_seconds("ledger_timeout_s", ledger_timeout_s)
        if answer_interval_s is not None:
            _check_seconds("answer_interval_s", answer_interval_s)
        if device is not None:
            device = check_count("device", device)
        if isinstance(driver, Driver):
            device = driver.index if device is None else device
        elif driver is not None and not isinstance(driver, str):
            raise InvalidRequestError(f"driver must be a Driver, a backend name or None, got {type(driver).__name__}")
        booked = None if ledger is None else _ledger_index(ledger)
        if isinstance(driver, Driver) and device != driver.index:
            raise InvalidRequestError(
                f"device {device} was asked for but the driver is device {driver.index}'s; expected the same index"
            )
        if booked is not None and device is not None and device != booked:
            raise InvalidRequestError(
                f"the ledger {ledger.path} counts device {booked}'s pages but this pool is for device {device}; "
                f"expected the ledger of device {device} (Ledger.open({device}))"
            )
        if not isinstance(driver, Driver):
            driver = get_driver(driver, device=device if booked is None else booked)
        self.driver = driver
        self.device, self.page_size = self.driver.index, self.driver.page_size
        if ledger is not None and ledger.page_size != self.page_size:
            raise InvalidRequestError(
                f"the ledger counts pages of {ledger.page_size} bytes but the driver's pages are {self.page_size} "
                f"bytes; expected the same page size (pass page_size={ledger.page_size} to get_driver)"
            )
        if budget_bytes is None:
            limit = default_budget_bytes(self.driver) // self.page_size
        else:
            limit = self._pages_for_budget(budget_bytes)
        self._lock = threading.Lock()
        self._free: list[Any] = []
        self._refs: dict[int, int] = {}  # int(page) -> addresses it is mapped at, for pages in use
        self._handle_type: type | None = None  # the driver's page handles: nothing else is released
        self._reclaimers: list[tuple[Callable[[], Any], Callable[[], Any] | None]] = []
        self._limit = limit  # most pages alive at once (this pool's own budget)
        self._in_use = 0
        self._created = self._released = self._reused = self._device_full = 0
        self.ledger = ledger
        self._budget: Budget
        label = name or f"pool-{os.getpid()}-{id(self):x}"
        if ledger is None:
            self._budget = LocalBudget()
        else:
            self._budget = LedgerBudget(ledger, label, ledger_timeout_s)
        self._answering = threading.Lock()
        self._published: tuple[int, int] | None = None
        self.answer_errors = ErrorLog(keep=16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._uncleared = 0  # requests answered whose clear_asked failed: cleared before the next answer
        if ledger is not None and answer_interval_s is not None:
            self._thread = threading.Thread(
                target=_answer_loop,
                args=(weakref.ref(self), self._stop, answer_interval_s),
                name=f"vkv-pool-{label}",
                daemon=True,
            )
            weakref.finalize(self, self._stop.set)
            self._thread.start()

    def _pages_for_budget(self, budget_bytes: Any) -> int:
        return check_multiple("budget_bytes", budget_bytes, self.page_size, hi=INT64_MAX) // self.page_size

    @property
    def budget_bytes(self) -> int:
        return self._limit * self.page_size

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget. Lowering it below what is in use is refused; free pages over it are released."""
        pages = self._pages_for_budget(budget_bytes)
        with self._lock:
            if pages < self._in_use:
                raise OutOfPagesError(
                    f"cannot lower the budget to {pages} pages: {self._in_use} pages are in use; free some first"
                )
            old, self._limit = self._limit, pages
            excess = max(0, self._in_use + len(self._free) - pages)
            victims = self._take_free(excess)
        try:
            self._release_pages(victims)
        except BaseException:
            with self._lock:
                self._limit = old
            raise

    def available(self) -> int:
        """Pages that acquire() can hand out now: free ones plus those the budget still allows creating."""
        with self._lock:
            return self._limit - self._in_use

    def obtainable(self) -> int:
        """Pages acquire() could hand out now, counting the idle pages the reclaimers would give back."""
        return self.available() + self._could_reclaim()

    def acquire(self, n: int) -> list[Any]:
        """Hand out ``n`` pages, reusing free ones first. All or nothing: raises OutOfPagesError, or the
        driver's DriverError, having handed out nothing."""
        if type(n) is int and n > 0:
            with self._lock:  # the hot path, as in take(): one lock round, no call
                free = self._free
                if n <= len(free) and self._in_use + n <= self._limit:
                    pages = free[len(free) - n :]
                    del free[len(free) - n :]
                    self._reused += n
                    self._in_use += n
                    for page in pages:
                        self._refs[int(page)] = 1
                    return pages
        return self.take(n)[0]

    def take(self, n: int) -> tuple[list[Any], int]:
        """:meth:`acquire`, also saying how many of the pages were created for it (the last ones), so that
        :meth:`untake` can undo it exactly."""
        if type(n) is not int or not 0 <= n <= INT64_MAX:
            n = check_count("n", n, hi=INT64_MAX)
        try:
            return self._take(n)
        except DeviceFullError:
            # The device has no room for new pages: idle pages of this pool's caches can serve instead of new ones
            # (the budget was not short, so _take asked them for none); through a ledger, the other models' idle
            # pages are asked back to the device for what is still missing (the next try). Once more if the
            # caches gave any.
            with self._lock:
                missing = max(0, n - len(self._free))
            got = self.reclaim(missing) if missing and self._could_reclaim() else 0
            if missing > got and self.ledger is not None and self._budget.entry is not None:
                with contextlib.suppress(LedgerBusyError):
                    self.ledger.ask_release(self._budget.entry, missing - got)
            if not got:
                raise
        return self._take(n)

    def _take(self, n: int) -> tuple[list[Any], int]:
        with self._lock:  # the hot path (a decode step's next page): every page comes from the free list
            free = self._free
            if 0 < n <= len(free) and self._in_use + n <= self._limit:
                pages = free[len(free) - n :]
                del free[len(free) - n :]
                self._reused += n
                self._in_use += n
                for page in pages:
                    self._refs[int(page)] = 1
                return pages, 0
        if n == 0:
            return [], 0
        short = n - self.available()
        if short > 0 and self._could_reclaim() >= short:  # else refuse with nothing changed
            self.reclaim(short)
        with self._lock:
            limit = self._limit
            if self._in_use + n > limit:
                raise OutOfPagesError(
                    f"need {n} more pages of {self.page_size >> 10} KiB but only {limit - self._in_use} of "
                    f"the budget's {limit} are available ({self._in_use} in use)"
                )
            pages = self._take_free(n)
            self._in_use += n  # claim the rest of the budget before dropping the lock to create
            for page in pages:
                self._refs[int(page)] = 1
        try:
            created = self._create_pages(n - len(pages))
        except BaseException as exc:
            with self._lock:
                self._in_use -= n
                for page in pages:
                    del self._refs[int(page)]
                self._free.extend(pages)
                full = isinstance(exc, DriverError) and exc.name in MEMORY_EXHAUSTED
                self._device_full += full
                in_use = self._in_use
            if full:  # the budget allowed them; the device has no room: a refusal like the budget's
                raise DeviceFullError(
                    f"need {n - len(pages)} new pages of {self.page_size >> 10} KiB, which the budget allows, but the "
                    f"device has no memory left for them ({exc}); {in_use} pages in use"
                ) from exc
            raise
        with self._lock:
            self._reused += len(pages)
            self._created += len(created)
            for page in created:
                self._refs[int(page)] = 1
        return pages + created, len(created)

    def untake(self, pages: list[Any], created: int) -> None:
        """Undo ``take``: ``pages`` (each referenced once) go back, the ``created`` last ones are released
        and uncounted, the counters are as before. A page the driver will not release stays free."""
        with self._lock:
            for page in pages:
                if self._refs.get(int(page) if type(page) is self._handle_type else None) != 1:
                    raise InvalidRequestError(f"cannot untake {page!r}: it is not a page taken once from this pool")
            for page in pages:
                del self._refs[int(page)]
            self._in_use -= len(pages)
            self._reused -= len(pages) - created
            self._created -= created
            new = pages[len(pages) - created :]
            self._free.extend(pages[: len(pages) - created])
        kept = self._destroy(new)
        with self._lock:
            self._free.extend(kept)
            self._created += len(kept)  # alive: still counted as created
        self._budget.unclaim(created - len(kept))

    def _take_free(self, n: int) -> list[Any]:
        """Take up to ``n`` pages off the end of the free list (call with the lock held)."""
        free = self._free
        n = min(n, len(free))
        pages = free[len(free) - n :]
        del free[len(free) - n :]
        return pages

    def _create_pages(self, n: int) -> list[Any]:
        """Count ``n`` pages in the budget, then create them. All or nothing."""
        if n == 0:
            return []
        self._budget.claim(n)
        created: list[Any] = []
        try:
            for _ in range(n):
                created.append(self.driver.create_page())
        except BaseException:
            kept = self._destroy(created)
            self._budget.unclaim(n - len(kept))
            with self._lock:
                self._free.extend(kept)  # could not be released: alive, counted, reusable
            raise
        self._handle_type = type(created[0])
        return created

    def _destroy(self, pages: list[Any]) -> list[Any]:
        """Release ``pages`` to the driver as far as it lets us; returns those still alive."""
        for i, page in enumerate(pages):
            try:
                self.driver.release_page(page)
            except BaseException:
                return pages[i:]
        return []

    def _release_pages(self, victims: list[Any]) -> None:
        """Release free pages already taken off the free list, then uncount them. All or nothing: on an
        error the pages released are created again (free pages hold no data), so every victim or its
        replacement is back on the free list and the budget counts the same."""
        if not victims:
            return
        done = 0
        try:
            for page in victims:
                self.driver.release_page(page)
                done += 1
            self._wait_for_device()  # counted out once freed: the driver may free them after queued work has run
            self._budget.unclaim(len(victims))
        except BaseException:
            back = victims[done:]
            try:
                while len(back) < len(victims):
                    back.append(self.driver.create_page())
            finally:
                with self._lock:
                    self._free.extend(back)
                if len(back) < len(victims):  # some could not be made again: uncount exactly those
                    self._budget.unclaim(len(victims) - len(back))
            raise
        with self._lock:
            self._released += len(victims)

    def _wait_for_device(self) -> None:
        """Wait for the device's queued work, so that the pages just released are freed before the budget counts them
        out. Skipped while vkv captures a CUDA graph (the sync would break it); a failure only costs that precision
        (the pages are released, and a sticky device error shows at the next call)."""
        with contextlib.suppress(Exception):  # see above
            CAPTURE_GATE.sync(self.driver.synchronize)

    def retain(self, page: Any) -> None:
        """Add a reference to a page in use (it is being mapped at one more address)."""
        with self._lock:
            key = int(page) if type(page) is self._handle_type else None
            if key not in self._refs:
                raise InvalidRequestError(f"cannot retain {page!r}: it is not a page this pool handed out")
            self._refs[key] += 1

    def add_reclaimer(self, reclaim: Callable[[int], int], idle: Callable[[], int] | None = None) -> None:
        """Register ``reclaim(pages) -> pages released``, asked for idle pages when the budget is short;
        ``idle()`` says how many it could give (published to the ledger so other models know whom to ask).
        Bound methods are held weakly: a cache dropped without close() leaves the pool with its pages."""
        entry = (_weak(reclaim), None if idle is None else _weak(idle))
        with self._lock:
            self._reclaimers.append(entry)

    def remove_reclaimer(self, reclaim: Callable[[int], int]) -> None:
        with self._lock:
            self._reclaimers = [(r, i) for r, i in self._reclaimers if r() is not None and r() != reclaim]

    def _live_reclaimers(self) -> list[tuple[Callable[[int], int], Callable[[], int] | None]]:
        """The reclaimers still alive (dead ones are dropped)."""
        with self._lock:
            live = [(r(), None if i is None else i()) for r, i in self._reclaimers]
            self._reclaimers = [e for e, (r, _) in zip(self._reclaimers, live, strict=True) if r is not None]
        return [(r, i) for r, i in live if r is not None]

    def _could_reclaim(self) -> int:
        """Idle pages the reclaimers could give back (unbounded if one of them cannot say)."""
        reclaimers = self._live_reclaimers()
        if any(idle is None for _, idle in reclaimers):
            return 1 << 62
        return sum(idle() for _, idle in reclaimers)

    def reclaim(self, pages: int) -> int:
        """Ask the reclaimers for ``pages`` idle pages back (onto the free list). Returns how many came."""
        pages = check_count("pages", pages, hi=INT64_MAX)
        got = 0
        for reclaim, _ in self._live_reclaimers():
            if got >= pages:
                break
            got += reclaim(pages - got)
        return got

    def release(self, pages: list[Any]) -> None:
        """Drop one reference to each page (it was unmapped at one address); a page whose last reference
        goes returns to the free list. Anything that is not a page in use here is refused, before any
        reference is dropped."""
        with self._lock:
            refs, handle = self._refs, self._handle_type
            if type(pages) is list and len(pages) == 1 and type(pages[0]) is handle:  # one page: an unmap
                counts = {int(pages[0]): 1}
            else:
                if not isinstance(pages, (list, tuple)):
                    raise InvalidRequestError(f"pages must be a list of pages, got {type(pages).__name__}")
                for i, page in enumerate(pages):
                    if type(page) is not handle:
                        raise InvalidRequestError(f"pages[{i}] = {page!r} is not a page this pool handed out")
                counts = Counter(int(page) for page in pages)
            for key, count in counts.items():  # check all before changing any
                if refs.get(key, 0) < count:
                    raise InvalidRequestError(
                        f"page {key} released {count} times but it is in use at {refs.get(key, 0)} addresses"
                    )
            for page in pages:
                key = int(page)
                refs[key] -= 1
                if refs[key] == 0:
                    del refs[key]
                    self._in_use -= 1
                    self._free.append(page)

    def shrink(self, keep: int = 0) -> int:
        """Really release free pages to the device/OS, keeping ``keep`` for reuse. Returns how many went.
        All or nothing."""
        keep = check_count("keep", keep, hi=INT64_MAX)
        with self._lock:
            victims = self._take_free(len(self._free) - keep)
        self._release_pages(victims)
        return len(victims)

    def _shrink_by(self, pages: int) -> int:
        with self._lock:
            victims = self._take_free(pages)
        self._release_pages(victims)
        return len(victims)

    def answer_release_requests(self) -> int:
        """Give back the pages other models asked this one for through the ledger: free pages first,
        then idle pages the reclaimers (caches) hand over. Also publishes how many pages are in use.
        Returns the pages released. The pool's own thread runs it every 5 ms; calling it too (a Mapper
        hook) is safe: one call answers at a time, another returns 0 meanwhile."""
        if self.ledger is None or not self._answering.acquire(blocking=False):
            return 0
        try:
            if self._budget.entry is None:
                return 0
            if self._uncleared:
                self._budget.clear_asked(self._uncleared)
                self._uncleared = 0
            asked = self._budget.asked()
            released = 0
            if asked:
                released = self._shrink_by(asked)
                if released < asked:
                    self.reclaim(asked - released)
                    released += self._shrink_by(asked - released)
                self._uncleared = asked  # answered: never answered twice, even if clearing fails now
                self._budget.clear_asked(asked)
                self._uncleared = 0
            self._publish()
            return released
        finally:
            self._answering.release()

    def _publish(self) -> None:
        idle = sum(count() for _, count in self._live_reclaimers() if count is not None)
        with self._lock:
            now = (self._in_use - idle, self._budget.counted)
        if now != self._published:
            self._budget.publish(now[0])
            self._published = now

    @property
    def device_full(self) -> int:
        """Growths refused so far because the device had no memory for new pages (:class:`DeviceFullError`)."""
        return self._device_full

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                page_size=self.page_size,
                budget_pages=self._limit,
                live=self._in_use + len(self._free),
                in_use=self._in_use,
                free=len(self._free),
                created=self._created,
                released=self._released,
                reused=self._reused,
                device_full=self._device_full,
            )

    def close(self) -> None:
        """Stop answering the ledger and release every free page. Pages still in use stay with their owners.
        Leaves the ledger when nothing is alive any more."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.shrink(keep=0)
        with self._answering:
            if self.stats().live == 0:
                self._budget.close()


def _ledger_index(ledger: Ledger) -> int | None:
    """The device index of a ledger opened by device (None: opened by path, or a device named otherwise)."""
    name = ledger.device
    return int(name) if name is not None and name.isdigit() else None


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise InvalidRequestError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


def _weak(fn: Callable) -> Callable[[], Callable | None]:
    """A weak reference to a bound method (its object may be collected); a plain function is kept."""
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        return weakref.WeakMethod(fn)
    return lambda: fn


def _answer_loop(pool_ref: weakref.ref[PagePool], stop: threading.Event, interval_s: float) -> None:
    """The pool's ledger thread: answers release requests and publishes in-use until the pool is closed or
    collected. Errors are kept in ``pool.answer_errors``; the thread never dies of one."""
    while not stop.wait(interval_s):
        pool = pool_ref()
        if pool is None:
            return
        try:
            pool.answer_release_requests()
        except LedgerBusyError:  # another process holds the ledger's lock: the next poll retries
            pass
        except Exception as e:  # noqa: BLE001 - kept and counted, never silent
            pool.answer_errors.record(e)
        del pool
