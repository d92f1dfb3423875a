# SPDX-License-Identifier: Apache-2.0
"""One member of bench/stress.py: random allocate / grow / free / share_prefix / trim / read on a KVCache
over a PagePool on the shared ledger, every slot's tokens checked against the pattern they were written with.

    python bench/stress_worker.py --ledger PATH --log PATH --index I --incarnation K --parent PID [...]

Each token of a slot is written with a value derived from (member, incarnation, slot, generation) and the
token's position, and checked on every read, before every free and in both slots of a shared prefix. Every
mapped page is written whole, so the memory the OS reports alive is the memory the pool holds. Writes JSON
lines to --log: ready, counts (every 0.25 s), slow (an operation over 20 ms), checksum, error, quiet (after
SIGUSR1: every slot checked, idle pages given back) and done (after SIGTERM: every slot checked and freed).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import signal
import time
from collections import Counter

import torch

from vkv import CacheConfig, KVCache, Ledger, OutOfPagesError, PagePool, get_driver
from vkv.allocator.ledger import LedgerBusyError

REFUSALS = (OutOfPagesError, LedgerBusyError)  # a normal answer under pressure: the member goes on
WEIGHTS = {"allocate": 3, "grow": 4, "free": 2, "share_prefix": 1, "trim": 0.5, "read": 2}
SLOW_S, HEARTBEAT_S = 0.02, 0.25
TOKEN_BYTES = 2 * 2 * 2 * 64 * 4  # 2 layers x (k, v) x 2 kv heads x head_dim 64 x float32


class Member:
    def __init__(self, args: argparse.Namespace):
        self.args, self.rng = args, random.Random(hash((args.seed, args.index, args.incarnation)))
        self.log = open(args.log, "a", buffering=1)  # noqa: SIM115 - open for the member's life
        self.ledger = Ledger.open(path=args.ledger, lock_timeout_s=args.lock_timeout)
        driver = get_driver(args.backend, page_size=args.page_size)
        name = f"stress-{args.index}-{args.incarnation}"
        self.pool = PagePool(driver, args.budget, ledger=self.ledger, name=name, ledger_timeout_s=args.grow_timeout)
        config = CacheConfig(
            num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=8,
            max_seq_len=4 * (args.page_size // TOKEN_BYTES),
        )  # fmt: skip
        self.cache = KVCache(config, self.pool)
        self.views = [v(layer) for layer in range(2) for v in (self.cache.key_view, self.cache.value_view)]
        self.slots: dict[int, list[tuple[int, int, int]]] = {}  # slot -> segments (first, end, seed) written
        self.generation = 0
        self.ops, self.refused, self.errors = Counter(), Counter(), Counter()
        self.checksum_failures = 0
        self.stop = self.quiesce = self.quiet = False
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "quiesce", True))

    def emit(self, event: str, **fields) -> None:
        self.log.write(json.dumps({"ev": event, "t": time.monotonic(), "pid": os.getpid(), **fields}) + "\n")

    def counts(self) -> dict:
        return {"ops": dict(self.ops), "refused": dict(self.refused), "errors": dict(self.errors)}

    # -- data ----------------------------------------------------------------------------------------

    def expected(self, first: int, end: int, seed: int, plane: int) -> torch.Tensor:
        base = (seed * 4099 + plane * 1_000_003) % (1 << 22)
        values = (torch.arange(first, end, dtype=torch.int64) + base) % (1 << 23)  # exact in float32
        return values.to(torch.float32).to(self.cache.device)[:, None, None]

    def written(self, slot: int) -> int:
        segments = self.slots[slot]
        return segments[-1][1] if segments else 0

    def fill(self, slot: int) -> None:
        """Write every mapped token of ``slot`` past those written already (whole pages: all of it is touched)."""
        first, end = self.written(slot), self.cache.capacity(slot)
        if end <= first:
            return
        self.generation += 1
        seed = hash((self.args.index, self.args.incarnation, slot, self.generation)) & 0xFFFFF
        for plane, view in enumerate(self.views):
            view[slot, first:end] = self.expected(first, end, seed, plane)
        self.slots[slot].append((first, end, seed))

    def verify(self, slot: int) -> bool:
        for first, end, seed in self.slots[slot]:
            for plane, view in enumerate(self.views):
                got = view[slot, first:end]
                bad = (got != self.expected(first, end, seed, plane)).any(dim=(1, 2)).nonzero()
                if len(bad):
                    token = first + int(bad[0])
                    self.checksum_failures += 1
                    self.emit("checksum", slot=slot, plane=plane, token=token, segment=[first, end, seed])
                    self.cache.free(slot)  # report it once, not on every later read
                    del self.slots[slot]
                    return False
        return True

    def pick(self) -> int | None:
        return self.rng.choice(sorted(self.slots)) if self.slots else None

    # -- operations ----------------------------------------------------------------------------------

    def op_allocate(self) -> None:
        if not self.cache.can_allocate():
            return self.op_free()
        n = self.rng.randint(1, self.cache.config.max_seq_len // 2)
        slot = self.cache.allocate(n)
        self.slots[slot] = []
        try:
            self.cache.grow(slot, n)
        except BaseException:
            self.cache.free(slot)
            del self.slots[slot]
            raise
        self.fill(slot)

    def op_grow(self) -> None:
        slot = self.pick()
        if slot is None or not self.verify(slot):
            return
        tokens_per_page = self.args.page_size // TOKEN_BYTES
        n = min(self.cache.config.max_seq_len, self.written(slot) + self.rng.randint(1, 2 * tokens_per_page))
        self.cache.grow(slot, n)
        self.fill(slot)

    def op_free(self) -> None:
        slot = self.pick()
        if slot is not None and self.verify(slot):
            self.cache.free(slot)
            del self.slots[slot]

    def op_share_prefix(self) -> None:
        sources = [s for s in sorted(self.slots) if self.written(s)]
        if not sources or not self.cache.can_allocate():
            return
        src = self.rng.choice(sources)
        n = self.rng.randint(1, self.written(src))
        dst = self.cache.allocate()
        try:
            self.cache.share_prefix(src, dst, n)
        except BaseException:
            self.cache.free(dst)
            raise
        self.slots[dst] = [(first, min(end, n), seed) for first, end, seed in self.slots[src] if first < n]
        self.fill(dst)
        if self.verify(dst):
            self.verify(src)

    def op_trim(self) -> None:
        self.cache.trim()
        self.pool.shrink(keep=0)

    def op_read(self) -> None:
        slot = self.pick()
        if slot is not None:
            self.verify(slot)

    def warm_up(self) -> None:
        """Every data path once at its largest (a longest slot, a prefix shared with a copied partial page) before
        "ready": the device allocator's cache and lazily loaded kernels take their memory now, so on cuda what the
        supervisor counts as this member's context stays put."""
        config, per_page = self.cache.config, self.args.page_size // TOKEN_BYTES
        try:
            src = self.cache.allocate()
            self.slots[src] = []
            self.cache.grow(src, config.max_seq_len)
            self.fill(src)
            dst = self.cache.allocate()
            self.cache.share_prefix(src, dst, per_page + 1)
            self.slots[dst] = [(0, per_page + 1, self.slots[src][0][2])]
            self.fill(dst)
            self.verify(dst)
            self.verify(src)
        except REFUSALS:
            pass  # the others hold the budget: the first operations warm up instead
        finally:
            for slot in range(config.max_slots):
                if self.cache.is_allocated(slot):
                    self.cache.free(slot)
            self.slots.clear()
            with contextlib.suppress(*REFUSALS):  # a stopped member holds the lock: the pool keeps them a while
                self.op_trim()

    def settle(self) -> None:
        """Check every slot and give every idle page back: what stays alive is what the slots hold."""
        for slot in sorted(self.slots):
            self.verify(slot)
        self.op_trim()
        self.quiet = True
        self.emit("quiet", live_pages=self.pool.stats().live, **self.counts())

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        deadline = time.monotonic() + self.args.max_seconds
        beat = 0.0
        while not self.stop and time.monotonic() < deadline:
            now = time.monotonic()
            if now - beat > HEARTBEAT_S:
                self.emit("counts", **self.counts())
                beat = now
            if self.quiesce and not self.quiet:
                kind, action = "settle", self.settle
            elif self.quiet:
                time.sleep(0.01)
                continue
            else:
                kind = self.rng.choices(kinds, weights)[0]
                action = getattr(self, f"op_{kind}")
            try:
                action()
                self.ops[kind] += 1
            except REFUSALS:
                self.refused[kind] += 1
            except Exception as exc:  # noqa: BLE001 - any other error is a finding: recorded, the member goes on
                self.errors[kind] += 1
                self.emit("error", kind=kind, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if time.monotonic() - now > SLOW_S:
                self.emit("slow", kind=kind, t0=now, dur=time.monotonic() - now)
        for slot in sorted(self.slots):
            if self.verify(slot):
                self.cache.free(slot)
        self.cache.close()
        self.pool.close()
        self.ledger.close()
        self.emit("done", checksum_failures=self.checksum_failures, **self.counts())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ledger", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--incarnation", type=int, required=True)
    p.add_argument("--parent", type=int, required=True, help="the supervisor's pid: the member dies with it")
    p.add_argument("--go", required=True, help="a file whose existence starts the operations")
    p.add_argument("--backend", default="host")
    p.add_argument("--page-size", type=int, default=2 << 20)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lock-timeout", type=float, default=0.5)
    p.add_argument("--grow-timeout", type=float, default=0.25)
    p.add_argument("--max-seconds", type=float, required=True, help="the loop ends by itself after this")
    args = p.parse_args()
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphan if the supervisor dies
    if os.getppid() != args.parent:
        return
    torch.set_num_threads(1)  # several members share the cores
    give_up = time.monotonic() + 60
    while True:  # opening the ledger and registering meet a stopped member's lock too: a refusal, tried again
        try:
            member = Member(args)
            break
        except LedgerBusyError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)
    member.warm_up()
    member.emit("ready")
    give_up = time.monotonic() + 120
    while not os.path.exists(args.go) and not member.stop and time.monotonic() < give_up:
        time.sleep(0.005)
    member.run()


if __name__ == "__main__":
    main()
