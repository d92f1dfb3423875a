# SPDX-License-Identifier: Apache-2.0
"""Bad input at every public entry point of the allocator, the ledger, the mapper and the cache (issue 12).

Each case is (entry point, argument, a call that passes a bad value there). A bad value must raise
InvalidRequestError or TypeError whose message names the argument, and leave the state as it was: the
pool's and the cache's stats, every slot's allocation and capacity, the ledger's entries, the pages each
range maps and every byte of them. Hypothesis picks the (case, value) pairs; the good-value properties
next to them show the same calls work when the input is right.

The attention wrapper, the kernel launchers and the CLI are in test_bad_input_compute.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vkv import CacheConfig, InvalidRequestError, KVCache, Ledger, Mapper, PagePool, VirtualRange, get_driver

pytestmark = pytest.mark.main_thread  # time_limit sets SIGALRM's handler
PAGE = 64 << 10  # small host pages keep every world cheap to build
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
TRIED: Counter[str] = Counter()  # bad inputs tried, per test (reported at the end of the module)
CALL_LIMIT_S = 20  # a call that runs longer hangs

# -- bad values --------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
NOT_INTS = (
    True, False, 1.5, 2.0, NAN, INF, -INF, "1", "2.0", "abc", None, b"1", np.float64(2.0), np.bool_(True),
    torch.tensor(1), torch.tensor([1]), torch.tensor(1.0), torch.tensor([1.0]), [1], (1,),
)  # fmt: skip
HUGE = (2**63, 10**30)
NOT_SEQUENCES = ("01", "abc", b"\x01", 5, 1.5, None, True, torch.tensor([0, 1]), {0: 1})
NOT_CALLABLES = ("job", 5, None, b"x", 1.5)


def bad_ints(lo: int | None = 0, hi: int | None = None) -> tuple:
    """Non-integers, plus integers outside [lo, hi] (and the huge ones when hi is None)."""
    out = list(NOT_INTS)
    if lo is not None:
        out += sorted({v for v in (lo - 1, -1, -(2**63), -(10**30)) if v < lo})
    out += [hi + 1, hi + 7, *HUGE] if hi is not None else list(HUGE)
    return tuple(out)


def bad_int_lists(lo: int | None = 0, hi: int | None = None, good: int = 0) -> tuple:
    """Containers that are not sequences of ints, and lists with one bad element after a good one."""
    return NOT_SEQUENCES + tuple([good, v] for v in bad_ints(lo, hi) if not isinstance(v, (list, tuple)))


def not_none(values: tuple) -> tuple:
    """``values`` without None (where None is the documented default)."""
    return tuple(v for v in values if v is not None)


def bad_seconds(*, allow_zero: bool = True) -> tuple:
    return (NAN, -1.0, -INF, "1", "x", None, b"1", True, torch.tensor([1.0])) + (() if allow_zero else (0, 0.0))


# -- the world every case runs in --------------------------------------------------------------------

CONFIG = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, max_slots=4, max_seq_len=256)


@dataclass
class World:
    """A ledger with two models, a pool on it, a cache with slots in every state and a plain range."""

    dir: str
    ledger: Ledger
    other: int  # a second model of the ledger (this process), with 2 pages counted
    pool: PagePool
    cache: KVCache
    vr: VirtualRange

    @property
    def entry(self) -> int:
        """The pool's entry in the ledger."""
        return next(e.index for e in self.ledger.entries() if e.name == "model")


@contextlib.contextmanager
def world() -> Iterator[World]:
    folder = tempfile.mkdtemp(prefix="vkv-bad-")
    ledger = Ledger.open(budget_bytes=64 * PAGE, page_size=PAGE, path=os.path.join(folder, "ledger"))
    pool = cache = vr = None
    try:
        other = ledger.register("other", priority=1)
        ledger.grow(other, 2)
        pool = PagePool(get_driver("host", page_size=PAGE), budget_bytes=32 * PAGE, ledger=ledger, name="model")
        cache = KVCache(CONFIG, pool)
        gen = torch.Generator().manual_seed(0)
        for slot, tokens in enumerate((200, 10, 100)):
            assert cache.allocate() == slot
            cache.grow(slot, tokens)
            for layer in range(CONFIG.num_layers):
                for view in (cache.key_view(layer), cache.value_view(layer)):
                    view[slot, :tokens] = torch.randn(view[slot, :tokens].shape, generator=gen)
        cache.free(2)  # a freed slot keeping its pages
        vr = VirtualRange(pool, 4)
        vr.map([0, 2])
        for page in (0, 2):
            vr.tensor()[page * PAGE : (page + 1) * PAGE].view(torch.int32)[::97] = 7 + page
        yield World(folder, ledger, other, pool, cache, vr)
    finally:
        for part in (cache, vr, pool, ledger):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        shutil.rmtree(folder, ignore_errors=True)


def _digest(r: VirtualRange) -> dict[int, str]:
    raw = r.tensor()
    return {
        i: hashlib.sha1(raw[i * r.page_size : (i + 1) * r.page_size].numpy().tobytes()).hexdigest() for i in r.mapped()
    }


def snapshot(w: World) -> dict[str, Any]:
    """Everything a refused call must leave as it was."""
    cache = w.cache
    return {
        "pool.stats()": w.pool.stats(),
        "cache.stats()": cache.stats(),
        "slots (allocated, capacity)": [(cache.is_allocated(s), cache.capacity(s)) for s in range(CONFIG.max_slots)],
        # the pool's own thread publishes its in-use count whenever it likes: only the pool's stats say it
        "ledger.entries()": [
            replace(e, updated=0.0, pages_in_use=e.pages_in_use if e.index == w.other else None)
            for e in w.ledger.entries()
        ],
        "ledger budget": w.ledger.budget_pages,
        "cache pages": cache.range.mapped(),
        "range pages": w.vr.mapped(),
        "cache bytes": _digest(cache.range),
        "range bytes": _digest(w.vr),
        "files": sorted(os.listdir(w.dir)),
    }


# -- cases and the one check they all get -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    entry: str  # e.g. "PagePool.acquire"
    arg: str  # the argument's name, which the error message must contain
    values: tuple  # bad values
    call: Callable[[World, Any], Any]
    owner: str  # the helper who owns the entry point (A ledger, B pool/vrange/drivers/mapper, C cache/layout)

    def __repr__(self) -> str:
        return f"{self.entry}({self.arg}=...)"


def names_arg(message: str, arg: str) -> bool:
    """The message names ``arg`` (or its singular: "slot 3" for ``slots``) as a word of its own (``k`` is not
    named by ``k_new``)."""
    words = {arg, arg.removesuffix("s")} - {""}
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9_])", message) for w in words)


class Hung(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def alarm(*_):
        raise Hung(f"the call ran over {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def shown(value: Any) -> str:
    if isinstance(value, torch.Tensor) and (value.numel() > 4 or value.device.type == "meta"):  # never read a view
        return f"Tensor {list(value.shape)} {value.dtype} strides {value.stride()} on {value.device}"
    text = f"{type(value).__name__} {value!r}".replace("\n", " ")
    return text if len(text) < 70 else text[:67] + "..."


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def outcome(call: Callable[[], Any], arg: str, before: Callable[[], Any] | None = None) -> str | None:
    """None when ``call()`` refused the bad value properly (and ``before()`` is unchanged), else what went wrong."""
    state, problems = before() if before else None, []
    try:
        with time_limit(CALL_LIMIT_S):
            result = call()
    except (InvalidRequestError, TypeError) as e:
        if not names_arg(str(e), arg):
            problems.append(f"{type(e).__name__} does not name {arg!r}: {str(e)[:160]}")
    except Hung as e:
        problems.append(f"hung: {e}")
    except BaseException as e:  # noqa: BLE001 - any other error is the finding
        problems.append(f"raised {type(e).__module__}.{type(e).__name__}: {str(e)[:160]}")
    else:
        with contextlib.suppress(Exception):
            if hasattr(result, "close"):
                result.close()
        return f"accepted (returned {shown(result)})"
    if before is not None:
        after = before()
        changed = [key for key in state if not _same(state[key], after[key])]
        if changed:
            first = changed[0]
            problems.append(f"changed {', '.join(changed)} (first: {state[first]} -> {after[first]})"[:400])
    return "; ".join(problems) or None


def check_case(case: Case, value: Any, test: str) -> None:
    TRIED[test] += 1
    with world() as w:
        problem = outcome(lambda: case.call(w, value), case.arg, lambda: snapshot(w))
    assert problem is None, f"[{case.owner}] {case.entry} {case.arg}={shown(value)}: {problem}"


def pairs(cases: list[Case]) -> list[tuple[Case, Any]]:
    return [(case, value) for case in cases for value in case.values]


@pytest.fixture(scope="module", autouse=True)
def report_tried(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    mine = {k: n for k, n in TRIED.items() if k.startswith(request.module.__name__.rsplit(".", 1)[-1] + ":")}
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None and mine:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n{request.module.__name__}: {sum(mine.values())} bad inputs tried ({mine})")


# -- the allocator: pool, range, driver ----------------------------------------------------------------


def _pool(w: World, **kw) -> PagePool:
    return PagePool(**{"driver": get_driver("host", page_size=PAGE), "budget_bytes": 4 * PAGE, **kw})


def _first_page(w: World) -> Any:
    return w.vr.page(0)


POOL = [
    Case("PagePool()", "driver", (5, 1.5, b"host", True, torch.tensor(1)), lambda w, v: _pool(w, driver=v), "B"),
    Case("PagePool()", "budget_bytes", (*not_none(bad_ints(0)), PAGE + 1, PAGE // 2),
         lambda w, v: _pool(w, budget_bytes=v), "B"),
    Case("PagePool()", "ledger", ("x", 5, object()), lambda w, v: _pool(w, ledger=v), "B"),
    Case("PagePool()", "page_size", (2 * PAGE, 4 * PAGE), lambda w, v: PagePool(  # issue 12 defect 1
        get_driver("host", page_size=v), budget_bytes=4 * v, ledger=w.ledger, name="pool-b"), "B"),
    Case("PagePool()", "name", (5, b"m", "a" * 200), lambda w, v: _pool(w, ledger=w.ledger, name=v), "B"),
    Case("PagePool()", "ledger_timeout_s", bad_seconds(), lambda w, v: _pool(w, ledger_timeout_s=v), "B"),
    Case("PagePool.acquire", "n", bad_ints(0), lambda w, v: w.pool.acquire(v), "B"),
    Case("PagePool.release", "pages", NOT_SEQUENCES[:-1] + (["2097152"], [1.5], [True], [None], [12345]),
         lambda w, v: w.pool.release(v), "B"),
    Case("PagePool.release", "pages", ("first page twice",), lambda w, v: w.pool.release([_first_page(w)] * 3), "B"),
    Case("PagePool.shrink", "keep", bad_ints(0), lambda w, v: w.pool.shrink(v), "B"),
    Case("PagePool.set_budget", "budget_bytes", (*bad_ints(0), PAGE + 1), lambda w, v: w.pool.set_budget(v), "B"),
    Case("PagePool.reclaim", "pages", bad_ints(0), lambda w, v: w.pool.reclaim(v), "B"),
]  # fmt: skip

VRANGE = [
    Case("VirtualRange()", "pool", ("x", None, 5), lambda w, v: VirtualRange(v, 2), "B"),
    Case("VirtualRange()", "num_pages", bad_ints(1), lambda w, v: VirtualRange(w.pool, v), "B"),
    Case("VirtualRange.map", "indices", bad_int_lists(0, 3, good=1), lambda w, v: w.vr.map(v), "B"),
    Case("VirtualRange.unmap", "indices", bad_int_lists(0, 3, good=0), lambda w, v: w.vr.unmap(v), "B"),
    Case("VirtualRange.alias", "pairs", ("x", 5, None, [(0,)], [(0, 1.5)], [(1.5, 1)], [(0, True)], [(0, "1")],
                                         [(0, 9)], [(-1, 1)], [(0, 1), (2, 1)]),
         lambda w, v: w.vr.alias(v), "B"),
    Case("VirtualRange.alias", "source", ("x", 5, object()), lambda w, v: w.vr.alias([(0, 1)], v), "B"),
    Case("VirtualRange.page", "index", bad_ints(0, 3), lambda w, v: w.vr.page(v), "B"),
]  # fmt: skip

DRIVER = [
    Case("get_driver", "backend", (5, "x", b"host", True, "HOST "), lambda w, v: get_driver(v), "B"),
    Case(
        "get_driver",
        "page_size",
        (*not_none(bad_ints(1)), 1000, PAGE + 1),
        lambda w, v: get_driver("host", page_size=v),
        "B",
    ),
    Case("get_driver", "device", ("x", 1.5, True, b"0", -1), lambda w, v: get_driver("host", device=v), "B"),
]


# -- the ledger ------------------------------------------------------------------------------------------


def _open_new(w: World, **kw) -> Ledger:
    kw = {"budget_bytes": 8 * PAGE, "page_size": PAGE, "path": os.path.join(w.dir, "new-ledger"), **kw}
    return Ledger.open(**kw)


LEDGER = [
    Case("Ledger.open", "budget_bytes", (*not_none(bad_ints(0)), PAGE + 1), lambda w, v: _open_new(w, budget_bytes=v),
         "A"),
    Case("Ledger.open", "page_size", not_none(bad_ints(1)), lambda w, v: _open_new(w, page_size=v), "A"),
    Case("Ledger.open", "page_size", not_none(bad_ints(1)), lambda w, v: Ledger.open(
        page_size=v, path=w.ledger.path), "A"),
    Case("Ledger.open", "max_entries", (*bad_ints(1, 4096),), lambda w, v: _open_new(w, max_entries=v), "A"),
    Case("Ledger.open", "path", (5, 1.5, True, ["x"]), lambda w, v: Ledger.open(budget_bytes=PAGE, page_size=PAGE,
                                                                             path=v), "A"),
    Case("Ledger.open", "device", ("../x", "a/b", "", ".", "..", 1.5, None, b"0", True, -1, "a\0"),
         lambda w, v: Ledger.open(v, budget_bytes=PAGE, page_size=PAGE, directory=w.dir), "A"),
    Case("Ledger.open", "directory", (5, 1.5, True, ["d"]), lambda w, v: Ledger.open(
        budget_bytes=PAGE, page_size=PAGE, directory=v), "A"),
    Case("Ledger.open", "lock_timeout_s", not_none(bad_seconds()), lambda w, v: _open_new(w, lock_timeout_s=v), "A"),
    Case("Ledger.register", "name", (5, None, b"m", "", "a" * 200, "a\0b", ["m"]),
         lambda w, v: w.ledger.register(v), "A"),
    Case("Ledger.register", "limit_bytes", (*not_none(bad_ints(1)), PAGE + 1), lambda w, v: w.ledger.register("n",
                                                                                                 limit_bytes=v), "A"),
    Case("Ledger.register", "min_bytes", bad_ints(0), lambda w, v: w.ledger.register("n", min_bytes=v), "A"),
    Case("Ledger.register", "priority", bad_ints(-(2**31), 2**31 - 1), lambda w, v: w.ledger.register("n",
                                                                                                 priority=v), "A"),
    Case("Ledger.grow", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.grow(v, 1, timeout_s=0.05), "A"),
    Case("Ledger.grow", "pages", bad_ints(0), lambda w, v: w.ledger.grow(w.other, v, timeout_s=0.05), "A"),
    Case("Ledger.grow", "timeout_s", bad_seconds(), lambda w, v: w.ledger.grow(w.other, 1, timeout_s=v), "A"),
    Case("Ledger.try_grow", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.try_grow(v, 1), "A"),
    Case("Ledger.try_grow", "pages", bad_ints(0), lambda w, v: w.ledger.try_grow(w.other, v), "A"),
    Case("Ledger.shrink", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.shrink(v, 1), "A"),
    Case("Ledger.shrink", "pages", (*bad_ints(0), 3), lambda w, v: w.ledger.shrink(w.other, v), "A"),
    Case("Ledger.set_in_use", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.set_in_use(v, 1), "A"),
    Case("Ledger.set_in_use", "pages", (*bad_ints(0), 3), lambda w, v: w.ledger.set_in_use(w.other, v), "A"),
    Case("Ledger.ask_release", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.ask_release(v, 1), "A"),
    Case("Ledger.ask_release", "pages", bad_ints(0), lambda w, v: w.ledger.ask_release(w.other, v), "A"),
    Case("Ledger.asked", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.asked(v), "A"),
    Case("Ledger.clear_asked", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.clear_asked(v, 1), "A"),
    Case("Ledger.clear_asked", "pages", bad_ints(0), lambda w, v: w.ledger.clear_asked(w.other, v), "A"),
    Case("Ledger.set_limit", "name", (5, None, b"other", ["other"]), lambda w, v: w.ledger.set_limit(v, PAGE), "A"),
    Case("Ledger.set_limit", "limit_bytes", (*not_none(bad_ints(1)), PAGE + 1), lambda w, v: w.ledger.set_limit("other",
                                                                                                     v), "A"),
    Case("Ledger.set_budget", "budget_bytes", (*bad_ints(0), PAGE + 1), lambda w, v: w.ledger.set_budget(v), "A"),
    Case("Ledger.entry", "entry", bad_ints(0, 4095), lambda w, v: w.ledger.entry(v), "A"),
]  # fmt: skip


# -- the mapper ------------------------------------------------------------------------------------------


def _with_mapper(w: World, use: Callable[[Mapper], Any]) -> Any:
    mapper = Mapper()
    try:
        return use(mapper)
    finally:
        mapper.close()


MAPPER = [
    Case("Mapper()", "idle_interval_s", bad_seconds(allow_zero=False), lambda w, v: Mapper(idle_interval_s=v), "B"),
    Case("Mapper.submit", "job", NOT_CALLABLES, lambda w, v: _with_mapper(w, lambda m: m.submit("k", v)), "B"),
    Case("Mapper.submit", "key", ([1], {1: 2}, {1}), lambda w, v: _with_mapper(w, lambda m: m.submit(v, print)), "B"),
    Case("Mapper.add_idle", "hook", NOT_CALLABLES, lambda w, v: _with_mapper(w, lambda m: m.add_idle(v)), "B"),
    Case("Mapper.drain", "timeout", not_none(bad_seconds()), lambda w, v: _with_mapper(w, lambda m: m.drain(v)), "B"),
]


# -- the cache and its config ----------------------------------------------------------------------------


def _config(**kw) -> CacheConfig:
    return replace(CONFIG, **kw) if "group_layers" not in kw else replace(CONFIG, layout="grouped", **kw)


def _cache(w: World, **kw) -> KVCache:
    return KVCache(**{"config": CONFIG, "pool": w.pool, **kw})


CONFIG_CASES = [
    Case("CacheConfig", name, bad_ints(1), lambda w, v, name=name: _config(**{name: v}), "C")
    for name in ("num_layers", "num_kv_heads", "head_dim", "max_slots", "max_seq_len")
] + [
    Case("CacheConfig", "dtype", (torch.int32, torch.float64, "float16", None, float, 5),
         lambda w, v: _config(dtype=v), "C"),
    Case("CacheConfig", "layout", ("x", "Token", 5, None, b"token"), lambda w, v: _config(layout=v), "C"),
    Case("CacheConfig", "group_layers", (*bad_ints(1), 3), lambda w, v: _config(group_layers=v), "C"),
]  # fmt: skip

SLOT_BAD = (*bad_ints(0, 3), 3)  # slot 3 is free: not allocated
TOKENS_BAD = bad_ints(0, CONFIG.max_seq_len)

CACHE = [
    Case("KVCache()", "config", ("x", None, 5, {"num_layers": 2}), lambda w, v: _cache(w, config=v), "C"),
    Case("KVCache()", "pool", ("x", 5, object()), lambda w, v: _cache(w, pool=v), "C"),
    Case("KVCache()", "backend", (5, "x", b"host", True), lambda w, v: _cache(w, pool=None, backend=v,
                                                                              budget_bytes=8 * PAGE), "C"),
    Case("KVCache()", "budget_bytes", (*not_none(bad_ints(0)), 2**21 + 1),
         lambda w, v: _cache(w, pool=None, backend="host", budget_bytes=v), "C"),
    Case("KVCache()", "mapper", ("x", 5, object()), lambda w, v: _cache(w, mapper=v), "C"),
    Case("KVCache()", "headroom_tokens", bad_ints(0), lambda w, v: _cache(w, headroom_tokens=v), "C"),
    Case("KVCache()", "job_pages", bad_ints(1), lambda w, v: _cache(w, job_pages=v), "C"),
    Case("KVCache.allocate", "num_tokens", TOKENS_BAD, lambda w, v: w.cache.allocate(v), "C"),
    Case("KVCache.grow", "slot", SLOT_BAD, lambda w, v: w.cache.grow(v, 1), "C"),
    Case("KVCache.grow", "num_tokens", TOKENS_BAD, lambda w, v: w.cache.grow(1, v), "C"),
    Case("KVCache.ensure", "slot", SLOT_BAD, lambda w, v: w.cache.ensure(v, 1), "C"),
    Case("KVCache.ensure", "num_tokens", TOKENS_BAD, lambda w, v: w.cache.ensure(1, v), "C"),
    Case("KVCache.ensure_many", "slots", bad_int_lists(0, 3, good=1), lambda w, v: w.cache.ensure_many(
        v, [250] * len(v) if isinstance(v, list) else [1]), "C"),
    Case("KVCache.ensure_many", "num_tokens", bad_int_lists(0, CONFIG.max_seq_len, good=250),
         lambda w, v: w.cache.ensure_many([1, 0][: len(v)] if isinstance(v, list) else [1], v), "C"),
    Case("KVCache.advise", "slot", SLOT_BAD, lambda w, v: w.cache.advise(v, 1), "C"),
    Case("KVCache.advise", "num_tokens", TOKENS_BAD, lambda w, v: w.cache.advise(1, v), "C"),
    Case("KVCache.advise_many", "slots", bad_int_lists(0, 3, good=1), lambda w, v: w.cache.advise_many(
        v, [250] * len(v) if isinstance(v, list) else [1]), "C"),
    Case("KVCache.advise_many", "num_tokens", bad_int_lists(0, CONFIG.max_seq_len, good=250),
         lambda w, v: w.cache.advise_many([1, 0][: len(v)] if isinstance(v, list) else [1], v), "C"),
    Case("KVCache.share_prefix", "src", SLOT_BAD, lambda w, v: w.cache.share_prefix(v, 1, 10), "C"),
    Case("KVCache.share_prefix", "dst", (*SLOT_BAD, 0), lambda w, v: w.cache.share_prefix(0, v, 10), "C"),
    Case("KVCache.share_prefix", "num_tokens", (*TOKENS_BAD, 0), lambda w, v: w.cache.share_prefix(0, 1, v), "C"),
    Case("KVCache.free", "slot", (*SLOT_BAD, 2), lambda w, v: w.cache.free(v), "C"),
    Case("KVCache.capacity", "slot", bad_ints(0, 3), lambda w, v: w.cache.capacity(v), "C"),
    Case("KVCache.is_allocated", "slot", bad_ints(0, 3), lambda w, v: w.cache.is_allocated(v), "C"),
    Case("KVCache.key_view", "layer", bad_ints(0, 1), lambda w, v: w.cache.key_view(v), "C"),
    Case("KVCache.value_view", "layer", bad_ints(0, 1), lambda w, v: w.cache.value_view(v), "C"),
]  # fmt: skip

GROUPS = {"pool": POOL, "vrange": VRANGE, "driver": DRIVER, "ledger": LEDGER, "mapper": MAPPER,
          "config": CONFIG_CASES, "cache": CACHE}  # fmt: skip


@pytest.mark.parametrize("group", list(GROUPS))
@SETTINGS
@given(data=st.data())
def test_bad_value_is_refused_naming_the_argument_and_changes_nothing(group, data):
    case, value = data.draw(st.sampled_from(pairs(GROUPS[group])), label="case, bad value")
    check_case(case, value, f"test_bad_input:{group}")


def check_all(checks: list[tuple[Callable[..., None], tuple]]) -> None:
    """Run every check; fail once, listing every bad input that was mishandled."""
    problems = []
    for check, args in checks:
        try:
            check(*args)
        except AssertionError as e:
            problems.append(str(e).splitlines()[0])
    assert not problems, f"{len(problems)} of {len(checks)} bad inputs mishandled:\n" + "\n".join(problems)


def test_every_listed_bad_value_is_refused():
    """Each (case, value) of the tables once, deterministically: the complete list of what is still wrong."""
    check_all([(check_case, (case, value, "test_bad_input:all")) for g in GROUPS.values() for case, value in pairs(g)])


@SETTINGS
@given(
    n=st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), st.floats(), st.text(max_size=4)),
    which=st.sampled_from(["acquire", "shrink", "reclaim", "grow", "map"]),
)
def test_generated_bad_counts_are_refused(n, which):
    call = {
        "acquire": (lambda w: w.pool.acquire(n), "n", "B"),
        "shrink": (lambda w: w.pool.shrink(n), "keep", "B"),
        "reclaim": (lambda w: w.pool.reclaim(n), "pages", "B"),
        "grow": (lambda w: w.cache.grow(1, n), "num_tokens", "C"),
        "map": (lambda w: w.vr.map([n]), "indices", "B"),
    }[which]
    check_case(Case(which, call[1], (n,), lambda w, v: call[0](w), call[2]), n, "test_bad_input:generated")


# -- after close(): every call refused, nothing crashes ----------------------------------------------------

AFTER_CLOSE = {
    "KVCache.allocate": lambda w: w.cache.allocate(),
    "KVCache.grow": lambda w: w.cache.grow(0, 1),
    "KVCache.key_view": lambda w: w.cache.key_view(0),
    "KVCache.value_view": lambda w: w.cache.value_view(0),
    "VirtualRange.map": lambda w: w.vr.map([1]),
    "VirtualRange.unmap": lambda w: w.vr.unmap([0]),
    "VirtualRange.alias": lambda w: w.vr.alias([(0, 1)]),
    "VirtualRange.page": lambda w: w.vr.page(0),
    "VirtualRange.tensor": lambda w: w.vr.tensor(),
}


@pytest.mark.parametrize("entry", list(AFTER_CLOSE))
def test_calls_after_close_are_refused(entry):
    TRIED["test_bad_input:after_close"] += 1
    with world() as w:
        w.cache.close()
        w.vr.close()
        before = w.pool.stats()
        problem = outcome(lambda: AFTER_CLOSE[entry](w), "closed")
        assert problem is None, f"[{'C' if entry.startswith('KV') else 'B'}] {entry} after close(): {problem}"
        assert w.pool.stats() == before


# -- good values work (the properties above can fail) ------------------------------------------------------


@SETTINGS
@given(n=st.integers(0, 8), keep=st.integers(0, 30))
def test_good_pool_calls_work(n, keep):
    with world() as w:
        before = w.pool.stats()
        pages = w.pool.acquire(np.int64(n) if n % 2 else n)
        assert len(pages) == n and w.pool.stats().in_use == before.in_use + n
        w.pool.release(pages)
        after = w.pool.stats()
        assert after.in_use == before.in_use and after.live == before.live + max(0, n - before.free)
        released = w.pool.shrink(keep)
        assert w.pool.stats().free == min(keep, after.free) and released == after.free - min(keep, after.free)
        assert w.ledger.entry(w.entry).pages_mapped == w.pool.stats().live


@SETTINGS
@given(indices=st.lists(st.integers(0, 3), max_size=4))
def test_good_range_calls_work(indices):
    with world() as w:
        before = set(w.vr.mapped())
        assert w.vr.map([np.int32(i) for i in indices]) == len(set(indices) - before)
        assert w.vr.mapped() == sorted(before | set(indices))
        assert w.vr.unmap(indices) == len(set(indices))
        assert w.vr.mapped() == sorted(before - set(indices))


@SETTINGS
@given(slot=st.sampled_from([0, 1, np.int64(1)]), n=st.integers(0, CONFIG.max_seq_len))
def test_good_cache_calls_work(slot, n):
    with world() as w:
        cache, had = w.cache, w.cache.capacity(slot)
        cache.ensure_many([slot], [n])
        assert cache.capacity(slot) >= n
        cache.advise(slot, min(n, 10))
        cache.grow(slot, n)
        assert cache.capacity(slot) == max(had, -(-n // 128) * 128)
        assert cache.key_view(np.int64(1)).shape == (4, 256, 2, 16)
        if n:
            dst = cache.allocate(n)
            cache.share_prefix(0, dst, min(n, 200))
            assert torch.equal(cache.key_view(0)[dst, : min(n, 200)], cache.key_view(0)[0, : min(n, 200)])


@SETTINGS
@given(pages=st.integers(0, 60), limit=st.integers(1, 64), budget=st.integers(0, 80))
def test_good_ledger_calls_work(pages, limit, budget):
    with world() as w:
        led, other = w.ledger, w.other
        total = sum(e.pages_mapped for e in led.entries())
        assert led.try_grow(other, pages) == (total + pages <= 64)
        mapped = led.entry(other).pages_mapped
        led.set_in_use(other, mapped)
        led.shrink(other, mapped - 1)
        assert led.entry(other).pages_mapped == 1 and led.asked(other) == 0
        assert led.set_limit("other", limit * PAGE).limit_pages == limit
        led.set_budget(budget * PAGE)
        assert led.budget_pages == budget


@SETTINGS
@given(interval=st.sampled_from([0.001, np.float64(0.002), 1]), timeout=st.sampled_from([None, 5, 5.0]))
def test_good_mapper_calls_work(interval, timeout):
    ran, idle = [], threading.Event()
    with Mapper(idle_interval_s=interval) as mapper:
        mapper.submit(("slot", 1), lambda: ran.append(1))
        mapper.submit(("slot", 1), lambda: ran.append(2))  # replaces the first if it has not started
        assert mapper.drain(timeout) and ran in ([2], [1, 2])
        mapper.add_idle(idle.set)
        assert idle.wait(5)


def test_case_tables_cover_every_entry_point():
    covered = {case.entry for group in GROUPS.values() for case in group}
    expected = {
        "PagePool()", "PagePool.acquire", "PagePool.release", "PagePool.shrink", "PagePool.set_budget",
        "PagePool.reclaim", "VirtualRange()", "VirtualRange.map", "VirtualRange.unmap", "VirtualRange.alias",
        "VirtualRange.page", "get_driver", "Ledger.open", "Ledger.register", "Ledger.grow", "Ledger.try_grow",
        "Ledger.shrink", "Ledger.set_in_use", "Ledger.ask_release", "Ledger.asked", "Ledger.clear_asked",
        "Ledger.set_limit", "Ledger.set_budget", "Ledger.entry", "Mapper()", "Mapper.submit", "Mapper.add_idle",
        "Mapper.drain", "CacheConfig", "KVCache()", "KVCache.allocate", "KVCache.grow", "KVCache.ensure",
        "KVCache.ensure_many", "KVCache.advise", "KVCache.advise_many", "KVCache.share_prefix", "KVCache.free",
        "KVCache.capacity", "KVCache.is_allocated", "KVCache.key_view", "KVCache.value_view",
    }  # fmt: skip
    assert covered == expected
    assert all(case.values for group in GROUPS.values() for case in group)
