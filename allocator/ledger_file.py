# SPDX-License-Identifier: Apache-2.0
"""The ledger's file: where it lives, its binary layout, safe creation and opening, the lock (with a timeout)
and validated reads and writes of its header and rows. The budget rules that use it are in ledger.py.

The file is read and written with pread/pwrite under ``flock``, never mapped: a file truncated or replaced
under vkv gives a short read, hence a LedgerError, never a SIGBUS. The whole table is small (64 rows of
144 bytes), so each locked operation reads it once and writes it back once if anything changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import stat
import struct
import tempfile
import threading
import time
from dataclasses import dataclass

from .checks import INT64_MAX
from .errors import InvalidRequestError, VkvError

MAGIC, VERSION, NAME_BYTES, MAX_ENTRIES = b"VKVLEDG1", 1, 48, 64
DIRECTORY_ENV = "VKV_LEDGER_DIR"
# magic, version, header size, entry size, max entries, page size, budget pages, generation
HEADER = struct.Struct("<8sIIIIqqq16x")
# used, priority, name, pid, pid start, pid namespace, mapped, in use, limit, min, asked, mapped total,
# unmapped total, updated (unix time)
ENTRY = struct.Struct(f"<B3xi{NAME_BYTES}s10qd")


class LedgerError(VkvError):
    """The ledger file is missing, damaged, foreign-owned or readable by others, or a name is wrong."""


class LedgerBusyError(LedgerError):
    """The ledger's lock could not be taken in time: another process holds it (stopped or hung)."""


@dataclass(slots=True)
class Row:
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
    exiting: bool = False  # its process is gone but the driver still holds its memory: its pages still count


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


# -- where it lives --


def ledger_directory(directory: str | os.PathLike | None = None) -> str:
    """``directory``, else $VKV_LEDGER_DIR, else ``/dev/shm/vkv-<uid>`` (the temp dir where /dev/shm is missing)."""
    if directory is None:
        directory = os.environ.get(DIRECTORY_ENV) or None
    if directory is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        return os.path.join(base, f"vkv-{os.getuid()}")
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise InvalidRequestError(f"directory must be a non-empty path, got {directory!r}")
    return os.fspath(directory)


def device_name(device: str | int) -> str:
    """The ledger's name for ``device``: an int >= 0 (a device index) or a name of letters, digits, '-', '_', '.'."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        device = str(device)
    if not isinstance(device, str) or not device or not all(c.isalnum() or c in "-_." for c in device):
        raise InvalidRequestError(
            f"device {device!r} must be an int >= 0 or a non-empty name of letters, digits, '-', '_', '.'"
        )
    if device in (".", "..") or device.endswith(".tmp"):
        raise InvalidRequestError(f"device {device!r} must name a device, not a directory or a temporary file")
    return device


def default_path(device: str | int = "0", directory: str | os.PathLike | None = None) -> str:
    """``<directory>/ledger-<device>``; the directory is :func:`ledger_directory`'s."""
    return os.path.join(ledger_directory(directory), f"ledger-{device_name(device)}")


def ledger_devices(directory: str | os.PathLike | None = None) -> list[str]:
    """The devices that have a ledger in ``directory`` (:func:`ledger_directory`'s), indices in order, then names."""
    try:
        names = os.listdir(ledger_directory(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise LedgerError(f"cannot list the ledger directory {ledger_directory(directory)}: {e.strerror}") from None
    found = []
    for name in names:
        device = name.removeprefix("ledger-")
        if device != name:  # (a file being created, ledger-<device>.<pid>.<thread>.tmp, is refused as a name)
            with contextlib.suppress(InvalidRequestError):
                found.append(device_name(device))
    return sorted(found, key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))


_ELSEWHERE = f"or use another directory (set {DIRECTORY_ENV} or pass directory=)"


def check_private(path: str, st: os.stat_result, what: str, mode: int) -> None:
    remedy = f"remove it {_ELSEWHERE}" if what == "directory" else "remove it or pass another path"
    if st.st_uid != os.getuid():
        raise LedgerError(
            f"{what} {path} is owned by uid {st.st_uid}, expected this user (uid {os.getuid()}): refusing another "
            f"user's ledger (another user may have created it to deny this one service); {remedy}"
        )
    if st.st_mode & 0o077:
        raise LedgerError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}, expected {mode:04o} (no access for group or "
            f"others); chmod it or {remedy}"
        )


def make_private_directory(folder: str) -> None:
    """Create the ledger directory (mode 0700) or check that the one there is this user's and private."""
    try:
        with contextlib.suppress(FileExistsError):
            os.makedirs(folder, mode=0o700)
        st = os.lstat(folder)
    except OSError as e:
        raise LedgerError(f"cannot create the ledger directory {folder}: {e.strerror}; {_ELSEWHERE[3:]}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise LedgerError(f"{folder} is not a directory (links are not followed); {_ELSEWHERE[3:]}")
    check_private(folder, st, "directory", 0o700)


# -- opening and creating --


def corrupted(path: str, detail: str) -> LedgerError:
    return LedgerError(f"corrupted ledger at {path}: {detail}; remove the file if no vkv process is using it")


def open_fd(path: str) -> int:
    """An O_RDWR descriptor of the private regular file ``path``. Raises FileNotFoundError if there is none."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(path) or "."):
            raise LedgerError(f"cannot open ledger {path}: its directory does not exist") from None
        raise
    except PermissionError as e:
        with contextlib.suppress(OSError):
            check_private(path, os.stat(path), "ledger", 0o600)
        raise LedgerError(f"cannot open ledger {path}: {e.strerror}") from None
    except OSError as e:
        raise LedgerError(f"cannot open ledger {path}: {e.strerror} (expected a regular file, not a link)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LedgerError(f"ledger {path} is not a regular file")
        check_private(path, st, "ledger", 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(path: str, page_size: int, budget_pages: int, max_entries: int) -> None:
    """Write a complete ledger under a temporary name, then link it into place (the first creator wins)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    header = HEADER.pack(MAGIC, VERSION, HEADER.size, ENTRY.size, max_entries, page_size, budget_pages, 0)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        folder = os.path.dirname(path) or "."
        why = "its directory does not exist" if isinstance(e, FileNotFoundError) else e.strerror
        raise LedgerError(f"cannot create ledger {path}: {why} (directory {folder})") from None
    try:
        os.fchmod(fd, 0o600)
        if os.write(fd, header + bytes(max_entries * ENTRY.size)) != HEADER.size + max_entries * ENTRY.size:
            raise LedgerError(f"cannot create ledger {path}: a short write (is the file system full?)")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    except OSError as e:
        raise LedgerError(f"cannot create ledger {path}: {e.strerror}") from None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# -- processes --


def pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _stat_fields(pid: int) -> list[bytes] | None:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def proc_start(pid: int, *, exiting: bool = False) -> int:
    """Start time of ``pid`` in clock ticks since boot: -1 if it is gone or a zombie, 0 if unknown. With
    ``exiting``, a zombie whose process is still exiting (``still_exiting``) gives its start time too."""
    try:
        fields_ = _stat_fields(pid)
    except FileNotFoundError:
        return -1
    except (OSError, IndexError):
        return 0
    if fields_[0] in (b"Z", b"X") and not (exiting and still_exiting(pid)):
        return -1
    return int(fields_[19])


def still_exiting(pid: int) -> bool:
    """``pid`` is a zombie thread-group leader whose other threads have not all exited yet: a killed process's main
    thread is a zombie at once while another thread still tears down what the process held (the last thread to exit
    closes its files: a GPU driver frees the process's device memory there)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def proc_state(pid: int) -> str:
    """A word for the state of ``pid`` (for messages): running, sleeping, stopped, ..."""
    try:
        state = _stat_fields(pid)[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return "gone or unknown"
    words = {"R": "running", "S": "sleeping", "D": "in disk wait", "T": "stopped", "t": "stopped by a tracer"}
    return words.get(state, f"state {state}")


def alive(row: Row, ns: int) -> bool:
    if row.pid <= 0:
        return False
    if row.pid_ns and ns and row.pid_ns != ns:
        return True  # another pid namespace (container): its pids mean nothing here, leave it to its own
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = proc_start(row.pid, exiting=True)
    return start >= 0 and (start == 0 or row.pid_start in (0, start))  # a reused pid starts later


# -- the open file --


def row_problem(row: Row, max_pages: int) -> str | None:
    """What is wrong with a used row, or None. vkv never writes such a row: the file was damaged."""
    if (
        row.used == 1
        and row.pid > 0
        and 0 <= row.in_use <= row.mapped <= max_pages
        and 0 <= row.min <= max_pages
        and 0 <= row.limit <= max_pages
        and 0 <= row.asked <= max_pages
        and (not row.limit or row.min <= row.limit)
        and min(row.pid_start, row.pid_ns, row.mapped_total, row.unmapped_total) >= 0
        and math.isfinite(row.updated)
        and _good_name(row.name)
    ):
        return None
    if row.used != 1:
        return f"its used flag is {row.used}, expected 0 or 1"
    if row.pid <= 0:
        return f"its pid {row.pid} is not a process id"
    for name in ("mapped", "in_use", "limit", "min", "asked"):
        if not 0 <= getattr(row, name) <= max_pages:
            return f"{name} is {getattr(row, name)} pages, expected 0 to {max_pages}"
    if row.in_use > row.mapped:
        return f"in_use {row.in_use} exceeds mapped {row.mapped}"
    if row.limit and row.min > row.limit:
        return f"its minimum {row.min} exceeds its limit {row.limit}"
    if min(row.pid_start, row.pid_ns, row.mapped_total, row.unmapped_total) < 0:
        return "a negative process start, namespace or cumulative count"
    if not math.isfinite(row.updated):
        return f"its update time is {row.updated}"
    return f"its name {row.name!r} is not utf-8 (or is empty, or holds a NUL)"


def _good_name(raw: bytes) -> bool:
    """Non-empty utf-8 without NUL. (New names are printable too, but a control character is not damage.)"""
    name = raw.rstrip(b"\0")
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(name) and b"\0" not in name


class Table:
    """The header and rows as read under the lock. Rows are parsed and validated when first looked at; changes
    are kept here and written back together by :meth:`LedgerFile.write` (nothing is written on an error)."""

    def __init__(self, file: LedgerFile, data: bytearray, budget: int, generation: int):
        self.file, self.data, self._budget, self.generation = file, data, budget, generation
        self.dirty, self._rows, self._used = False, {}, None

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, pages: int) -> None:
        self._budget, self.dirty = pages, True

    def row(self, i: int) -> Row:
        """Row ``i``, validated. An invalid row of a process that is gone is cleared (its pages died with it);
        one of a live (or unknowable) process raises a LedgerError naming it and the remedy."""
        if i in self._rows:
            return self._rows[i]
        offset = HEADER.size + i * ENTRY.size
        if not self.data[offset]:
            self._rows[i] = row = Row()
            return row
        raw, seen = bytes(self.data[offset : offset + ENTRY.size]), self.file.valid.get(i)
        if seen is not None and seen[0] == raw:  # these very bytes were validated before
            self._rows[i] = row = Row(*seen[1])
            return row
        fields = ENTRY.unpack(raw)
        row = Row(*fields)
        if row.used and (problem := row_problem(row, self.file.max_pages)):
            if row.pid > 0 and not alive(row, self.file.ns):
                self.put(i, Row())
                return self._rows[i]
            stop = (
                f"stop pid {row.pid} (vkv then reaps its entry; the driver frees its pages), or " if row.pid > 0 else ""
            )
            raise LedgerError(
                f"entry {i} of the ledger at {self.file.path} (model {row.label!r}, pid {row.pid}) is invalid: "
                f"{problem}. vkv never writes such an entry: the file was damaged. Remedy: {stop}remove "
                f"{self.file.path} if no vkv process is using it"
            )
        self.file.valid[i] = (raw, fields)
        self._rows[i] = row
        return row

    def used(self) -> list[tuple[int, Row]]:
        """The used rows (validated), in index order."""
        if self._used is None:
            flags = self.data[HEADER.size :: ENTRY.size]  # the first byte of every row
            rows = [(i, self.row(i)) for i, flag in enumerate(flags) if flag]
            self._used = [(i, row) for i, row in rows if row.used]
        return self._used

    def free_index(self) -> int | None:
        return next((i for i, flag in enumerate(self.data[HEADER.size :: ENTRY.size]) if not flag), None)

    def put(self, i: int, row: Row) -> None:
        row.updated = time.time() if row.used else 0.0
        offset = HEADER.size + i * ENTRY.size
        ENTRY.pack_into(
            self.data, offset, row.used, row.priority, row.name, row.pid, row.pid_start, row.pid_ns, row.mapped,
            row.in_use, row.limit, row.min, row.asked, row.mapped_total, row.unmapped_total, row.updated,
        )  # fmt: skip
        self._rows[i], self._used, self.dirty = row, None, True


class LedgerFile:
    """One process's open ledger file: validated header, lock with a timeout, whole-table reads and writes."""

    def __init__(self, path: str, fd: int, lock_timeout_s: float):
        self.path, self.fd, self.ns = path, fd, pid_namespace()
        self.lock(lock_timeout_s)
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, HEADER.size, 0)
            if len(header) < HEADER.size:
                raise corrupted(path, f"it is {size} bytes, shorter than the {HEADER.size}-byte header")
            magic, version, hsize, esize, n, page_size, budget, _ = HEADER.unpack(header)
            if magic != MAGIC:
                raise corrupted(path, f"it starts with {magic!r}, expected {MAGIC!r}")
            if (version, hsize, esize) != (VERSION, HEADER.size, ENTRY.size):
                raise corrupted(
                    path,
                    f"version {version} with {hsize}/{esize}-byte header/entries, expected version {VERSION} with "
                    f"{HEADER.size}/{ENTRY.size}",
                )
            if not 0 < n <= 4096 or not 0 < page_size <= INT64_MAX or not 0 <= budget <= INT64_MAX // page_size:
                raise corrupted(path, f"its header says {n} entries, page size {page_size}, budget {budget} pages")
            if size != hsize + n * esize:
                raise corrupted(path, f"it is {size} bytes, expected {hsize + n * esize} for {n} entries")
        except OSError as e:
            raise LedgerError(f"cannot read ledger {path}: {e.strerror}") from None
        finally:
            self.unlock()
        self.size, self.max_entries, self.page_size = size, n, page_size
        self.valid: dict[int, tuple[bytes, tuple]] = {}  # row -> its bytes and fields when last found valid
        self.max_pages = INT64_MAX // page_size
        self._shape = (MAGIC, VERSION, HEADER.size, ENTRY.size, n, page_size)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def lock(self, timeout_s: float) -> None:
        """flock(LOCK_EX), retried with short sleeps for up to ``timeout_s``; then LedgerBusyError."""
        start = time.monotonic()
        pause = 1e-4
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as e:
                raise LedgerError(f"flock(LOCK_EX) on ledger {self.path} failed: {e.strerror} ({e.errno})") from None
            left = start + timeout_s - time.monotonic()
            if left <= 0:
                raise LedgerBusyError(self.busy(time.monotonic() - start))
            time.sleep(min(pause, left))
            pause = min(pause * 2, 2e-3)

    def busy(self, waited: float, who: str = "") -> str:
        holder = self.holder()
        held = f"held by pid {holder} ({proc_state(holder)})" if holder else "its holder is unknown"
        return (
            f"the ledger {self.path} is busy: its lock was not free within {waited:.2f} s ({held}{who}); a vkv "
            "process that is stopped (SIGSTOP) or hung holds it: resume it (SIGCONT) or kill it, then retry"
        )

    def holder(self) -> int:
        """The pid holding the file's flock, from /proc/locks (0 if unknown). Costs nothing until it is asked."""
        try:
            st = os.fstat(self.fd)
            key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}".encode()
            with open("/proc/locks", "rb") as f:
                for line in f:
                    words = line.split()
                    if len(words) > 5 and words[1] == b"FLOCK" and words[5] == key and words[4].isdigit():
                        return int(words[4])
        except OSError:
            pass
        return 0

    def unlock(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def read(self) -> Table:
        """The whole table (call with the lock held)."""
        try:
            data = bytearray(os.pread(self.fd, self.size + 1, 0))
        except OSError as e:
            raise LedgerError(f"cannot read ledger {self.path}: {e.strerror}") from None
        shape = HEADER.unpack_from(data) if len(data) >= HEADER.size else (data[:8],)
        if len(data) != self.size or shape[:6] != self._shape:
            raise corrupted(
                self.path,
                f"it changed under vkv: it is {len(data)} bytes (expected {self.size}) and starts with "
                f"{bytes(data[:8])!r} (truncated, replaced or overwritten while open)",
            )
        budget, generation = shape[6], shape[7]
        if not 0 <= budget <= self.max_pages:
            raise corrupted(self.path, f"its budget is {budget} pages, expected 0 to {self.max_pages}")
        return Table(self, data, budget, generation)

    def write(self, table: Table) -> None:
        """Write the table back in one pwrite (call with the lock held), the generation counted up."""
        table.generation += 1
        HEADER.pack_into(table.data, 0, *self._shape, table.budget, table.generation)
        self._pwrite(table.data, 0)
        table.dirty = False

    def _pwrite(self, data: bytes | bytearray, offset: int) -> None:
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as e:
            raise LedgerError(f"cannot write ledger {self.path}: {e.strerror}") from None
        if written != len(data):
            raise LedgerError(f"cannot write ledger {self.path}: {written} of {len(data)} bytes written")
