# SPDX-License-Identifier: Apache-2.0
"""Threads whose Python calls do not map and unmap memory at a chunk's border.

CPython 3.11 and 3.12 keep a thread's frames in 16 KiB chunks and free a chunk as soon as the frame that opened it
returns. A loop that calls a function whose frame lands across a border then maps and unmaps a chunk on every call
(https://github.com/python/cpython/issues/142183; 3.13's later releases and 3.14 keep one chunk instead). On the CPU
an engine step makes thousands of such calls (the model's modules; Triton's interpreter): one step test ran 3x slower
(52 s against 17 s), most of it in mmap and munmap, at the stack depth pytest happened to give it.

A thread's first chunk is never freed and is made as large as its first frame needs. `Thread` starts with a frame of
2**15 locals, so its first chunk is 512 KiB with ~250 KiB (~31,000 slots, hundreds of frames) free above that frame:
the calls it makes stay in that one chunk.
"""

import sys
import threading
from collections.abc import Callable
from typing import Any

ROOT_LOCALS = 1 << 15  # a first frame of 256 KiB: CPython rounds the first chunk up to the next power of two


def _roomy_bootstrap() -> Callable[[threading.Thread], None]:
    """threading.Thread._bootstrap behind a frame of ROOT_LOCALS locals (never set: only the frame's size counts)."""
    names = "=".join(f"_{i}" for i in range(ROOT_LOCALS))
    source = f"def _bootstrap(self):\n    if self is None:\n        {names} = None\n    base(self)\n"
    scope: dict[str, Any] = {"base": threading.Thread._bootstrap}
    exec(compile(source, "<vkv.threads>", "exec"), scope)  # noqa: S102 - generated above, no outside input
    return scope["_bootstrap"]


class Thread(threading.Thread):
    """A threading.Thread whose first frame reserves room for all its calls (see the module's docstring); on Pythons
    that cache a chunk (3.14 on) it is threading.Thread."""

    if sys.version_info < (3, 14):
        _bootstrap = _roomy_bootstrap()


def run_in_thread(fn: Callable[[], Any], name: str = "vkv-call") -> Any:
    """fn() in a fresh `Thread`, waited for: its result, or its exception raised here."""
    box: list[tuple[bool, Any]] = []

    def call() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # handed to the caller, whatever it is
            box.append((False, e))

    thread = Thread(target=call, name=name, daemon=True)  # Ctrl-C in join() leaves it behind
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value
