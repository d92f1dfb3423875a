# SPDX-License-Identifier: Apache-2.0
"""The page budget shared by every process on one GPU: a small per-user ledger in shared memory.

One file per user and device (``/dev/shm/vkv-<uid>/ledger-<device>``, mode 0600, in a 0700 directory)
holds a header and a fixed table of entries, one per model: its process, pages mapped and in use, a
limit, a minimum, a priority, and how many pages other models asked it to give back. The layout is
fixed binary (``struct``), never pickle. Every read-modify-write holds ``flock(LOCK_EX)`` on the file.

The rule that keeps the budget: a model counts pages here (``try_grow``/``grow``) *before* it maps them
and uncounts them (``shrink``) *after* it has unmapped them, so the pages really mapped on the device
never exceed what the ledger counts, which never exceeds the budget. Entries of processes that died are
reclaimed (``reap_dead``) by whoever looks next: the driver has already freed their pages.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import threading
import time
from collections.abc import Iterator

from .errors import InvalidRequestError, OutOfPagesError, VkvError
from .ledger_file import _ENTRY as _ENTRY
from .ledger_file import _HEADER as _HEADER
from .ledger_file import (
    MAGIC,
    MAX_ENTRIES,
    NAME_BYTES,
    VERSION,
    _alive,
    _check_private,
    _corrupted,
    _count,
    _create_file,
    _open_file,
    _pid_ns,
    _proc_start,
    _Row,
)
from .ledger_file import EntryInfo as EntryInfo
from .ledger_file import LedgerError as LedgerError
from .ledger_file import LedgerStats as LedgerStats
from .ledger_file import default_path as default_path
from .ledger_file import format_bytes as format_bytes


class Ledger:
    """One device's shared page budget, as one process sees it. Thread-safe. Make one with :meth:`open`.

    Pages are counted here before they are mapped (``grow``) and uncounted after they are unmapped
    (``shrink``). A model's mapper thread polls ``asked`` and gives idle pages back when others need them.

    Examples
    --------
    >>> path = os.path.join(tempfile.mkdtemp(), "ledger")  # default: /dev/shm/vkv-<uid>/ledger-<device>
    >>> ledger = Ledger.open(budget_bytes=48 << 20, page_size=2 << 20, path=path)
    >>> me = ledger.register("llama-8b", priority=1)
    >>> ledger.grow(me, 4)  # count 4 pages, then map them
    >>> ledger.shrink(me, 4)  # after unmapping them
    >>> [(e.name, e.pages_mapped, e.mapped_total) for e in ledger.entries()]
    [('llama-8b', 0, 4)]
    >>> ledger.close()
    """

    def __init__(self, path: str, fd: int):
        self.path, self._fd, self._mm = path, fd, None
        self._tlock, self._depth, self._mine = threading.RLock(), 0, set()
        self._pid, self._start, self._ns = os.getpid(), _proc_start(os.getpid()), _pid_ns()
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise

    @classmethod
    def open(
        cls,
        device: str | int = "0",
        *,
        budget_bytes: int | None = None,
        page_size: int | None = None,
        path: str | os.PathLike | None = None,
        max_entries: int = MAX_ENTRIES,
    ) -> Ledger:
        """Open the ledger of ``device``, creating it (which needs ``budget_bytes`` and ``page_size``).

        An existing ledger keeps its own budget (change it with :meth:`set_budget`); its page size must match.
        """
        if path is None:
            path = default_path(device)
            folder = os.path.dirname(path)
            with contextlib.suppress(FileExistsError):
                os.makedirs(folder, mode=0o700)
            st = os.lstat(folder)
            if not stat.S_ISDIR(st.st_mode):
                raise LedgerError(f"{folder} is not a directory; expected vkv's private ledger directory")
            _check_private(folder, st, "directory", 0o700)
        path = os.fspath(path)
        try:
            fd = _open_file(path)
        except FileNotFoundError:
            if budget_bytes is None or page_size is None:
                raise LedgerError(
                    f"no ledger at {path}: no vkv process has created one (creating needs budget_bytes and page_size)"
                ) from None
            if page_size <= 0 or budget_bytes < 0 or not 0 < max_entries <= 4096:
                raise InvalidRequestError(
                    f"page_size {page_size} must be > 0, budget_bytes {budget_bytes} >= 0, max_entries {max_entries} "
                    "in [1, 4096]"
                ) from None
            _create_file(path, page_size, budget_bytes // page_size, max_entries)
            fd = _open_file(path)
        ledger = cls(path, fd)
        if page_size is not None and page_size != ledger.page_size:
            ledger.close()
            raise LedgerError(f"the ledger at {path} counts pages of {ledger.page_size} bytes, not {page_size}")
        ledger.reap_dead()
        return ledger

    def _attach(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self._fd).st_size
            if size < _HEADER.size:
                raise _corrupted(self.path, f"it is {size} bytes, shorter than the {_HEADER.size}-byte header")
            magic, version, hsize, esize, n, page_size, budget, _ = _HEADER.unpack(os.pread(self._fd, _HEADER.size, 0))
            if magic != MAGIC:
                raise _corrupted(self.path, f"it starts with {magic!r}, expected {MAGIC!r}")
            if (version, hsize, esize) != (VERSION, _HEADER.size, _ENTRY.size):
                raise _corrupted(
                    self.path,
                    f"version {version} with {hsize}/{esize}-byte header/entries, expected version {VERSION} with "
                    f"{_HEADER.size}/{_ENTRY.size}",
                )
            if not 0 < n <= 4096 or page_size <= 0 or budget < 0:
                raise _corrupted(self.path, f"its header says {n} entries, page size {page_size}, budget {budget}")
            if size != hsize + n * esize:
                raise _corrupted(self.path, f"it is {size} bytes, expected {hsize + n * esize} for {n} entries")
            self._mm = mmap.mmap(self._fd, size)
            self._size, self._max, self.page_size = size, n, page_size
            for i in range(n):
                row = self._load(i)
                counts = (row.mapped, row.in_use, row.limit, row.min, row.asked)
                if row.used not in (0, 1) or (row.used and (row.pid <= 0 or min(counts) < 0)):
                    raise _corrupted(self.path, f"entry {i} is inconsistent: {row}")
                try:
                    row.name.rstrip(b"\0").decode("utf-8")
                except UnicodeDecodeError:
                    raise _corrupted(self.path, f"entry {i} has a name that is not utf-8: {row.name!r}") from None
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _detach(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._mm is None:
            raise LedgerError(f"the ledger {self.path} has been closed")
        if os.getpid() != self._pid:  # a forked child shares the parent's open file, hence its flock
            self._tlock, self._depth, self._mine = threading.RLock(), 0, set()
            self._pid, self._start = os.getpid(), _proc_start(os.getpid())
            self._detach()
            self._fd = _open_file(self.path)
            self._attach()
        with self._tlock:
            if self._depth == 0:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                size = os.fstat(self._fd).st_size
                if size != self._size or self._mm[:8] != MAGIC:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    raise _corrupted(self.path, f"it changed under vkv ({size} bytes, starts with {self._mm[:8]!r})")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- rows and header (call with the lock held) --

    def _load(self, i: int) -> _Row:
        return _Row(*_ENTRY.unpack_from(self._mm, _HEADER.size + i * _ENTRY.size))

    def _store(self, i: int, row: _Row) -> None:
        row.updated = time.time()
        _ENTRY.pack_into(self._mm, _HEADER.size + i * _ENTRY.size, *(getattr(row, f) for f in _Row.__slots__))
        self._write_header()

    def _rows(self) -> list[tuple[int, _Row]]:
        mm, base, size = self._mm, _HEADER.size, _ENTRY.size
        return [(i, self._load(i)) for i in range(self._max) if mm[base + i * size]]

    def _budget(self) -> int:
        return _HEADER.unpack_from(self._mm, 0)[6]

    def _write_header(self, budget_pages: int | None = None) -> None:
        header = list(_HEADER.unpack_from(self._mm, 0))
        header[6] = header[6] if budget_pages is None else budget_pages
        header[7] += 1  # generation: anything changed
        _HEADER.pack_into(self._mm, 0, *header)

    def _total(self) -> int:
        return sum(row.mapped for _, row in self._rows())

    def _own(self, entry: int) -> _Row:
        if not isinstance(entry, int) or not 0 <= entry < self._max:
            raise InvalidRequestError(f"entry {entry!r} is not an entry index in [0, {self._max})")
        row = self._load(entry)
        if not row.used or row.pid != self._pid or row.pid_start != self._start:
            raise LedgerError(f"entry {entry} of {self.path} is not registered by this process (pid {self._pid})")
        return row

    def _find(self, name: str) -> tuple[int, _Row]:
        rows = self._rows()
        for i, row in rows:
            if row.label == name:
                return i, row
        live = ", ".join(repr(row.label) for _, row in rows) or "none"
        raise LedgerError(f"no model named {name!r} in the ledger at {self.path}; live models: {live}")

    def _pages(self, what: str, nbytes: int, *, ceil: bool = False) -> int:
        if not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidRequestError(f"{what} must be an int >= 0 bytes, got {nbytes!r}")
        return -(-nbytes // self.page_size) if ceil else nbytes // self.page_size

    def _limit_pages(self, limit_bytes: int | None) -> int:
        if limit_bytes is None:
            return 0
        pages = self._pages("limit_bytes", limit_bytes)
        if pages < 1:
            raise InvalidRequestError(
                f"a limit must be at least one page ({format_bytes(self.page_size)}), got {limit_bytes} bytes; "
                "no limit is None ('none' for vkv limit)"
            )
        return pages

    # -- models --

    def register(self, name: str, *, limit_bytes: int | None = None, min_bytes: int = 0, priority: int = 0) -> int:
        """Add a model of this process; returns its entry index. Lower ``priority`` gives pages back first;
        ``min_bytes`` is never asked back. Names are unique among live models."""
        raw = name.encode("utf-8") if isinstance(name, str) else b""
        if not raw or len(raw) > NAME_BYTES or b"\0" in raw:
            raise InvalidRequestError(f"a model name must be 1 to {NAME_BYTES} utf-8 bytes without NUL, got {name!r}")
        limit, least = self._limit_pages(limit_bytes), self._pages("min_bytes", min_bytes, ceil=True)
        if limit and limit < least:
            raise InvalidRequestError(f"limit {limit} pages is below the minimum {least} pages")
        if not isinstance(priority, int) or not -(1 << 31) <= priority < 1 << 31:
            raise InvalidRequestError(f"priority must be a 32-bit int, got {priority!r}")
        with self._locked():
            self.reap_dead()
            for _, row in self._rows():
                if row.label == name:
                    raise LedgerError(
                        f"model name {name!r} is already registered in {self.path} by live pid {row.pid}; "
                        "pick another name or stop that process"
                    )
            free = next((i for i in range(self._max) if not self._mm[_HEADER.size + i * _ENTRY.size]), None)
            if free is None:
                raise LedgerError(f"the ledger at {self.path} is full: {self._max} models are registered")
            row = _Row(1, priority, raw, self._pid, self._start, self._ns, limit=limit, min=least)
            self._store(free, row)
            self._mine.add(free)
            return free

    def unregister(self, entry: int) -> None:
        """Remove a model of this process; pages it still counts go back to the budget."""
        with self._locked():
            self._own(entry)
            self._store(entry, _Row())
            self._mine.discard(entry)

    def try_grow(self, entry: int, pages: int) -> bool:
        """Count ``pages`` more for ``entry`` if the device budget and its limit allow it, else change nothing."""
        _count(pages)
        with self._locked():
            return self._try_grow(entry, pages) is None

    def _try_grow(self, entry: int, pages: int) -> str | None:
        row = self._own(entry)
        if row.limit and row.mapped + pages > row.limit:
            return "limit"
        budget = self._budget()
        if self._total() + pages > budget and (not self.reap_dead() or self._total() + pages > budget):
            return "budget"
        row.mapped += pages
        row.mapped_total += pages
        self._store(entry, row)
        return None

    def grow(self, entry: int, pages: int, *, timeout_s: float = 2.0, poll_s: float = 0.005) -> None:
        """Count ``pages`` more for ``entry``; if the budget is short, ask idle models to give pages back and
        wait up to ``timeout_s``. Raises OutOfPagesError having changed nothing (its requests are withdrawn)."""
        _count(pages)
        start = time.monotonic()
        mine: dict[tuple[int, int, bytes], int] = {}  # (index, pid, name) -> pages this call asked of it
        while True:
            with self._locked():
                why = self._try_grow(entry, pages)
                if why is None:
                    return
                hopeless = self._load(entry).mapped + pages > self._budget()  # more than all of it
                if why == "budget" and not hopeless and time.monotonic() - start < timeout_s:
                    pending = sum(min(n, row.asked) for key, n in mine.items() if (row := self._asked_of(key)))
                    for i, n in self._ask(self._total() + pages - self._budget() - pending, exclude=entry).items():
                        row = self._load(i)
                        mine[i, row.pid, row.name] = mine.get((i, row.pid, row.name), 0) + n
                else:
                    for key, n in mine.items():  # withdraw this call's requests
                        if row := self._asked_of(key):
                            row.asked -= min(n, row.asked)
                            self._store(key[0], row)
                    waited = time.monotonic() - start
                    raise OutOfPagesError(self._refusal(entry, pages, why, sum(mine.values()), waited))
            time.sleep(poll_s)

    def _asked_of(self, key: tuple[int, int, bytes]) -> _Row | None:
        """The row a grow asked pages of, if it still belongs to the same model."""
        row = self._load(key[0])
        return row if (row.used, row.pid, row.name) == (1, *key[1:]) else None

    def _ask(self, pages: int, exclude: int | None) -> dict[int, int]:
        """Ask other models for up to ``pages`` idle pages, lowest priority (then most idle) first."""
        found = sorted((r.priority, -r.idle(), i, r) for i, r in self._rows() if i != exclude and r.idle() > 0)
        asked: dict[int, int] = {}
        for _, _, i, row in found:
            if pages <= 0:
                break
            n = min(row.idle(), pages)
            row.asked += n
            self._store(i, row)
            asked[i], pages = n, pages - n
        return asked

    def _refusal(self, entry: int, pages: int, why: str, asked: int, waited: float) -> str:
        row, size = self._load(entry), self.page_size
        want = f"cannot map {pages} more pages ({format_bytes(pages * size)}) for {row.label!r}"
        if why == "limit":
            return (
                f"{want}: it has {row.mapped} mapped and its limit is {row.limit} pages "
                f"({format_bytes(row.limit * size)}); raise it with `vkv limit {row.label} SIZE`. Nothing was changed."
            )
        rows, budget = self._rows(), self._budget()
        held = ", ".join(f"{r.label} {r.mapped} (in use {r.in_use}, priority {r.priority})" for _, r in rows)
        return (
            f"{want}: the device budget is {budget} pages ({format_bytes(budget * size)}) and "
            f"{sum(r.mapped for _, r in rows)} are mapped [{held}]; asked idle models for {asked} pages and waited "
            f"{waited:.1f} s. Nothing was changed."
        )

    def shrink(self, entry: int, pages: int) -> None:
        """Uncount ``pages`` of ``entry`` (after unmapping them)."""
        _count(pages)
        with self._locked():
            row = self._own(entry)
            if pages > row.mapped:
                raise InvalidRequestError(f"cannot shrink {row.label!r} by {pages} pages: it has {row.mapped} mapped")
            row.mapped -= pages
            row.in_use = min(row.in_use, row.mapped)
            row.unmapped_total += pages
            self._store(entry, row)

    def set_in_use(self, entry: int, pages: int) -> None:
        """Record how many of ``entry``'s mapped pages hold live data (the rest are idle, and can be asked for)."""
        _count(pages)
        with self._locked():
            row = self._own(entry)
            if pages > row.mapped:
                raise InvalidRequestError(f"{row.label!r} cannot use {pages} pages: it has {row.mapped} mapped")
            row.in_use = pages
            self._store(entry, row)

    def ask_release(self, entry: int, pages: int) -> int:
        """Ask other live models to give back up to ``pages`` idle pages (above their minimum), lowest priority
        first. Returns how many were asked for."""
        _count(pages)
        with self._locked():
            self._own(entry)
            self.reap_dead()
            return sum(self._ask(pages, exclude=entry).values())

    def asked(self, entry: int) -> int:
        """Pages ``entry`` has been asked to give back (its mapper unmaps idle ones, then shrink + clear_asked)."""
        with self._locked():
            return self._own(entry).asked

    def clear_asked(self, entry: int, pages: int) -> None:
        _count(pages)
        with self._locked():
            row = self._own(entry)
            row.asked -= min(pages, row.asked)
            self._store(entry, row)

    def reap_dead(self) -> list[str]:
        """Free the entries of processes that no longer exist (their pages died with them). Returns their names."""
        with self._locked():
            gone = [(i, row.label) for i, row in self._rows() if not _alive(row, self._ns)]
            for i, _ in gone:
                self._store(i, _Row())
            return [name for _, name in gone]

    # -- administration --

    def set_limit(self, name: str, limit_bytes: int | None) -> EntryInfo:
        """Change a live model's limit at run time (None: no limit). Growth above it is refused and pages over
        it are asked back. Returns the model's entry as changed."""
        limit = self._limit_pages(limit_bytes)
        with self._locked():
            self.reap_dead()
            i, row = self._find(name)
            if limit and limit < row.min:
                raise InvalidRequestError(f"limit {limit} pages is below {name!r}'s minimum of {row.min} pages")
            row.limit = limit
            if limit and row.mapped > limit:
                row.asked = max(row.asked, row.mapped - limit)
            self._store(i, row)
            return self._info(i, row)

    def set_budget(self, budget_bytes: int) -> None:
        """Change the device budget. Pages mapped over a lowered budget are asked back from idle models."""
        pages = self._pages("budget_bytes", budget_bytes)
        with self._locked():
            self._write_header(pages)
            self._ask(self._total() - pages, exclude=None)

    @property
    def budget_pages(self) -> int:
        with self._locked():
            return self._budget()

    def entry(self, entry: int) -> EntryInfo:
        with self._locked():
            if not 0 <= entry < self._max or not self._load(entry).used:
                raise LedgerError(f"entry {entry} of {self.path} is not registered")
            return self._info(entry, self._load(entry))

    @staticmethod
    def _info(i: int, r: _Row) -> EntryInfo:
        return EntryInfo(
            i, r.label, r.pid, r.mapped, r.in_use, r.limit, r.min, r.priority, r.asked, r.mapped_total,
            r.unmapped_total, r.updated,
        )  # fmt: skip

    def stats(self) -> LedgerStats:
        """A consistent snapshot of the budget and every live entry (dead ones are reaped first)."""
        with self._locked():
            self.reap_dead()
            generation = _HEADER.unpack_from(self._mm, 0)[7]
            entries = tuple(self._info(i, row) for i, row in self._rows())
            return LedgerStats(self.path, self.page_size, self._budget(), generation, entries)

    def entries(self) -> list[EntryInfo]:
        return list(self.stats().entries)

    def close(self) -> None:
        """Unregister this process's models and close the file. The ledger itself stays for the others."""
        if self._mm is None:
            return
        try:
            with self._locked():
                for i in list(self._mine):
                    with contextlib.suppress(VkvError):
                        self.unregister(i)
        except LedgerError:
            pass  # a damaged file: nothing left to unregister from
        finally:
            self._detach()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
