# SPDX-License-Identifier: Apache-2.0
"""Fault injection for tests: a driver and a ledger that fail the k-th call of one kind.

Both wrap the real thing (a real host or cuda driver, a real Ledger): every call that is not failed runs
for real. A failure is the error the real call raises (DriverError for the driver, LedgerError or
OutOfPagesError for the ledger), or KeyboardInterrupt, which stands for an interrupt between two steps of
an operation. ``set_access`` fails the way CudaDriver.map does when cuMemSetAccess fails: the page was
mapped, is unmapped again, and the error is raised.

Examples
--------
>>> faults = Faults()
>>> driver = FaultyDriver(get_driver("host"), faults)     # doctest: +SKIP
>>> faults.arm("map", 2)                                  # the second map call from now fails
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from vkv.allocator import DriverError, OutOfPagesError
from vkv.allocator.driver import Driver
from vkv.allocator.ledger import Ledger, LedgerBusyError, LedgerError

DRIVER_KINDS = ("reserve", "create", "map", "set_access", "unmap", "release", "free_range")
LEDGER_KINDS = ("grow", "shrink", "set_in_use", "lock")
KINDS = DRIVER_KINDS + LEDGER_KINDS


class Injected(DriverError):
    """A driver fault injected by a test."""


class Faults:
    """Counts calls of each kind and fails the armed one. ``arm(kind, k)``: the k-th call of ``kind`` from
    now raises (``interrupt=True``: KeyboardInterrupt). One fault at a time; it fires once."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.fired: list[str] = []
        self._armed: tuple[str, int, bool, str] | None = None

    def arm(self, kind: str, k: int = 1, *, interrupt: bool = False, name: str = "INJECTED") -> None:
        """``name``: a driver fault's DriverError.name, e.g. "CUDA_ERROR_OUT_OF_MEMORY" (the device is full)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {KINDS}")
        self._armed = (kind, self.calls[kind] + k, interrupt, name)

    def disarm(self) -> None:
        self._armed = None

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def hit(self, kind: str) -> BaseException | None:
        """Count a call of ``kind``; return the error to raise if it is the armed one."""
        self.calls[kind] += 1
        if self._armed is None or self._armed[0] != kind or self.calls[kind] != self._armed[1]:
            return None
        _, _, interrupt, name = self._armed
        self._armed = None
        self.fired.append(kind)
        if interrupt:
            return KeyboardInterrupt(f"injected interrupt at {kind}")
        if kind in DRIVER_KINDS:
            return Injected(f"injected:{kind}", 999, name, "a fault injected by the test")
        if kind == "grow":
            return OutOfPagesError("injected: the ledger refused the growth")
        if kind == "lock":
            return LedgerBusyError("injected: the ledger's lock could not be taken")
        return LedgerError(f"injected: the ledger failed at {kind}")


class FaultyDriver(Driver):
    """A real driver whose calls can be failed by ``faults``."""

    def __init__(self, inner: Driver, faults: Faults):
        self.inner, self.faults = inner, faults
        self.name, self.page_size = inner.name, inner.page_size

    def _check(self, kind: str) -> None:
        error = self.faults.hit(kind)
        if error is not None:
            raise error

    @property
    def device(self):
        return self.inner.device

    def reserve(self, nbytes: int) -> int:
        self._check("reserve")
        return self.inner.reserve(nbytes)

    def free_range(self, addr: int, nbytes: int) -> None:
        self._check("free_range")
        self.inner.free_range(addr, nbytes)

    def create_page(self) -> Any:
        self._check("create")
        return self.inner.create_page()

    def release_page(self, handle: Any) -> None:
        self._check("release")
        self.inner.release_page(handle)

    def map(self, addr: int, handle: Any) -> None:
        self._check("map")
        self.inner.map(addr, handle)
        error = self.faults.hit("set_access")
        if error is not None:  # as CudaDriver.map when cuMemSetAccess fails: undo the map, then raise
            self.inner.unmap(addr)
            raise error

    def unmap(self, addr: int) -> None:
        self.unmap_range(addr, self.page_size)

    def unmap_range(self, addr: int, nbytes: int) -> None:
        self._check("unmap")
        self.inner.unmap_range(addr, nbytes)

    def tensor(self, addr: int, nbytes: int):
        return self.inner.tensor(addr, nbytes)

    def memory_info(self) -> tuple[int, int]:
        return self.inner.memory_info()

    def synchronize(self) -> None:
        self.inner.synchronize()

    def record_event(self) -> Any:
        return self.inner.record_event()

    def wait_event(self, event: Any) -> None:
        self.inner.wait_event(event)


class FaultyLedger(Ledger):
    """A real Ledger whose grow, shrink and set_in_use calls can be failed by ``faults``; ``lock`` fails any
    of the ledger calls a pool makes (grow, shrink, set_in_use, asked, clear_asked) before it takes effect,
    as a lock that cannot be taken would. Everything else passes through to the real ledger. A Ledger
    subclass only so that type checks accept it: every attribute is the wrapped ledger's."""

    _LOCKED = ("grow", "shrink", "set_in_use", "asked", "clear_asked", "try_grow")

    def __init__(self, inner: Ledger, faults: Faults):  # noqa: D107 - the real ledger is already open
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_faults", faults)

    def __getattribute__(self, name: str):
        if name in ("_inner", "_faults", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        inner, faults = object.__getattribute__(self, "_inner"), object.__getattribute__(self, "_faults")
        attr = getattr(inner, name)
        if name not in FaultyLedger._LOCKED:
            return attr

        def call(*args, **kwargs):
            error = faults.hit("lock")
            if error is None and name in LEDGER_KINDS:
                error = faults.hit(name)
            if error is not None:
                raise error
            return attr(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value) -> None:
        setattr(object.__getattribute__(self, "_inner"), name, value)
