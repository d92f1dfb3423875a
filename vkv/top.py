# SPDX-License-Identifier: Apache-2.0
"""``vkv top`` (every model on every GPU, live, from the ledgers) and ``vkv limit MODEL SIZE`` (a model's limit at
run time). The command line (vkv/cli.py) parses their arguments and calls :func:`top` and :func:`limit`."""

from __future__ import annotations

import os
import select
import sys
import termios
import textwrap
import time
import tty

from vkv.allocator import InvalidRequestError
from vkv.allocator.ledger import (
    Ledger,
    LedgerBusyError,
    LedgerError,
    LedgerStats,
    default_path,
    format_bytes,
    ledger_devices,
)
from vkv.allocator.ledger_file import ledger_directory

WIDTH = 80  # every line of vkv top fits a terminal of 80 columns


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (\x1b, \n, ...): never sent raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fit(text: str, width: int, *, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "~" + text[len(text) - width + 1 :] if keep_end else text[: width - 1] + "~"


def _wrapped(text: str) -> str:
    """``text`` with every line longer than WIDTH wrapped (messages; table lines fit already)."""
    lines = []
    for line in text.split("\n"):
        lines += textwrap.wrap(line, WIDTH, break_on_hyphens=False) if len(line) > WIDTH else [line]
    return "\n".join(lines)


def _short(nbytes: int) -> str:
    """Bytes in at most 5 characters: 0, 512B, 20M, 1.5G, 1023M, 140G."""
    if nbytes < 1024:
        return f"{nbytes}B" if nbytes else "0"
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift:
            value = nbytes / (1 << shift)
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    raise AssertionError("unreachable")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 1000 else f"{value:.1f}"


def _table(
    stats: LedgerStats, rates: dict[tuple, tuple[float, float]] | None, clock: str = "", device: str | None = None
) -> str:
    """Two header lines (the device and where, then the budget) and one row per model, every line at most WIDTH
    columns. Sizes are bytes (K/M/G/T binary); rates are pages/s mapped and unmapped since the last frame."""
    size, budget, mapped = stats.page_size, stats.budget_pages, stats.pages_mapped
    share = f"{100 * mapped / budget:.0f}%" if budget else "-"
    where = clock + ("" if device is None else f"device {_printable(device)}  ")
    where += f"page {format_bytes(size)}  models {len(stats.entries)}  "
    lines = [
        where + _fit(_printable(stats.path), WIDTH - len(where), keep_end=True),
        f"budget {_pages(budget, size)}  mapped {_pages(mapped, size)} {share}  "
        f"in use {_pages(stats.pages_in_use, size)}",
    ]
    rows = [("MODEL", "PID", "MAPPED", "USED", "LIMIT", "PRIO/MIN", "MAP/s", "UNMAP/s", "ASKED")]
    for e in sorted(stats.entries, key=lambda e: (-e.pages_mapped, e.name)):
        up, down = (rates or {}).get((e.index, e.pid, e.name), (None, None))
        rows.append(
            (
                _printable(e.name) + (" (exiting)" if e.exiting else ""),  # its pages count until the driver frees them
                str(e.pid),
                _short(e.pages_mapped * size),
                _short(e.pages_in_use * size),
                _short(e.limit_pages * size) if e.limit_pages else "none",
                f"{e.priority}/{_short(e.min_pages * size)}",
                _rate(up),
                _rate(down),
                _short(e.release_asked * size),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    gaps = [2, 2] + [1] * (len(widths) - 3)  # name and pid apart; the numbers one space apart, right-aligned
    widths[0] = max(len(rows[0][0]), min(widths[0], WIDTH - sum(widths[1:]) - sum(gaps)))
    for row in rows:
        cells = [_fit(row[0], widths[0]).ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:], strict=True)]
        lines.append("".join(cell + " " * gap for cell, gap in zip(cells, gaps, strict=False)) + cells[-1])
    return "\n".join(lines)


def _pages(n: int, page_size: int) -> str:
    return f"{n} ({format_bytes(n * page_size)})"


def _rates(before: LedgerStats, after: LedgerStats, seconds: float) -> dict[tuple, tuple[float, float]]:
    old = {(e.index, e.pid, e.name): e for e in before.entries}
    rates = {}
    for e in after.entries:
        key = (e.index, e.pid, e.name)
        if key in old and seconds > 0:
            was = old[key]
            up, down = e.mapped_total - was.mapped_total, e.unmapped_total - was.unmapped_total
            rates[key] = up / seconds, down / seconds
    return rates


class _Keys:
    """Keys pressed on a terminal's stdin, read without blocking (cbreak mode, restored on exit)."""

    def __enter__(self) -> _Keys:
        self._fd, self._saved = None, None
        if sys.stdin is not None and sys.stdin.isatty():
            fd = sys.stdin.fileno()
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self._fd = fd
        return self

    @property
    def interactive(self) -> bool:
        return self._fd is not None

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def quit_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True as soon as q is pressed (or the terminal hangs up)."""
        if self._fd is None:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self._fd], [], [], left)[0]:
                key = os.read(self._fd, 1)
                if key in (b"q", b"Q", b""):
                    return True
        return False


class _Watched:
    """One ledger that top shows: opened once its file exists, its last table kept (and shown while it is busy)."""

    def __init__(self, device: str | None, path: str | None, directory: str | None, lock_wait: float):
        self.device, self.lock_wait = device, lock_wait
        self.where = {"path": path} if path is not None else {"directory": directory}
        self.file = path if path is not None else default_path(device, directory)
        self.ledger: Ledger | None = None
        self.before: LedgerStats | None = None
        self.since, self.table = 0.0, ""

    def open(self) -> Ledger:
        if self.ledger is None:
            self.ledger = Ledger.open(self.device, lock_timeout_s=self.lock_wait, **self.where)
        return self.ledger

    def frame(self, clock: str) -> str:
        try:
            if self.ledger is None and not os.path.exists(self.file):
                return f"{clock}waiting for a ledger at {_printable(self.file)}: no vkv process has created one yet"
            stats, now = self.open().stats(), time.monotonic()
            rates = None if self.before is None else _rates(self.before, stats, now - self.since)
            self.table, self.before, self.since = _table(stats, rates, clock, self.device), stats, now
            return self.table
        except LedgerBusyError as e:  # a member holds the lock (stopped?): say so, keep refreshing
            return (self.table + "\n" if self.table else clock) + f"ledger busy: {e}"

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()


def _watch_list(watched: dict[str, _Watched], device: str | None, path: str | None, directory: str | None,
                lock_wait: float) -> list[_Watched]:  # fmt: skip
    """The ledgers to show: ``path``'s, ``device``'s, or (neither given) every device's found in the directory,
    looked for again at each refresh (``watched`` keeps those seen, by file)."""
    if path is not None or device is not None:
        found = [(device, path)]
    else:
        found = [(d, None) for d in ledger_devices(directory)]
    for d, p in found:
        key = p if p is not None else default_path(d, directory)
        if key not in watched:
            watched[key] = _Watched(d, p, directory, lock_wait)
    return list(watched.values())


def top(device: str | None, path: str | None, directory: str | None, interval: float, once: bool) -> int:
    """Show the models of every device's ledger (or of ``device``'s, or of the file ``path``), a block per device,
    every ``interval`` seconds until q or Ctrl-C; ``once``: one frame, with the rates measured over one interval.
    Live, it waits for a ledger that does not exist yet and shows a lock that stays held (a stopped member)
    instead of hanging."""
    lock_wait, watched = min(interval, 1.0), {}
    try:
        if once:
            shown = _watch_list(watched, device, path, directory, lock_wait)
            if not shown:
                raise LedgerError(f"no ledger in {ledger_directory(directory)}: no vkv process has created one")
            befores = [(w.open().stats(), time.monotonic()) for w in shown]
            time.sleep(interval)
            tables = []
            for w, (before, since) in zip(shown, befores, strict=True):
                stats = w.open().stats()
                tables.append(_table(stats, _rates(before, stats, time.monotonic() - since), device=w.device))
            print("\n\n".join(tables))
            return 0
        with _Keys() as keys:
            while True:
                clock = time.strftime("%H:%M:%S  ")
                shown = _watch_list(watched, device, path, directory, lock_wait)
                frames = [w.frame(clock) for w in shown] or [
                    f"{clock}waiting for a ledger in {_printable(ledger_directory(directory))}: no vkv process has "
                    "created one yet"
                ]
                note = "q or Ctrl-C quits" if keys.interactive else "Ctrl-C quits"
                print("\x1b[H\x1b[2J" + _wrapped("\n\n".join(frames) + f"\n{note}"), flush=True)
                if keys.quit_within(interval):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for w in watched.values():
            w.close()


def _live(ledger: Ledger) -> list:
    """Its entries but those of exiting processes (each keeps its name until it goes: not that model any more)."""
    return [e for e in ledger.entries() if not e.exiting]


def limit(model: str, nbytes: int | None, device: str | None, path: str | None, directory: str | None) -> int:
    """Set ``model``'s limit in ``path``'s or ``device``'s ledger, or (neither given) in every device's ledger that
    has it (a tensor-parallel model has an entry on each of its devices): all or none."""
    if path is not None or device is not None:
        where = {"path": path} if path is not None else {"directory": directory}
        with Ledger.open(device, **where) as ledger:
            print(_limited(ledger, model, nbytes))
        return 0
    devices = ledger_devices(directory)
    if not devices:
        raise LedgerError(f"no ledger in {ledger_directory(directory)}: no vkv process has created one")
    ledgers = [Ledger.open(d, directory=directory) for d in devices]
    try:
        live = [_live(b) for b in ledgers]  # each ledger's entries, read once
        # (device, ledger, the model's entry) of each ledger that has it: a live name is one entry of a ledger
        holding = [
            (d, b, e) for d, b, entries in zip(devices, ledgers, live, strict=True) for e in entries if e.name == model
        ]
        if not holding:
            names = sorted({repr(e.name) for entries in live for e in entries})
            raise LedgerError(
                f"no model named {model!r} in the ledgers of devices {', '.join(devices)} in "
                f"{ledger_directory(directory)}; live models: {', '.join(names) or 'none'}"
            )
        for _, ledger, e in holding:  # refuse before changing any: a limit under a minimum, a bad size
            pages = ledger._limit_pages(nbytes)
            if pages and pages < e.min_pages:
                raise InvalidRequestError(f"limit {pages} pages is below {model!r}'s minimum of {e.min_pages} pages")
        for d, ledger, _ in holding:
            print(f"device {d}: {_limited(ledger, model, nbytes)}")
    finally:
        for ledger in ledgers:
            ledger.close()
    return 0


def _limited(ledger: Ledger, model: str, nbytes: int | None) -> str:
    e, size = ledger.set_limit(model, nbytes), ledger.page_size
    shown = f"{e.limit_pages} pages ({format_bytes(e.limit_pages * size)})" if e.limit_pages else "none"
    asked = f"; asked to give back {e.release_asked}" if e.release_asked else ""
    return f"limit of {model!r} set to {shown}; it has {e.pages_mapped} pages mapped{asked}"
