# SPDX-License-Identifier: Apache-2.0
"""The pool's fault matrix: every pool and range operation, with and without a ledger, failing the 1st,
2nd, ... call of each fault kind it reaches, as an error and as an interrupt.

After each fault: the error was raised, the state equals the state before (pages alive = the pool's live
pages = the budget's count = the ledger's count; counters; reference counts; each range's mapped pages,
their physical pages and every byte of them), and a clean retry succeeds and leaves a consistent state.
On the host, pages alive are the memfd's allocated blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from vkv.allocator import Ledger, PagePool, VirtualRange, get_driver
from vkv.allocator.errors import VkvError

from .conftest import PAGE
from .faults import DRIVER_KINDS, LEDGER_KINDS, Faults, FaultyDriver, FaultyLedger


@dataclass
class Env:
    faults: Faults
    pool: PagePool
    ledger: Ledger | None
    ranges: list[VirtualRange]
    held: list  # pages acquired by the setup, still in use
    other: int | None  # another model's ledger entry


def _fill(r: VirtualRange, index: int) -> None:
    r.tensor()[index * PAGE : (index + 1) * PAGE].fill_(_byte(r, index))


def _byte(r: VirtualRange, index: int) -> int:
    """The byte a page holds: a function of the physical page, so an alias reads what its source wrote."""
    return int(r.page(index)) * 37 % 251 + 1


def _alive(pool: PagePool, backend: str) -> int | None:
    if backend != "host":
        return None  # cuMemGetInfo also moves with torch's allocations: the pool's own count stands for it
    return os.fstat(pool.driver.inner._fd).st_blocks * 512 // PAGE


def _state(env: Env, backend: str) -> dict:
    pool, s = env.pool, env.pool.stats()
    ranges = []
    for r in env.ranges:
        if r._closed:
            ranges.append("closed")
            continue
        t = r.tensor()
        pages = {}
        for i in r.mapped():
            chunk = t[i * PAGE : (i + 1) * PAGE]
            pages[i] = (int(r.page(i)), int(chunk.min()), int(chunk.max()))
        ranges.append(pages)
    state = {
        "stats": s,
        "counted": pool._budget.counted,
        "refs": dict(pool._refs),
        "ranges": ranges,
        "alive": _alive(pool, backend),
    }
    if env.ledger is not None:
        entry = next(e for e in env.ledger._inner.entries() if e.name == "m")
        state["ledger"] = (entry.pages_mapped, entry.pages_in_use, entry.release_asked)
    return state


def _check_consistent(env: Env, backend: str) -> None:
    s, pool = env.pool.stats(), env.pool
    assert s.live == s.in_use + s.free == pool._budget.counted
    if backend == "host":
        assert _alive(pool, backend) == s.live
    if env.ledger is not None:
        assert next(e for e in env.ledger._inner.entries() if e.name == "m").pages_mapped == s.live
    for r in env.ranges:
        if not r._closed:
            for i in r.mapped():
                chunk = r.tensor()[i * PAGE : (i + 1) * PAGE]
                assert int(chunk.min()) == int(chunk.max()) == _byte(r, i), f"page {i} lost its data"


def _setup(backend: str, with_ledger: bool, tmp_path, n: int) -> Env:
    faults = Faults()
    driver = FaultyDriver(get_driver(backend), faults)
    ledger = other = None
    if with_ledger:
        path = str(tmp_path / f"ledger-{n}")
        ledger = FaultyLedger(Ledger.open(budget_bytes=32 * PAGE, page_size=PAGE, path=path), faults)
    pool = PagePool(driver, 16 * PAGE, ledger=ledger, name="m", ledger_timeout_s=0.05, answer_interval_s=None)
    r, r2 = VirtualRange(pool, 8), VirtualRange(pool, 8)
    r.map([0, 1, 2, 4, 5])
    r2.map([0])
    for i in (0, 1, 2, 4, 5):
        _fill(r, i)
    _fill(r2, 0)
    held = pool.acquire(2)
    pool.release(pool.acquire(3))  # 3 free pages
    if ledger is not None:
        other = ledger._inner.register("other")
    return Env(faults, pool, ledger, [r, r2], held, other)


def _teardown(env: Env) -> None:
    env.faults.disarm()
    for r in env.ranges:
        r.close()
    env.pool.release(list(env.held))
    env.pool.close()
    if env.ledger is not None:
        env.ledger._inner.close()


def _acquire(env: Env) -> None:
    env.held.extend(env.pool.acquire(5))  # 3 free + 2 created


def _acquire_free(env: Env) -> None:
    env.held.extend(env.pool.acquire(2))  # the hot path: free pages only


def _release(env: Env) -> None:
    env.pool.release(env.held)
    env.held.clear()


def _shrink(env: Env) -> None:
    env.pool.shrink(keep=0)


def _set_budget(env: Env) -> None:
    env.pool.set_budget(10 * PAGE)  # 8 in use + 3 free: 1 free page goes


def _answer(env: Env) -> None:
    if env.ledger is not None and not env.ledger._inner.asked(env.pool._budget.entry):
        env.ledger._inner.set_in_use(env.pool._budget.entry, 0)
        env.ledger._inner.ask_release(env.other, 2)
    env.pool.answer_release_requests()


def _map(env: Env) -> None:
    env.ranges[0].map([3, 6, 7])
    for i in (3, 6, 7):
        _fill(env.ranges[0], i)


def _map_one(env: Env) -> None:
    env.ranges[0].map([6])
    _fill(env.ranges[0], 6)


def _map_new(env: Env) -> None:
    env.ranges[1].map(range(1, 7))  # more than the free pages: creates too
    for i in range(1, 7):
        _fill(env.ranges[1], i)


def _unmap(env: Env) -> None:
    env.ranges[0].unmap([0, 1, 2, 4, 5])  # two runs: two driver calls


def _alias(env: Env) -> None:
    env.ranges[1].alias([(0, 3), (1, 4), (2, 5)], source=env.ranges[0])


def _close(env: Env) -> None:
    env.ranges[0].close()


OPS = {
    "acquire": _acquire,
    "acquire_free": _acquire_free,
    "release": _release,
    "shrink": _shrink,
    "set_budget": _set_budget,
    "answer_release_requests": _answer,
    "map": _map,
    "map_one": _map_one,
    "map_new": _map_new,
    "unmap": _unmap,
    "alias": _alias,
    "close": _close,
}
# Operations that commit part of their work by design: the state after a fault is consistent, not as before.
PARTIAL = {"answer_release_requests"}


@pytest.mark.parametrize("with_ledger", [False, True], ids=["local", "ledger"])
@pytest.mark.parametrize("op", list(OPS))
def test_a_fault_anywhere_leaves_the_state_as_before_and_a_retry_succeeds(backend, with_ledger, op, tmp_path):
    run, n = OPS[op], 0
    env = _setup(backend, with_ledger, tmp_path, n)  # a dry run counts the calls of each kind
    before = env.faults.calls.copy()
    run(env)
    _check_consistent(env, backend)
    calls = env.faults.calls - before
    _teardown(env)
    kinds = DRIVER_KINDS + (LEDGER_KINDS if with_ledger else ())
    cases = [(kind, k, stop) for kind in kinds for k in range(1, calls[kind] + 1) for stop in (False, True)]
    if op in ("acquire_free", "release"):
        assert not cases, f"{op} reached {dict(calls)}: it should make no driver or ledger call"
    for kind, k, interrupt in cases:
        n += 1
        env = _setup(backend, with_ledger, tmp_path, n)
        case = f"{op} with {kind} #{k} failing{' (interrupt)' if interrupt else ''}"
        start = _state(env, backend)
        env.faults.arm(kind, k, interrupt=interrupt)
        with pytest.raises(KeyboardInterrupt if interrupt else VkvError):
            run(env)
        assert env.faults.fired == [kind], case
        env.faults.disarm()
        if op in PARTIAL:
            _check_consistent(env, backend)
        else:
            assert _state(env, backend) == start, case
            _check_consistent(env, backend)
        run(env)  # a clean retry
        _check_consistent(env, backend)
        _teardown(env)
    print(f"faults injected: {op} {'with' if with_ledger else 'without'} a ledger: {len(cases)}")
