# SPDX-License-Identifier: Apache-2.0
"""The host backend: real memory mapping with Linux mmap, the CPU twin of CUDA VMM.

reserve = mmap(PROT_NONE, MAP_NORESERVE); a physical page = a page-sized region of one memfd;
map = mmap(MAP_FIXED | MAP_SHARED, memfd, offset); unmap = mmap(MAP_FIXED, PROT_NONE) over the page,
which puts the reservation back; release = fallocate(PUNCH_HOLE), which returns the memory to the OS.
Touching an unmapped page raises SIGSEGV, as an unmapped GPU address raises an illegal-address error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading

import torch

from .checks import check_count, check_positive
from .driver import HOST_DEVICES, Driver
from .errors import DriverError, InvalidRequestError

_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000
_RESERVE_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

DEFAULT_PAGE_SIZE = 2 << 20


def _fail(call: str, detail: str = "") -> DriverError:
    code = ctypes.get_errno()
    return DriverError(call, code, errno.errorcode.get(code, "E?"), detail or os.strerror(code))


class HostDriver(Driver):
    """CPU memory mapped page by page from one memfd (one per driver). Thread-safe. ``device`` is a label
    (default 0): host drivers of different indices stand for different devices (separate pools and ledgers)."""

    name = "host"

    def __init__(self, page_size: int | None = None, device: int | None = None):
        page_size = DEFAULT_PAGE_SIZE if page_size is None else check_positive("page_size", page_size, hi=1 << 40)
        if page_size % mmap.PAGESIZE:
            raise InvalidRequestError(f"host page_size {page_size} must be a positive multiple of {mmap.PAGESIZE}")
        self.index = 0 if device is None else check_count("device", device, hi=HOST_DEVICES - 1)
        self.page_size = page_size
        self._fd = os.memfd_create(f"vkv-pages-{self.index}", os.MFD_CLOEXEC)
        self._file_pages = 0  # pages the memfd has room for
        self._holes: list[int] = []  # released page offsets, reused before the file grows
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def reserve(self, nbytes: int) -> int:
        self.check_aligned("reserve size", nbytes)
        if nbytes <= 0:
            raise InvalidRequestError(f"reserve size must be positive, got {nbytes}")
        addr = _libc.mmap(None, nbytes, _PROT_NONE, _RESERVE_FLAGS, -1, 0)
        if addr in (None, _MAP_FAILED):
            raise _fail("mmap(PROT_NONE)", f"reserving {nbytes} bytes")
        if addr % self.page_size:  # realign: reserve more and trim both ends
            if _libc.munmap(addr, nbytes):
                raise _fail("munmap")
            return self._reserve_aligned(nbytes)
        return addr

    def _reserve_aligned(self, nbytes: int) -> int:
        padded = nbytes + self.page_size
        raw = _libc.mmap(None, padded, _PROT_NONE, _RESERVE_FLAGS, -1, 0)
        if raw in (None, _MAP_FAILED):
            raise _fail("mmap(PROT_NONE)", f"reserving {padded} bytes")
        addr = -(-raw // self.page_size) * self.page_size
        head, tail = addr - raw, raw + padded - (addr + nbytes)
        if (head and _libc.munmap(raw, head)) or (tail and _libc.munmap(addr + nbytes, tail)):
            raise _fail("munmap")
        return addr

    def free_range(self, addr: int, nbytes: int) -> None:
        if _libc.munmap(addr, nbytes):
            raise _fail("munmap", f"freeing range {addr:#x}+{nbytes}")

    def create_page(self) -> int:
        """A page-sized region of the memfd, allocated now (fallocate): a full tmpfs fails here, with an
        error, rather than later with SIGBUS on the first write."""
        with self._lock:
            grow = not self._holes
            offset = self._file_pages * self.page_size if grow else self._holes.pop()
            if _libc.fallocate(self._fd, 0, offset, self.page_size):
                error = _fail("fallocate(memfd)", f"allocating a page at offset {offset}")
                if not grow:
                    self._holes.append(offset)
                raise error
            self._file_pages += grow
            return offset

    def release_page(self, handle: int) -> None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self._fd, mode, handle, self.page_size):
            raise _fail("fallocate(PUNCH_HOLE)", f"releasing page at offset {handle}")
        with self._lock:
            self._holes.append(handle)

    def map(self, addr: int, handle: int) -> None:
        self.check_aligned("map address", addr)
        got = _libc.mmap(addr, self.page_size, _PROT_RW, mmap.MAP_SHARED | _MAP_FIXED, self._fd, handle)
        if got != addr:
            raise _fail("mmap(MAP_FIXED|MAP_SHARED)", f"mapping page {handle} at {addr:#x}")

    def unmap(self, addr: int) -> None:
        self.unmap_range(addr, self.page_size)

    def unmap_range(self, addr: int, nbytes: int) -> None:
        got = _libc.mmap(addr, nbytes, _PROT_NONE, _RESERVE_FLAGS | _MAP_FIXED, -1, 0)
        if got != addr:
            raise _fail("mmap(MAP_FIXED, PROT_NONE)", f"unmapping {addr:#x}+{nbytes}")

    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)

    def memory_info(self) -> tuple[int, int]:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return free, total

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown: os may be gone already
            self.close()
