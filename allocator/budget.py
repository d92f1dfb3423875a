# SPDX-License-Identifier: Apache-2.0
"""Who counts a pool's pages besides the pool itself (whose own limit it checks under its lock).

One interface, two implementations, so the pool has one code path: :class:`LocalBudget` counts pages
for this pool alone; :class:`LedgerBudget` also counts them device-wide in a :class:`Ledger` shared with
other processes (growth may then wait for other models to give pages back, or be refused). ``claim(n)`` is called
before ``n`` pages are created and ``unclaim(n)`` after ``n`` are released; ``counted`` is what the
budget holds for this pool now.
"""

from __future__ import annotations

import threading
from typing import Protocol

from .ledger import Ledger


class Budget(Protocol):
    counted: int  # pages claimed and not unclaimed

    def claim(self, n: int) -> None:
        """Count ``n`` more pages alive, or raise (OutOfPagesError, LedgerError) having counted nothing."""

    def unclaim(self, n: int) -> None:
        """Count ``n`` fewer pages alive, or raise having changed nothing."""

    def asked(self) -> int:
        """Pages other models asked this pool to give back."""

    def clear_asked(self, n: int) -> None: ...

    def publish(self, in_use: int) -> None:
        """Say how many of the counted pages hold live data (the rest may be asked for)."""

    def close(self) -> None: ...


class LocalBudget:
    """Pages counted by this pool alone."""

    def __init__(self):
        self.counted = 0
        self._lock = threading.Lock()

    def claim(self, n: int) -> None:
        with self._lock:
            self.counted += n

    def unclaim(self, n: int) -> None:
        with self._lock:
            self.counted -= n

    def asked(self) -> int:
        return 0

    def clear_asked(self, n: int) -> None:
        pass

    def publish(self, in_use: int) -> None:
        pass

    def close(self) -> None:
        pass


class LedgerBudget:
    """Pages counted in a device-wide ledger entry too. ``publish`` and ``unclaim`` share a lock, so the
    in-use count published never exceeds what the ledger counts for this entry (a grow only adds to it)."""

    def __init__(self, ledger: Ledger, name: str, timeout_s: float):
        self.counted = 0
        self.ledger, self.timeout_s = ledger, timeout_s
        self.entry: int | None = ledger.register(name)
        self._lock = threading.Lock()

    def claim(self, n: int) -> None:
        self.ledger.grow(self.entry, n, timeout_s=self.timeout_s)
        with self._lock:
            self.counted += n

    def unclaim(self, n: int) -> None:
        with self._lock:
            self.ledger.shrink(self.entry, n)
            self.counted -= n

    def asked(self) -> int:
        return self.ledger.asked(self.entry)

    def clear_asked(self, n: int) -> None:
        self.ledger.clear_asked(self.entry, n)

    def publish(self, in_use: int) -> None:
        with self._lock:
            self.ledger.set_in_use(self.entry, max(0, min(in_use, self.counted)))

    def close(self) -> None:
        """Leave the ledger (only once nothing is counted)."""
        if self.entry is not None and self.counted == 0:
            self.ledger.unregister(self.entry)
            self.entry = None
