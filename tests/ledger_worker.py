# SPDX-License-Identifier: Apache-2.0
"""Model processes for tests/test_ledger.py, run as a script (one torch import, then fork).

    python ledger_worker.py swarm PATH PROCESSES STEPS SEED   # models growing and shrinking at random
    python ledger_worker.py hold PATH NAME PAGES              # map PAGES, print "ready", sleep until killed
    python ledger_worker.py lock PATH                         # take the lock, print "locked", hold it until a
                                                              # line comes on stdin, print "released", sleep
    python ledger_worker.py truncate PATH SIZE                # truncate an open ledger's file, try every call

Each model holds real host-backend memory: it counts pages in the ledger before mapping them and
uncounts them after unmapping, writes a pattern of its own into every page it maps, and checks the
pattern of all its pages (and its ledger entry) before every change. A responder thread, standing in
for the mapper thread, gives idle pages back when other models ask.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import traceback

from vkv.allocator import OutOfPagesError, PagePool, VirtualRange
from vkv.allocator.ledger import Ledger

PAGE = 2 << 20
RANGE_PAGES = 10


class Model:
    def __init__(self, path: str, name: str, seed: int):
        self.rng = random.Random(seed)
        self.pool = PagePool("host", budget_bytes=RANGE_PAGES * PAGE)
        self.range = VirtualRange(self.pool, RANGE_PAGES)
        self.view = self.range.tensor().numpy()
        self.ledger = Ledger.open(path=path, page_size=PAGE)
        self.min_pages = self.rng.choice([0, 1])
        self.me = self.ledger.register(name, priority=self.rng.randint(0, 2), min_bytes=self.min_pages * PAGE)
        self.lock = threading.Lock()  # the range, the patterns and in_use change together
        self.stamps: dict[int, int] = {}  # page -> the byte value filling it
        self.in_use: set[int] = set()
        self.counts = dict(grown=0, refused=0, shrunk=0, released=0, checks=0)
        self.version = 0

    def page(self, i: int):
        return self.view[i * PAGE : (i + 1) * PAGE]

    def check(self) -> None:
        """Every mapped page still holds its pattern; the ledger and the pool count exactly what is mapped."""
        mapped = self.range.mapped()
        assert mapped == sorted(self.stamps), (mapped, sorted(self.stamps))
        for i in mapped:
            page = self.page(i)
            assert page[0] == page[-1] == self.stamps[i] and (page == self.stamps[i]).all(), f"page {i} lost data"
        entry = self.ledger.entry(self.me)
        assert entry.pages_mapped == len(mapped) == self.pool.stats().in_use, (entry, len(mapped))
        assert entry.pages_in_use == len(self.in_use)
        self.counts["checks"] += 1

    def grow(self) -> None:
        free = [i for i in range(RANGE_PAGES) if i not in self.stamps]
        if not free:
            return
        todo = self.rng.sample(free, min(len(free), self.rng.randint(1, 4)))
        try:
            self.ledger.grow(self.me, len(todo), timeout_s=0.1, poll_s=0.002)
        except OutOfPagesError:
            self.counts["refused"] += 1
            return
        with self.lock:
            self.range.map(todo)
            for i in todo:
                self.version += 1
                self.stamps[i] = (os.getpid() * 7 + i * 13 + self.version) % 255 + 1
                self.page(i)[:] = self.stamps[i]
            self.in_use.update(todo)  # a model grows because it needs the pages
            self.ledger.set_in_use(self.me, len(self.in_use))
            self.counts["grown"] += len(todo)

    def unmap(self, pages: list[int]) -> None:
        """With the lock held: check, unmap, then uncount."""
        for i in pages:
            assert (self.page(i) == self.stamps.pop(i)).all(), f"page {i} lost data before unmapping"
        self.range.unmap(pages)
        self.ledger.shrink(self.me, len(pages))

    def idle(self) -> list[int]:
        pages = [i for i in self.stamps if i not in self.in_use]
        return pages[: max(0, len(self.stamps) - max(len(self.in_use), self.min_pages))]

    def shrink(self) -> None:
        with self.lock:
            victims = self.idle()[: self.rng.randint(1, 3)]
            self.unmap(victims)
            self.counts["shrunk"] += len(victims)

    def use(self) -> None:
        with self.lock:
            mapped = sorted(self.stamps)
            self.in_use = set(self.rng.sample(mapped, self.rng.randint(0, len(mapped))))
            self.ledger.set_in_use(self.me, len(self.in_use))

    def respond(self, stop: threading.Event) -> None:
        while not stop.wait(0.001):
            asked = self.ledger.asked(self.me)
            if asked:
                with self.lock:
                    victims = self.idle()[:asked]
                    self.unmap(victims)
                    self.counts["released"] += len(victims)
                self.ledger.clear_asked(self.me, asked)

    def run(self, steps: int) -> dict:
        stop = threading.Event()
        responder = threading.Thread(target=self.respond, args=(stop,), daemon=True)
        responder.start()
        try:
            for _ in range(steps):
                with self.lock:
                    self.check()
                r = self.rng.random()
                self.grow() if r < 0.5 else self.shrink() if r < 0.8 else self.use()
                time.sleep(self.rng.random() * 0.002)
        finally:
            stop.set()
            responder.join()
        with self.lock:
            self.check()
            self.in_use.clear()
            self.ledger.set_in_use(self.me, 0)
            self.unmap(sorted(self.stamps))
            self.check()
        self.ledger.close()
        self.range.close()
        self.pool.close()
        return self.counts


def swarm(path: str, processes: int, steps: int, seed: int) -> int:
    children = []
    for k in range(processes):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one model, its counts as JSON on the pipe
            code = 1
            try:
                os.close(read)
                counts = Model(path, f"model-{k}", seed * 100 + k).run(steps)
                os.write(write, json.dumps(counts).encode())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write)
        children.append((pid, read))
    results, ok = [], True
    for pid, read in children:
        with os.fdopen(read) as f:
            out = f.read()
        ok &= os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        results.append(json.loads(out) if out else None)
    print(json.dumps(results), flush=True)
    return 0 if ok else 1


def hold(path: str, name: str, pages: int) -> int:
    pool = PagePool("host", budget_bytes=pages * PAGE)
    vrange = VirtualRange(pool, pages)
    ledger = Ledger.open(path=path, page_size=PAGE)
    me = ledger.register(name)
    ledger.grow(me, pages)
    vrange.map(range(pages))
    vrange.tensor().numpy()[:] = 0xAB
    ledger.set_in_use(me, pages)
    print("ready", flush=True)
    time.sleep(600)
    return 1


def lock(path: str) -> int:
    """A member that takes the ledger's lock and keeps it (the test stops it there with SIGSTOP)."""
    ledger = Ledger.open(path=path, page_size=PAGE)
    ledger.register("locker")
    with ledger._table():
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    time.sleep(600)
    return 1


def truncate(path: str, size: int) -> int:
    """Truncate the file under an open ledger, then make every call: each must raise a LedgerError (before,
    the first one died of SIGBUS reading the mapping). Prints {call: error type and message}."""
    ledger = Ledger.open(path=path, budget_bytes=8 * PAGE, page_size=PAGE)
    me = ledger.register("m")
    ledger.grow(me, 2)
    os.truncate(path, size)
    calls = {
        "grow": lambda: ledger.grow(me, 1),
        "try_grow": lambda: ledger.try_grow(me, 1),
        "shrink": lambda: ledger.shrink(me, 1),
        "set_in_use": lambda: ledger.set_in_use(me, 1),
        "asked": lambda: ledger.asked(me),
        "clear_asked": lambda: ledger.clear_asked(me, 1),
        "ask_release": lambda: ledger.ask_release(me, 1),
        "entry": lambda: ledger.entry(me),
        "stats": ledger.stats,
        "reap_dead": ledger.reap_dead,
        "register": lambda: ledger.register("n"),
        "set_limit": lambda: ledger.set_limit("m", PAGE),
        "set_budget": lambda: ledger.set_budget(4 * PAGE),
        "budget_pages": lambda: ledger.budget_pages,
        "unregister": lambda: ledger.unregister(me),
        "open": lambda: Ledger.open(path=path, page_size=PAGE),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    ledger.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "swarm":
        sys.exit(swarm(args[0], int(args[1]), int(args[2]), int(args[3])))
    if command == "lock":
        sys.exit(lock(args[0]))
    if command == "truncate":
        sys.exit(truncate(args[0], int(args[1])))
    sys.exit(hold(args[0], args[1], int(args[2])))
