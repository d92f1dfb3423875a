# SPDX-License-Identifier: Apache-2.0
"""The ledger's file: its binary layout, safe opening and creation, and the liveness of the processes
it names. The budget rules that use it are in ledger.py."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass

from .errors import InvalidRequestError, VkvError

MAGIC, VERSION, NAME_BYTES, MAX_ENTRIES = b"VKVLEDG1", 1, 48, 64
# magic, version, header size, entry size, max entries, page size, budget pages, generation
_HEADER = struct.Struct("<8sIIIIqqq16x")
# used, priority, name, pid, pid start, pid namespace, mapped, in use, limit, min, asked, mapped total,
# unmapped total, updated (unix time)
_ENTRY = struct.Struct(f"<B3xi{NAME_BYTES}s10qd")


class LedgerError(VkvError):
    """The ledger file is missing, corrupted, foreign-owned or readable by others, or a name is wrong."""


@dataclass(slots=True)
class _Row:
    used: int = 0
    priority: int = 0
    name: bytes = b""
    pid: int = 0
    pid_start: int = 0
    pid_ns: int = 0
    mapped: int = 0
    in_use: int = 0
    limit: int = 0  # 0: no limit
    min: int = 0
    asked: int = 0  # pages other models (or a lowered limit/budget) asked this one to give back
    mapped_total: int = 0
    unmapped_total: int = 0
    updated: float = 0.0

    @property
    def label(self) -> str:
        return self.name.rstrip(b"\0").decode("utf-8", "replace")

    def idle(self) -> int:
        """Pages it could give back and has not been asked for yet."""
        return self.mapped - max(self.in_use, self.min) - self.asked


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """A snapshot of one model's entry. Counts are pages; ``limit_pages == 0`` means no limit."""

    index: int
    name: str
    pid: int
    pages_mapped: int
    pages_in_use: int
    limit_pages: int
    min_pages: int
    priority: int
    release_asked: int
    mapped_total: int  # cumulative pages counted in (for rates)
    unmapped_total: int  # cumulative pages counted out
    updated: float


@dataclass(frozen=True, slots=True)
class LedgerStats:
    path: str
    page_size: int
    budget_pages: int
    generation: int
    entries: tuple[EntryInfo, ...]

    @property
    def pages_mapped(self) -> int:
        return sum(e.pages_mapped for e in self.entries)

    @property
    def pages_in_use(self) -> int:
        return sum(e.pages_in_use for e in self.entries)


def format_bytes(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


def default_path(device: str | int = "0") -> str:
    """``/dev/shm/vkv-<uid>/ledger-<device>`` (the temp dir stands in where /dev/shm does not exist)."""
    device = str(device)
    if not device or not all(c.isalnum() or c in "-_." for c in device):
        raise InvalidRequestError(f"device {device!r} must be a non-empty name of letters, digits, '-', '_', '.'")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"vkv-{os.getuid()}", f"ledger-{device}")


def _check_private(path: str, st: os.stat_result, what: str, mode: int) -> None:
    if st.st_uid != os.getuid():
        raise LedgerError(
            f"{what} {path} is owned by uid {st.st_uid}, expected this user (uid {os.getuid()}): refusing another "
            "user's ledger; remove it or pass another path"
        )
    if st.st_mode & 0o077:
        raise LedgerError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, expected {mode:04o} (no access for group or "
            "others); chmod it or remove it"
        )


def _corrupted(path: str, detail: str) -> LedgerError:
    return LedgerError(f"corrupted ledger at {path}: {detail}; remove the file if no vkv process is using it")


def _open_file(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except PermissionError as e:
        with contextlib.suppress(OSError):
            _check_private(path, os.stat(path), "ledger", 0o600)
        raise LedgerError(f"cannot open ledger {path}: {e.strerror}") from None
    except OSError as e:
        raise LedgerError(f"cannot open ledger {path}: {e.strerror} (expected a regular file, not a link)") from None
    st = os.fstat(fd)
    try:
        if not stat.S_ISREG(st.st_mode):
            raise LedgerError(f"ledger {path} is not a regular file")
        _check_private(path, st, "ledger", 0o600)
    except LedgerError:
        os.close(fd)
        raise
    return fd


def _create_file(path: str, page_size: int, budget_pages: int, max_entries: int) -> None:
    """Write a complete ledger under a temporary name, then link it into place (the first creator wins)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        header = _HEADER.pack(MAGIC, VERSION, _HEADER.size, _ENTRY.size, max_entries, page_size, budget_pages, 0)
        os.write(fd, header + bytes(max_entries * _ENTRY.size))
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.close(fd)
        os.unlink(tmp)


def _pid_ns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _proc_start(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot: -1 if it is gone or a zombie, 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return -1
    except (OSError, IndexError):
        return 0
    return -1 if fields[0] in (b"Z", b"X") else int(fields[19])


def _alive(row: _Row, ns: int) -> bool:
    if row.pid_ns and ns and row.pid_ns != ns:
        return True  # another pid namespace (container): its pids mean nothing here, leave it to its own
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _proc_start(row.pid)
    return start >= 0 and (start == 0 or row.pid_start in (0, start))  # a reused pid starts later


def _count(pages: int) -> int:
    if not isinstance(pages, int) or pages < 0:
        raise InvalidRequestError(f"a page count must be an int >= 0, got {pages!r}")
    return pages
