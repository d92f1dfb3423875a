# SPDX-License-Identifier: Apache-2.0
"""Errors of a background thread, kept so that a flood of one kind cannot hide another."""

from __future__ import annotations

import threading
from collections import Counter


class ErrorLog:
    """The first ``keep`` errors, the latest ``keep``, and a count per error type.

    Examples
    --------
    >>> log = ErrorLog(keep=2)
    >>> for e in [KeyError("a"), ValueError("b"), ValueError("c"), ValueError("d")]:
    ...     log.record(e)
    >>> [str(e) for e in log.first], [str(e) for e in log.latest], dict(log.counts)
    (["'a'", 'b'], ['c', 'd'], {'KeyError': 1, 'ValueError': 3})
    """

    def __init__(self, keep: int = 16):
        self.keep = keep
        self.first: list[BaseException] = []
        self.latest: list[BaseException] = []
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, error: BaseException) -> None:
        with self._lock:
            self.counts[type(error).__name__] += 1
            if len(self.first) < self.keep:
                self.first.append(error)
            else:
                self.latest = [*self.latest[1 - self.keep :], error]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return len(self.first) + len(self.latest)

    def __iter__(self):
        return iter([*self.first, *self.latest])

    def __getitem__(self, i: int) -> BaseException:
        return [*self.first, *self.latest][i]

    def __repr__(self) -> str:
        kinds = ", ".join(f"{name} x{n}" for name, n in self.counts.most_common())
        return f"ErrorLog({self.total} errors: {kinds}; first {self.first!r}; latest {self.latest!r})"
