# SPDX-License-Identifier: Apache-2.0
"""One background thread that runs mapping jobs off the critical path.

One thread on purpose: the driver serialises VMM calls, and more mapping threads were slower on the
H200 (docs/allocator.md). Jobs are keyed: a newer job for a key replaces one still waiting, so a
request that grew twice before the mapper got to it is mapped once, to the larger size.

A serving loop can hold the mapper (``with mapper.hold():``) while it plans and launches a step, so that no
VMM call starts then; jobs start again once the launch is queued, and run while the GPU works. A hold does
not wait for a job already running: before a CUDA-graph capture, drain() and then hold. On the H200 the
decode loop of bench/elastic.py measured the same with and without the hold (docs/elastic.md): VMM calls
running beside a launch did not delay it there.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from .checks import check_seconds
from .errorlog import ErrorLog
from .errors import InvalidRequestError


class Mapper:
    """A single worker thread running the latest submitted job per key, in submission order.

    A job that raises does not stop the thread: the error is counted and kept in ``errors`` (an ErrorLog of
    the first 16, the latest 16 and a count per type), so nothing fails silently and a flood of one error
    cannot hide another.
    """

    def __init__(self, name: str = "vkv-mapper", idle_interval_s: float = 0.005):
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"name must be a non-empty str, got {name!r}")
        idle_interval_s = check_seconds("idle_interval_s", idle_interval_s, positive=True)
        self._jobs: OrderedDict[Hashable, Callable[[], object]] = OrderedDict()
        self._idle: list[Callable[[], object]] = []  # run every idle_interval_s while no job waits
        self.idle_interval_s = idle_interval_s
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._holds: list[int] = []  # the threads inside hold() blocks: no job or idle hook starts meanwhile
        self.done = 0
        self.failed = 0
        self.errors = ErrorLog(keep=16)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, job: Callable[[], object]) -> None:
        """Queue ``job``; it replaces a job of the same key that has not started yet."""
        _check_hashable("key", key)
        _check_callable("job", job)
        with self._cond:
            if self._closed and threading.current_thread() is not self._thread:  # a job's remainder still runs
                raise RuntimeError("the mapper has been closed")
            self._jobs.pop(key, None)
            self._jobs[key] = job
            self._cond.notify_all()  # all: a drain() waiter must not take the wake-up meant for the thread

    def add_idle(self, hook: Callable[[], object]) -> None:
        """Run ``hook`` from the mapper thread whenever it has been idle for ``idle_interval_s`` (e.g. a
        pool answering other processes' requests to give pages back)."""
        _check_callable("hook", hook)
        with self._cond:
            self._idle.append(hook)
            self._cond.notify_all()  # the thread may be asleep until the next job

    def cancel(self, key: Hashable) -> None:
        """Drop the waiting job of ``key`` (a running one finishes)."""
        with self._cond:
            self._jobs.pop(key, None)
            self._cond.notify_all()  # drain() may now be done

    @contextlib.contextmanager
    def hold(self):
        """Start no job and no idle hook inside this block (a job already running finishes; keep jobs
        short). Blocks may nest and come from several threads; drain() waits for them to end (and refuses to
        run inside its own thread's hold)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the mapper has been closed")
            self._holds.append(threading.get_ident())
        try:
            yield self
        finally:
            with self._cond:
                self._holds.remove(threading.get_ident())
                self._cond.notify_all()

    @property
    def held(self) -> bool:
        return bool(self._holds)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._jobs) + self._busy

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run; False if ``timeout`` seconds passed first."""
        if timeout is not None:
            timeout = check_seconds("timeout", timeout)
        with self._cond:
            if threading.get_ident() in self._holds:
                raise RuntimeError("drain() inside this thread's own hold() would never return: drain before holding")
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def _runnable(self) -> bool:
        """A job may start now (under the lock). Closing overrides a hold: close() runs what is queued."""
        return bool(self._jobs) and (not self._holds or self._closed)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._idle and not self._holds:
                    self._cond.wait_for(lambda: self._runnable() or self._closed, self.idle_interval_s)
                else:  # nothing to do now: sleep until a job, a hook or the hold's end, no wake-ups for the GIL
                    self._cond.wait_for(lambda: self._runnable() or self._closed or (self._idle and not self._holds))
                if self._closed and not self._jobs:
                    return
                has_work = self._runnable()
                if has_work:
                    _, job = self._jobs.popitem(last=False)
                    jobs = [job]
                elif self._idle and not self._holds:
                    jobs = list(self._idle)
                else:
                    continue  # held: neither jobs nor idle hooks until the hold ends
                self._busy = True
            try:
                for job in jobs:
                    job()
                self.done += has_work
            except BaseException as e:  # noqa: BLE001 - kept and counted, never silent
                self.failed += 1
                self.errors.record(e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> Mapper:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise InvalidRequestError(f"{name} must be a callable taking no arguments, got {type(fn).__name__}")


def _check_hashable(name: str, key: object) -> None:
    try:
        hash(key)
    except TypeError:
        raise InvalidRequestError(f"{name} must be hashable (a job's key), got {type(key).__name__}") from None
