# SPDX-License-Identifier: Apache-2.0
"""Rows of a ledger file changed as another process (or damage) would: the ledger tests' shared helpers."""

import subprocess
import sys
from dataclasses import astuple

from vkv.allocator.ledger import Ledger
from vkv.allocator.ledger_file import ENTRY, HEADER, Row


def patch_row(path: str, i: int, **fields) -> None:
    """Change fields of row ``i`` in the file itself, as another process (or damage) would."""
    offset = HEADER.size + i * ENTRY.size
    with open(path, "r+b") as f:
        f.seek(offset)
        row = Row(*ENTRY.unpack(f.read(ENTRY.size)))
        for name, value in fields.items():
            setattr(row, name, value)
        f.seek(offset)
        f.write(ENTRY.pack(*astuple(row)))


def a_dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def dead_entry(ledger: Ledger, name: str, pages: int, pid: int) -> int:
    """An entry of ``pages`` pages that the dead process ``pid`` left behind (registered here, then handed to it)."""
    entry = ledger.register(name)
    ledger.grow(entry, pages)
    patch_row(ledger.path, entry, pid=pid, pid_start=1)
    ledger._mine.discard(entry)  # not this process's any more: closing this ledger leaves it
    return entry
