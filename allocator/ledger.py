# SPDX-License-Identifier: Apache-2.0
"""The page budget shared by every process on one GPU: a small per-user ledger in shared memory.

One file per user and device (``/dev/shm/vkv-<uid>/ledger-<device>``, mode 0600, in a 0700 directory; the
directory can be set with $VKV_LEDGER_DIR or ``directory=``) holds a header and a fixed table of entries,
one per model: its process, pages mapped and in use, a limit, a minimum, a priority, and how many pages
other models asked it to give back. The file itself (layout, lock, validated rows) is ledger_file.py's;
this module holds the rules.

The rule that keeps the budget: a model counts pages here (``try_grow``/``grow``) *before* it maps them
and uncounts them (``shrink``) *after* it has unmapped them, so the pages really mapped on the device
never exceed what the ledger counts, which never exceeds the budget. Entries of processes that died are
reclaimed (``reap_dead``) by whoever looks next, once the driver has freed their pages: a killed process leaves
/proc before the driver has torn its memory down (tens of ms on an H100), so while NVML still lists its pid
(``Ledger.holders``) its entry keeps its pages counted, its name free for a new model and nothing asked of it,
for at most DYING_MAX_S. Without NVML (no NVIDIA driver) an entry is reclaimed as soon as its process is gone;
every process reaps, so one that cannot use NVML (or whose NVML answer fails) frees such an entry at once.

Every operation reads the table under the lock (waiting at most ``lock_timeout_s``, then LedgerBusyError
naming the holder), checks everything, then writes it back once: a refused or failed call leaves the file
as it was. Every row is validated when it is read. An invalid row (a negative or absurd count, in use over
mapped, a bad flag, pid or name) of a process that is gone is reaped like any dead entry: its pages died with
it. One of a live process raises a LedgerError naming the entry, its model and pid, and the remedy (stop that
process, or remove the file): counting it as anything would break the budget one way or the other.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .checks import INT64_MAX, check_count, check_int, check_multiple, check_positive, is_int
from .errors import InvalidRequestError, OutOfPagesError
from .ledger_file import (
    MAX_ENTRIES,
    NAME_BYTES,
    LedgerFile,
    Row,
    Table,
    alive,
    create_file,
    device_name,
    make_private_directory,
    open_fd,
    pid_namespace,
    proc_start,
)
from .ledger_file import EntryInfo as EntryInfo
from .ledger_file import LedgerBusyError as LedgerBusyError
from .ledger_file import LedgerError as LedgerError
from .ledger_file import LedgerStats as LedgerStats
from .ledger_file import default_path as default_path
from .ledger_file import format_bytes as format_bytes
from .ledger_file import ledger_devices as ledger_devices
from .nvml import device_holders

LOCK_SLACK_S = 0.05  # the least a deadline-bound call (grow) waits for the lock, however late it is
_FINALIZER_LOCK_S = 0.01  # a dropped ledger unregisters its entries only if the lock is free at once
DYING_MAX_S = 5.0  # the longest a dead process's pages stay counted while NVML still lists it
HOLDERS_FRESH_S = 0.005  # an answer of ``holders`` is reused this long (it is asked only while a dead entry waits)


def _seconds(name: str, value: Any, *, positive: bool = False) -> float:
    number = is_int(value) or isinstance(value, float)
    if not number or not math.isfinite(value) or value < 0 or (positive and not value):
        expected = "> 0" if positive else ">= 0"
        raise InvalidRequestError(f"{name} must be a finite number of seconds {expected}, got {value!r}")
    return float(value)


def _unregister_and_close(file: LedgerFile, mine: set[int], pid: int, start: int) -> None:
    """The end of a ledger (close() or garbage collection): clear this process's entries, close the file."""
    try:
        if mine and os.getpid() == pid:
            file.lock(_FINALIZER_LOCK_S)
            try:
                table = file.read()
                for i in mine:
                    row = table.row(i)
                    if row.used and (row.pid, row.pid_start) == (pid, start):
                        table.put(i, Row())
                file.write(table)
            finally:
                file.unlock()
    except LedgerError:
        pass  # busy or damaged: the entries are reaped once this process is gone
    finally:
        mine.clear()
        file.close()


class Ledger:
    """One device's shared page budget, as one process sees it. Thread-safe. Make one with :meth:`open`.

    Pages are counted here before they are mapped (``grow``) and uncounted after they are unmapped
    (``shrink``). A model's mapper thread polls ``asked`` and gives idle pages back when others need them.
    A ledger dropped without :meth:`close` is closed (and its entries unregistered) when collected.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "ledger")  # default: /dev/shm/vkv-<uid>/ledger-<device>
    >>> ledger = Ledger.open(budget_bytes=48 << 20, page_size=2 << 20, path=path)
    >>> me = ledger.register("llama-8b", priority=1)
    >>> ledger.grow(me, 4)  # count 4 pages, then map them
    >>> ledger.shrink(me, 4)  # after unmapping them
    >>> [(e.name, e.pages_mapped, e.mapped_total) for e in ledger.entries()]
    [('llama-8b', 0, 4)]
    >>> ledger.close()
    """

    def __init__(self, file: LedgerFile, lock_timeout_s: float, device: str | None = None):
        self.path, self.page_size, self.lock_timeout_s = file.path, file.page_size, lock_timeout_s
        self.device = device  # the device whose pages it counts (None: opened by path, not said)
        self._file, self._ns = file, pid_namespace()
        # the pids still holding device memory (None: unknown); a dead entry's pages count while its pid is listed
        self.holders: Callable[[], set[int] | None] = device_holders
        self._start_here()

    def _start_here(self) -> None:
        """This process's view: its pid, a thread lock, its entries and the finalizer that clears them."""
        self._pid, self._start = os.getpid(), proc_start(os.getpid(), exiting=True)  # (the main thread may be gone)
        self._tlock, self._mine = threading.Lock(), set()
        self._dying: dict[tuple[int, int], float] = {}  # (pid, start) of a dead entry still listed -> first seen dead
        self._held: tuple[float, set[int]] = (-1.0, set())  # when holders() was last asked, its answer
        self._finalizer = weakref.finalize(self, _unregister_and_close, self._file, self._mine, self._pid, self._start)

    @classmethod
    def open(
        cls,
        device: str | int = "0",
        *,
        budget_bytes: int | None = None,
        page_size: int | None = None,
        path: str | os.PathLike | None = None,
        directory: str | os.PathLike | None = None,
        max_entries: int = MAX_ENTRIES,
        lock_timeout_s: float = 1.0,
    ) -> Ledger:
        """Open the ledger of ``device`` (the file ``path``, else ``ledger-<device>`` in ``directory``, else in
        $VKV_LEDGER_DIR, else in ``/dev/shm/vkv-<uid>``), creating it (which needs ``budget_bytes``, a whole
        number of pages, and ``page_size``). One ledger per device: a pool checks that its driver's device is the
        ledger's (``Ledger.device``, the device's name; None when opened by ``path``), so pass the pool's
        (``Ledger.open(pool_device)``; the default "0" is the first device's). An existing ledger keeps its own
        budget (change it with :meth:`set_budget`); its page size must match. A call that cannot take the file's
        lock within ``lock_timeout_s`` raises LedgerBusyError.
        """
        if page_size is not None:
            page_size = check_positive("page_size", page_size, hi=1 << 40)
        if budget_bytes is not None:
            budget_bytes = (
                check_count("budget_bytes", budget_bytes, hi=INT64_MAX)
                if page_size is None
                else check_multiple("budget_bytes", budget_bytes, page_size, hi=INT64_MAX)
            )
        max_entries = check_int("max_entries", max_entries, lo=1, hi=4096)
        lock_timeout_s = _seconds("lock_timeout_s", lock_timeout_s, positive=True)
        if path is not None and directory is not None:
            raise InvalidRequestError("pass path (the ledger file) or directory (where it lives), not both")
        name = None
        if path is None:
            name = device_name(device)
            path = default_path(name, directory)
            make_private_directory(os.path.dirname(path))
        elif not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise InvalidRequestError(f"path must be a non-empty file path, got {path!r}")
        path = os.fspath(path)
        try:
            fd = open_fd(path)
        except FileNotFoundError:
            if budget_bytes is None or page_size is None:
                raise LedgerError(
                    f"no ledger at {path}: no vkv process has created one (creating needs budget_bytes and page_size)"
                ) from None
            create_file(path, page_size, budget_bytes // page_size, max_entries)
            fd = open_fd(path)
        try:
            file = LedgerFile(path, fd, lock_timeout_s)
        except BaseException:
            os.close(fd)
            raise
        ledger = cls(file, lock_timeout_s, name)
        if page_size is not None and page_size != ledger.page_size:
            ledger.close()
            raise LedgerError(f"the ledger at {path} counts pages of {ledger.page_size} bytes, not {page_size}")
        try:
            ledger._holding()  # NVML's first use (import, init) here, not under the file's lock; reap_dead reuses it
            ledger.reap_dead()
        except BaseException:
            ledger.close()
            raise
        return ledger

    # -- the table, locked --

    @contextlib.contextmanager
    def _table(self, deadline: float | None = None) -> Iterator[Table]:
        """The table under the thread lock and the file lock; written back if the body changed it and returned
        normally. The lock wait is lock_timeout_s, cut to what is left before ``deadline`` (at least a slack)."""
        if not self._finalizer.alive:
            raise LedgerError(f"the ledger {self.path} has been closed")
        if os.getpid() != self._pid:  # a forked child shares the parent's open file, hence its flock
            self._reopen_after_fork()
        wait = self.lock_timeout_s
        if deadline is not None:
            wait = min(wait, max(deadline - time.monotonic(), LOCK_SLACK_S))
        until = time.monotonic() + wait
        if not self._tlock.acquire(timeout=wait):
            raise LedgerBusyError(self._file.busy(wait, "; another thread of this process waits for it"))
        try:
            self._file.lock(max(0.0, until - time.monotonic()))
            try:
                table = self._file.read()
                yield table
                if table.dirty:
                    self._file.write(table)
            finally:
                self._file.unlock()
        finally:
            self._tlock.release()

    def _reopen_after_fork(self) -> None:
        self._finalizer.detach()  # the parent's entries stay the parent's
        self._file.close()  # this child's copy of the descriptor (the parent keeps its own)
        fd = open_fd(self.path)
        try:
            self._file = LedgerFile(self.path, fd, self.lock_timeout_s)
        except BaseException:
            os.close(fd)
            raise
        self._start_here()

    def _index(self, entry: Any) -> int:
        return check_int("entry", entry, lo=0, hi=self._file.max_entries - 1)

    def _count(self, pages: Any) -> int:
        return check_count("pages", pages, hi=self._file.max_pages)

    def _own(self, t: Table, entry: int) -> Row:
        row = t.row(entry)
        if not row.used or row.pid != self._pid or row.pid_start != self._start:
            raise LedgerError(f"entry {entry} of {self.path} is not registered by this process (pid {self._pid})")
        return row

    def _find(self, t: Table, name: str) -> tuple[int, Row]:
        rows = t.used()
        for i, row in rows:
            if row.label == name and self._live(row):
                return i, row
        live = ", ".join(repr(row.label) for _, row in rows if self._live(row)) or "none"
        raise LedgerError(f"no model named {name!r} in the ledger at {self.path}; live models: {live}")

    def _reap(self, t: Table) -> list[str]:
        """Free the rows of dead processes the driver no longer lists; the others stay (``_dying``). Their names."""
        dead = [(i, row) for i, row in t.used() if not alive(row, self._ns)]
        held, now, dying, gone = self._holding() if dead else set(), time.monotonic(), {}, []
        for i, row in dead:
            key = (row.pid, row.pid_start)
            since = self._dying.get(key, now)
            if row.pid in held and now - since < DYING_MAX_S:
                dying[key] = since
            else:
                t.put(i, Row())
                gone.append(row.label)
        self._dying = dying
        return gone

    def _holding(self) -> set[int]:
        """The pids ``holders`` lists (asked at most every HOLDERS_FRESH_S); none where it cannot tell."""
        at, pids = self._held
        if time.monotonic() - at >= HOLDERS_FRESH_S:
            try:
                pids = self.holders() or set()
            except Exception:  # noqa: BLE001 - unknown: reap as if nothing held it
                pids = set()
            self._held = (time.monotonic(), pids)
        return pids

    def _live(self, row: Row) -> bool:
        """Not a dead entry kept while the driver frees its pages (valid after this hold's ``_reap``)."""
        return (row.pid, row.pid_start) not in self._dying

    def _limit_pages(self, limit_bytes: Any) -> int:
        """A limit in whole pages (a byte count that is not whole pages is refused); 0 for None (no limit)."""
        if limit_bytes is None:
            return 0
        if check_count("limit_bytes", limit_bytes, hi=INT64_MAX) < self.page_size:
            raise InvalidRequestError(
                f"limit_bytes must be at least one page ({format_bytes(self.page_size)}), got {limit_bytes} bytes; "
                "no limit is None ('none' for vkv limit)"
            )
        return check_multiple("limit_bytes", limit_bytes, self.page_size) // self.page_size

    @staticmethod
    def _name(name: Any) -> bytes:
        try:
            raw = name.encode("utf-8") if isinstance(name, str) else b""
        except UnicodeEncodeError:
            raw = b""
        if not raw or len(raw) > NAME_BYTES or not name.isprintable():
            raise InvalidRequestError(
                f"a model name must be 1 to {NAME_BYTES} utf-8 bytes of printable characters, got {name!r}"
            )
        return raw

    # -- models --

    def register(self, name: str, *, limit_bytes: int | None = None, min_bytes: int = 0, priority: int = 0) -> int:
        """Add a model of this process; returns its entry index. Lower ``priority`` gives pages back first;
        ``min_bytes`` (rounded up to pages) is never asked back; ``limit_bytes`` is rounded down to pages. Names
        are unique among live models."""
        raw = self._name(name)
        limit = self._limit_pages(limit_bytes)
        least = -(-check_count("min_bytes", min_bytes, hi=INT64_MAX) // self.page_size)
        if limit and limit < least:
            raise InvalidRequestError(f"limit {limit} pages is below the minimum {least} pages")
        priority = check_int("priority", priority, lo=-(1 << 31), hi=(1 << 31) - 1)
        with self._table() as t:
            self._reap(t)
            for _, row in t.used():
                if row.label == name and self._live(row):
                    raise LedgerError(
                        f"model name {name!r} is already registered in {self.path} by live pid {row.pid}; "
                        "pick another name or stop that process"
                    )
            free = t.free_index()
            if free is None:
                raise LedgerError(f"the ledger at {self.path} is full: {t.file.max_entries} models are registered")
            t.put(free, Row(1, priority, raw, self._pid, self._start, self._ns, limit=limit, min=least))
        self._mine.add(free)
        return free

    def unregister(self, entry: int) -> None:
        """Remove a model of this process; pages it still counts go back to the budget."""
        entry = self._index(entry)
        with self._table() as t:
            self._own(t, entry)
            t.put(entry, Row())
        self._mine.discard(entry)

    def try_grow(self, entry: int, pages: int) -> bool:
        """Count ``pages`` more for ``entry`` if the device budget and its limit allow it, else change nothing."""
        entry, pages = self._index(entry), self._count(pages)
        with self._table() as t:
            return self._try_grow(t, entry, pages) is None

    def _try_grow(self, t: Table, entry: int, pages: int) -> str | None:
        row = self._own(t, entry)
        if row.limit and row.mapped + pages > row.limit:
            return "limit"
        total = sum(r.mapped for _, r in t.used())
        if total + pages > t.budget and (not self._reap(t) or sum(r.mapped for _, r in t.used()) + pages > t.budget):
            return "budget"
        row.mapped += pages
        row.mapped_total = min(row.mapped_total + pages, INT64_MAX)
        t.put(entry, row)
        return None

    def grow(self, entry: int, pages: int, *, timeout_s: float = 2.0, poll_s: float = 0.005) -> None:
        """Count ``pages`` more for ``entry``; if the budget is short, ask idle models to give pages back and
        wait up to ``timeout_s`` (lock waits included, plus at most LOCK_SLACK_S) while pages are on their way:
        asked of idle models, or held by an exited process the driver is still freeing. When none are (every
        page of the others holds live data), it refuses at once rather than wait out the timeout. Raises
        OutOfPagesError having changed nothing (its requests are withdrawn), or LedgerBusyError if the lock
        stays taken (requests it made before stay: they only make idle models give pages back)."""
        entry, pages = self._index(entry), self._count(pages)
        timeout_s, poll_s = _seconds("timeout_s", timeout_s), _seconds("poll_s", poll_s, positive=True)
        start = time.monotonic()
        deadline = start + timeout_s
        mine: dict[tuple[int, int, bytes], int] = {}  # (index, pid, name) -> pages this call asked of it
        while True:
            with self._table(deadline) as t:
                why = self._try_grow(t, entry, pages)
                if why is None:
                    return
                hopeless = t.row(entry).mapped + pages > t.budget  # more than all of it
                refusal, expected = None, False
                if why == "budget" and not hopeless and time.monotonic() < deadline:
                    pending = sum(min(n, row.asked) for key, n in mine.items() if (row := self._asked_of(t, key)))
                    short = sum(r.mapped for _, r in t.used()) + pages - t.budget - pending
                    asked = self._ask(t, short, exclude=entry)
                    for i, n in asked.items():
                        key = (i, t.row(i).pid, t.row(i).name)
                        mine[key] = mine.get(key, 0) + n
                    # worth waiting for: pages asked of idle models, or a dead process's the driver is freeing.
                    # Else nobody will give any back (every other page holds live data): refuse now, as a pool
                    # of one process does, and let the caller choose (an engine preempts, or retries next step)
                    expected = bool(pending or asked) or any(not self._live(r) for _, r in t.used())
                if not expected:
                    for key, n in mine.items():  # withdraw this call's requests
                        if row := self._asked_of(t, key):
                            row.asked -= min(n, row.asked)
                            t.put(key[0], row)
                    waited = time.monotonic() - start
                    refusal = self._refusal(t, entry, pages, why, sum(mine.values()), waited)
            if refusal is not None:
                raise OutOfPagesError(refusal)
            time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))

    @staticmethod
    def _asked_of(t: Table, key: tuple[int, int, bytes]) -> Row | None:
        """The row a grow asked pages of, if it still belongs to the same model."""
        row = t.row(key[0])
        return row if (row.used, row.pid, row.name) == (1, *key[1:]) else None

    def _ask(self, t: Table, pages: int, exclude: int | None) -> dict[int, int]:
        """Ask other models for up to ``pages`` idle pages, lowest priority (then most idle) first."""
        found = sorted(
            (r.priority, -r.idle(), i) for i, r in t.used() if i != exclude and r.idle() > 0 and self._live(r)
        )
        asked: dict[int, int] = {}
        for _, _, i in found:
            if pages <= 0:
                break
            row = t.row(i)
            n = min(row.idle(), pages)
            row.asked += n
            t.put(i, row)
            asked[i], pages = n, pages - n
        return asked

    def _refusal(self, t: Table, entry: int, pages: int, why: str, asked: int, waited: float) -> str:
        row, size = t.row(entry), self.page_size
        want = f"cannot map {pages} more pages ({format_bytes(pages * size)}) for {row.label!r}"
        if why == "limit":
            return (
                f"{want}: it has {row.mapped} mapped and its limit is {row.limit} pages "
                f"({format_bytes(row.limit * size)}); raise it with `vkv limit {row.label} SIZE`. Nothing was changed."
            )
        rows = t.used()
        held = ", ".join(
            f"{r.label} {r.mapped} (in use {r.in_use}, priority {r.priority})" if self._live(r)
            else f"{r.label} {r.mapped} (its process exited; the driver is still freeing them)"
            for _, r in rows
        )  # fmt: skip
        return (
            f"{want}: the device budget is {t.budget} pages ({format_bytes(t.budget * size)}) and "
            f"{sum(r.mapped for _, r in rows)} are mapped [{held}]; asked idle models for {asked} pages and waited "
            f"{waited:.1f} s. Nothing was changed."
        )

    def shrink(self, entry: int, pages: int) -> None:
        """Uncount ``pages`` of ``entry`` (after unmapping them)."""
        entry, pages = self._index(entry), self._count(pages)
        with self._table() as t:
            row = self._own(t, entry)
            if pages > row.mapped:
                raise InvalidRequestError(f"cannot shrink {row.label!r} by {pages} pages: it has {row.mapped} mapped")
            row.mapped -= pages
            row.in_use = min(row.in_use, row.mapped)
            row.unmapped_total = min(row.unmapped_total + pages, INT64_MAX)
            t.put(entry, row)

    def set_in_use(self, entry: int, pages: int) -> None:
        """Record how many of ``entry``'s mapped pages hold live data (the rest are idle, and can be asked for)."""
        entry, pages = self._index(entry), self._count(pages)
        with self._table() as t:
            row = self._own(t, entry)
            if pages > row.mapped:
                raise InvalidRequestError(f"{row.label!r} cannot use {pages} pages: it has {row.mapped} mapped")
            row.in_use = pages
            t.put(entry, row)

    def ask_release(self, entry: int, pages: int) -> int:
        """Ask other live models to give back up to ``pages`` idle pages (above their minimum), lowest priority
        first. Returns how many were asked for."""
        entry, pages = self._index(entry), self._count(pages)
        with self._table() as t:
            self._own(t, entry)
            self._reap(t)
            return sum(self._ask(t, pages, exclude=entry).values())

    def asked(self, entry: int) -> int:
        """Pages ``entry`` has been asked to give back (its mapper unmaps idle ones, then shrink + clear_asked)."""
        entry = self._index(entry)
        with self._table() as t:
            return self._own(t, entry).asked

    def clear_asked(self, entry: int, pages: int) -> None:
        entry, pages = self._index(entry), self._count(pages)
        with self._table() as t:
            row = self._own(t, entry)
            row.asked -= min(pages, row.asked)
            t.put(entry, row)

    def reap_dead(self) -> list[str]:
        """Free the entries of processes that no longer exist and hold no device memory (an entry whose process
        NVML still lists keeps its pages counted while the driver frees them, DYING_MAX_S at most). Returns the
        names of those freed."""
        with self._table() as t:
            return self._reap(t)

    # -- administration --

    def set_limit(self, name: str, limit_bytes: int | None) -> EntryInfo:
        """Change a live model's limit at run time (None: no limit; rounded down to pages). Growth above it is
        refused and pages over it are asked back. Returns the model's entry as changed."""
        self._name(name)
        limit = self._limit_pages(limit_bytes)
        with self._table() as t:
            self._reap(t)
            i, row = self._find(t, name)
            if limit and limit < row.min:
                raise InvalidRequestError(f"limit {limit} pages is below {name!r}'s minimum of {row.min} pages")
            row.limit = limit
            if limit and row.mapped > limit:
                row.asked = max(row.asked, row.mapped - limit)
            t.put(i, row)
            return self._info(i, row)

    def set_budget(self, budget_bytes: int) -> None:
        """Change the device budget (a whole number of pages). Pages mapped over a lowered budget are asked back
        from idle models."""
        pages = check_multiple("budget_bytes", budget_bytes, self.page_size, hi=INT64_MAX) // self.page_size
        with self._table() as t:
            self._reap(t)
            t.budget = pages
            self._ask(t, sum(r.mapped for _, r in t.used()) - pages, exclude=None)

    @property
    def budget_pages(self) -> int:
        with self._table() as t:
            return t.budget

    def entry(self, entry: int) -> EntryInfo:
        entry = self._index(entry)
        with self._table() as t:
            row = t.row(entry)
            if not row.used:
                raise LedgerError(f"entry {entry} of {self.path} is not registered")
            return self._info(entry, row)

    def _info(self, i: int, r: Row) -> EntryInfo:
        return EntryInfo(
            i, r.label, r.pid, r.mapped, r.in_use, r.limit, r.min, r.priority, r.asked, r.mapped_total,
            r.unmapped_total, r.updated, not self._live(r),
        )  # fmt: skip

    def stats(self) -> LedgerStats:
        """A consistent snapshot of the budget and every live entry (dead ones are reaped first)."""
        return self.audit(lambda: None)[0]

    def audit(self, probe: Callable[[], Any]) -> tuple[LedgerStats, Any]:
        """``(stats(), probe())`` under one hold of the ledger's lock. No process counts pages in while ``probe``
        runs, and a pool counts pages out only after it released them, so every page alive during the probe is
        counted in the snapshot: what ``probe`` measures of the memory really held can be compared with it
        exactly (the stress test's watcher does). Keep ``probe`` short: every grow waits for it. Raises
        LedgerBusyError, as stats() does, if the lock stays busy; then ``probe`` is not called."""
        if not callable(probe):
            raise InvalidRequestError(f"probe must be callable, got {type(probe).__name__}")
        with self._table() as t:
            self._reap(t)
            entries = tuple(self._info(i, row) for i, row in t.used())
            generation = t.generation + t.dirty  # what the file says once a reap is written back
            return LedgerStats(self.path, self.page_size, t.budget, generation, entries), probe()

    def entries(self) -> list[EntryInfo]:
        return list(self.stats().entries)

    def close(self) -> None:
        """Unregister this process's models and close the file. The ledger itself stays for the others.
        If the lock stays busy (or the file is damaged), the entries are reaped once this process is gone."""
        if not self._finalizer.alive:
            return
        if self._mine and os.getpid() == self._pid:
            with contextlib.suppress(LedgerError), self._table() as t:
                for i in self._mine:
                    row = t.row(i)
                    if row.used and (row.pid, row.pid_start) == (self._pid, self._start):
                        t.put(i, Row())
            self._mine.clear()
        self._finalizer()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
