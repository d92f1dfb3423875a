# SPDX-License-Identifier: Apache-2.0
"""The driver interface: virtual ranges and physical pages, with the same semantics on every backend.

A *range* is reserved virtual address space that maps nothing. A *page* is a physical allocation of
``page_size`` bytes (a cuMemCreate handle, or a region of a memfd). ``map`` puts a page at a
page-aligned address inside a range with read/write access; ``unmap`` takes it away again, keeping the
page's data (the same page may be mapped elsewhere later). Touching an unmapped address inside a range
is an error (an illegal address on the GPU, SIGSEGV on the host).
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .checks import check_count, check_positive
from .errors import InvalidRequestError

BACKENDS = ("cuda", "host")


HOST_DEVICES = 1 << 16  # host device indices are labels (one pool and ledger each): any int in [0, HOST_DEVICES)


class CaptureGate:
    """CUDA graph captures (vkv.engine) against the device syncs that are only for accounting (PagePool's, after a
    release): a device-wide sync from another thread would break a capture, so such a sync is skipped while one
    runs, and a capture waits for the syncs under way. Syncs run side by side: one thread's sync never makes
    another's skip (a lock taken without blocking did, and its pages were counted out before they were freed)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._syncs = 0
        self._capturing = False

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing and self._syncs == 0)
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()

    def sync(self, synchronize: Callable[[], None]) -> bool:
        """Run ``synchronize()`` unless a capture runs; whether it ran."""
        with self._cond:
            if self._capturing:
                return False
            self._syncs += 1
        try:
            synchronize()
        finally:
            with self._cond:
                self._syncs -= 1
                self._cond.notify_all()
        return True


CAPTURE_GATE = CaptureGate()


class Driver(abc.ABC):
    """One device's virtual-memory calls. Subclasses check every call and raise DriverError.

    ``index`` is the device's index: its CUDA ordinal, or on the host a label (0 unless given) that keeps the
    pools and ledgers of several simulated devices apart, as tensor-parallel ranks on the CPU need. A subclass
    that does not set it (a wrapper written before there were several) is device 0's."""

    name: str
    page_size: int
    index: int = 0

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The torch device whose tensors the mapped memory becomes."""

    @abc.abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (a multiple of page_size) of virtual address space; return its address."""

    @abc.abstractmethod
    def free_range(self, addr: int, nbytes: int) -> None:
        """Give back a reserved range. Every page in it must have been unmapped."""

    @abc.abstractmethod
    def create_page(self) -> Any:
        """Allocate one physical page and return its handle."""

    @abc.abstractmethod
    def release_page(self, handle: Any) -> None:
        """Free a physical page (its memory goes back to the device or OS). It must be mapped nowhere."""

    @abc.abstractmethod
    def map(self, addr: int, handle: Any) -> None:
        """Map one page at ``addr`` (page-aligned, inside a reserved range) with read/write access."""

    @abc.abstractmethod
    def unmap(self, addr: int) -> None:
        """Unmap the page at ``addr``; the address faults on access again."""

    def unmap_range(self, addr: int, nbytes: int) -> None:
        """Unmap the mapped pages covering ``[addr, addr + nbytes)`` (every page in it must be mapped). One
        driver call where the driver allows it; page by page otherwise."""
        for page_addr in range(addr, addr + nbytes, self.page_size):
            self.unmap(page_addr)

    @abc.abstractmethod
    def tensor(self, addr: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` over ``[addr, addr + nbytes)``. It does not own the memory."""

    @abc.abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device (GPU memory, or host RAM)."""

    def synchronize(self) -> None:  # noqa: B027 - an optional hook: a no-op where nothing is queued
        """Wait until the device has finished all queued work (a no-op on the host)."""

    def record_event(self) -> Any:
        """A marker of the work queued on the device so far (None on the host: work is synchronous)."""
        return None

    def wait_event(self, event: Any) -> None:  # noqa: B027 - nothing to wait for where work is synchronous
        """Block until the work before ``event`` has finished."""

    def describe(self) -> str:
        return f"{self.name} device {self.index} on {self.device}, page {self.page_size // 1024} KiB"

    def check_aligned(self, what: str, value: int) -> None:
        if value % self.page_size:
            raise InvalidRequestError(f"{what} = {value} is not a multiple of the page size {self.page_size}")


def cuda_usable() -> bool:
    """True when torch sees a CUDA GPU and the driver bindings import."""
    if not torch.cuda.is_available():
        return False
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False
    return True


def current_device(backend: str | None = None) -> int:
    """The device index a driver of ``backend`` gets when none is given: torch's current CUDA device on cuda (and
    for None/"auto" where cuda is usable), 0 on the host."""
    if backend == "cuda" or (backend in (None, "auto") and cuda_usable()):
        return torch.cuda.current_device()
    return 0


def get_driver(backend: str | None = None, *, page_size: int | None = None, device: int | None = None) -> Driver:
    """Return a driver for ``backend``: ``"cuda"``, ``"host"``, or None/``"auto"`` (cuda when usable).

    ``page_size`` defaults to the device's mapping granularity (2 MiB on an H200; 2 MiB on the host
    too, so both backends waste the same). On cuda it must be a multiple of the granularity, on the
    host a multiple of the OS page size. ``device`` is the device index (default :func:`current_device`):
    on cuda the ordinal, below torch.cuda.device_count(); on the host a label below HOST_DEVICES.
    """
    if page_size is not None:
        check_positive("page_size", page_size)
    if device is not None:
        check_count("device", device)
    if backend in (None, "auto"):
        backend = "cuda" if cuda_usable() else "host"
    if backend == "cuda":
        from .cuda import CudaDriver

        return CudaDriver(page_size=page_size, device=device)
    if backend == "host":
        from .host import HostDriver

        return HostDriver(page_size=page_size, device=device)
    raise InvalidRequestError(f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'")
