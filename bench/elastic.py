# SPDX-License-Identifier: Apache-2.0
"""Does memory follow load without the step waiting on the driver? Four measurements, one run.

    python bench/elastic.py [--backend cuda|host] [--quick]

(a) a decode loop where requests arrive, grow and finish: step time with on-demand growth (mapper + ensure)
    against the same loop over a cache mapped in full beforehand; once synchronous (the host plans a step after
    the previous one finished) and once overlapped (the host launches the next step while one runs);
(b) admission: allocate + a prompt's pages mapped, into a freed slot that kept its pages and into an empty one;
(c) two processes: model B obtains X GiB that idle model A holds (A's mapper gives them back via the ledger);
(d) mapping throughput in GB/s: pooled pages mapped into a slot, and new pages created and mapped.
--layout layer / --layout grouped --group-layers G run all four over such caches, --page-mib N with N MiB pages.
Writes bench/results/elastic-<backend>[-<N>mib][-layer|-groupedG].json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

if not torch.cuda.is_available():  # the kernels run in Triton's interpreter; set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import StepClock, environment, print_table, write_json  # noqa: E402

from vkv import CacheConfig, KVCache, PagePool, get_driver  # noqa: E402
from vkv.allocator import Ledger, Mapper  # noqa: E402

PHASES = ("ensure", "plan", "launch", "advise", "synchronize")  # a decode step's parts, in order
LOOPS = ("on_demand", "premapped", "on_demand_overlap", "premapped_overlap")  # (a)'s loops, in a round's order


def geometry(backend: str, slots: int, max_seq_len: int, layout: str = "token", group_layers: int | None = None):
    """Llama-3-8B's KV on cuda (128 KiB a token); a 2 KiB-a-token model on the host (the interpreter is slow)."""
    sizes = (32, 8, 128, torch.bfloat16) if backend == "cuda" else (2, 2, 64, torch.float32)
    return CacheConfig(*sizes, max_slots=slots, max_seq_len=max_seq_len, layout=layout, group_layers=group_layers)


def tokens_in(backend: str, pages: int, page_size: int) -> int:
    """Tokens of one slot that ``pages`` pages hold in this backend's geometry."""
    return pages * page_size // geometry(backend, 1, 1).token_bytes


def decode_loop(cache: KVCache, steps: int, elastic: bool, graphs: bool, seed: int = 0, overlap: bool = False) -> dict:
    """Requests arrive, decode one token a step through AttentionWrapper over every layer, and finish.

    As in a serving engine: a request admitted in one step joins the batch at the next, after a prefill (random
    K/V, untimed); a step plans, launches every layer (a CUDA graph per batch size with ``graphs``) and, while
    the GPU works, tells the cache what the next step needs. With ``elastic`` the mapper maps ahead (advise) and
    the step path only checks (ensure), holding the mapper from its checks to its launch; without it every page
    was mapped beforehand. Steps that captured a graph are not timed (the same steps in both runs).
    ``overlap``: the host prepares and launches step t+1 while step t runs, as engines with asynchronous
    scheduling do (vLLM's async scheduling, SGLang's overlap scheduler); ``median_interval_ms`` is then the
    steps' pace on the device (end to end of consecutive steps no prefill preceded), and the "synchronize"
    phase waits for the previous step."""
    from vkv import AttentionWrapper

    cfg, dev = cache.config, cache.device
    rng = random.Random(seed)
    wrapper = AttentionWrapper(cache, num_q_heads=4 * cfg.num_kv_heads)
    active: dict[int, list[int]] = {}  # slot -> [length, tokens left]
    times, mapped_during, captured = [], [], {}  # captured: batch size -> torch.cuda.CUDAGraph
    phases: dict[str, list[float]] = {name: [] for name in PHASES}  # host time of each phase of the timed steps
    q = torch.randn(cfg.max_slots, 4 * cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=cfg.dtype)
    kv = torch.randn(cfg.max_slots, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=cfg.dtype)
    out = torch.empty_like(q)
    clock = StepClock((lambda: torch.cuda.Event(enable_timing=True)) if dev.type == "cuda" else None, overlap)
    gpu_times, intervals = clock.kernels, clock.intervals  # (empty without CUDA events)

    def layers(n: int) -> None:
        for layer in range(cfg.num_layers):
            wrapper.run(layer, q[:n], kv[:n], kv[:n], out=out[:n])

    def launch(n: int) -> bool:
        """Run every layer for a batch of n; True when this call captured a graph (an untimed step)."""
        if not graphs:
            layers(n)
            return False
        if n in captured:
            captured[n].replay()
            return False
        layers(n)  # compile outside the capture
        torch.cuda.synchronize()
        graph = captured[n] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layers(n)
        graph.replay()
        return True

    def prefill(slot: int, prompt: int) -> None:
        """A joining request's prefill: random K/V over its prompt, untimed (fresh pages read zeros, faster)."""
        if elastic:  # the prefill's pages: normally mapped by the mapper since admission
            grows["prefill"] += cache.ensure(slot, prompt)
        for layer in range(cfg.num_layers):
            cache.key_view(layer)[slot, :prompt].normal_()
            cache.value_view(layer)[slot, :prompt].normal_()

    arrived: list[tuple[int, list[int]]] = []
    grows = {"step": 0, "prefill": 0}  # synchronous grows: on the step path, and before a joining prefill
    for _ in range(steps):
        joined = bool(arrived)
        for slot, (prompt, _) in arrived:  # the requests admitted last step join now
            prefill(slot, prompt)
        if arrived and not overlap:
            cache.pool.driver.synchronize()
        arrived = []
        while cache.can_allocate() and len(active) + len(arrived) < cfg.max_slots and rng.random() < 0.5:
            prompt = rng.randint(16, cfg.max_seq_len // 4)
            slot = cache.allocate(num_tokens=prompt)
            if elastic:
                cache.advise(slot, prompt + 1)  # the prompt is known: map it before the request joins
            arrived.append((slot, [prompt, rng.randint(8, cfg.max_seq_len // 2)]))
        if active:
            mapped_before = cache.range.num_mapped
            marks = [time.perf_counter()]
            slots = list(active)
            if elastic and graphs and len(slots) not in captured:
                cache.mapper.drain()  # no VMM call from another thread while a stream is captured
            with cache.mapper.hold() if elastic else contextlib.nullcontext():
                if elastic:
                    grows["step"] += cache.ensure_many(slots, [active[s][0] + 1 for s in slots])
                marks.append(time.perf_counter())
                wrapper.plan(slots, [active[s][0] for s in slots], [1] * len(slots))
                marks.append(time.perf_counter())
                k = clock.begin()
                untimed = launch(len(slots))
                clock.end(k, timed=not untimed, clean=not joined)  # clean: no prefill since the previous step
                marks.append(time.perf_counter())
            if elastic:  # while the GPU runs this step: what the next one needs
                cache.advise_many(slots, [active[s][0] + 2 for s in slots])
            marks.append(time.perf_counter())
            if not overlap:
                cache.pool.driver.synchronize()
                clock.finished(k)
            elif k:  # keep one step queued behind the running one: wait for the previous step alone
                clock.wait(k - 1, cache.pool.driver.synchronize)
                clock.finished(k - 1)
            marks.append(time.perf_counter())
            if not untimed:
                times.append(marks[-1] - marks[0])
                for name, t0, t1 in zip(PHASES, marks[:-1], marks[1:], strict=True):
                    phases[name].append(t1 - t0)
                mapped_during.append(cache.range.num_mapped - mapped_before)
            for s in slots:
                active[s][0] += 1
                active[s][1] -= 1
                if active[s][1] == 0 or active[s][0] + 2 >= cfg.max_seq_len:
                    del active[s]
                    cache.free(s)
        active.update(arrived)
    cache.pool.driver.synchronize()
    if overlap and clock.steps:
        clock.finished(len(clock.steps) - 1)
    return {
        "median_step_ms": statistics.median(times) * 1e3,
        "mean_step_ms": statistics.fmean(times) * 1e3,
        "median_gpu_ms": statistics.median(gpu_times) * 1e3 if gpu_times else None,  # (None without CUDA events)
        # (overlap) the steps' pace: median time between the ends of consecutive steps on the device
        "median_interval_ms": statistics.median(intervals) * 1e3 if intervals else None,
        "timed_steps": len(times), "graphs": len(captured),
        "sync_grows": grows["step"], "prefill_sync_grows": grows["prefill"],  # the step path had to map
        # where a step's time goes (host view; "synchronize" waits for the GPU); pages mapped during a step
        "median_phase_us": {name: statistics.median(v) * 1e6 for name, v in phases.items()},
        "pages_mapped_during_step": {"mean": statistics.fmean(mapped_during), "max": max(mapped_during)},
    }  # fmt: skip


def _fmt(values: list[float] | None) -> str:
    return "n/a" if not values else "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


def run_a(backend: str, steps: int, graphs: bool, page_size: int | None = None, layout: str = "token",
          group_layers: int | None = None, rounds: int = 1) -> dict:  # fmt: skip
    """The on-demand loop and its pre-mapped baseline, each on a fresh pool, ``rounds`` times in turn
    (the same requests every time): ratios are taken within a round, then their median, so a drift of the
    machine's speed through the run falls on both sides of each ratio."""
    slots, max_seq_len = (16, 4096) if backend == "cuda" else (4, 512)
    cfg = geometry(backend, slots=slots, max_seq_len=max_seq_len, layout=layout, group_layers=group_layers)

    def new_pool() -> PagePool:
        return PagePool(get_driver(backend, page_size=page_size), budget_bytes=None if backend == "cuda" else 512 << 20)

    loops: dict[str, list[dict]] = {name: [] for name in LOOPS}
    for _ in range(rounds):
        for suffix, overlap in (("", False), ("_overlap", True)):
            pool = new_pool()
            with Mapper() as mapper, KVCache(cfg, pool, mapper=mapper, headroom_tokens=64) as cache:
                elastic = decode_loop(cache, steps, elastic=True, graphs=graphs, overlap=overlap)
                elastic["mapper_failed"] = mapper.failed
            pool.close()
            loops["on_demand" + suffix].append(elastic)
            pool = new_pool()  # over pages created for it, in the order it maps them
            with KVCache(cfg, pool) as cache:  # every slot mapped in full beforehand, slot after slot
                slots = [cache.allocate() for _ in range(cfg.max_slots)]
                for s in slots:
                    cache.grow(s, cfg.max_seq_len)
                for s in slots:
                    cache.free(s)  # kept mapped: every later allocate finds its pages
                loops["premapped" + suffix].append(decode_loop(cache, steps, False, graphs, overlap=overlap))
            pool.close()

    def ratios(key: str, name: str, baseline: str) -> list[float] | None:
        values = [a[key] / b[key] for a, b in zip(loops[name], loops[baseline], strict=True) if a[key] and b[key]]
        return values or None

    def median(values: list[float] | None) -> float | None:
        return statistics.median(values) if values else None

    step = ratios("median_step_ms", "on_demand", "premapped")
    gpu = ratios("median_gpu_ms", "on_demand", "premapped")
    # overlapped loops: the device's pace where events time it; the host's step time otherwise
    pace_key = "median_interval_ms" if loops["premapped_overlap"][0]["median_interval_ms"] else "median_step_ms"
    pace = ratios(pace_key, "on_demand_overlap", "premapped_overlap")
    return {
        "graphs": graphs, "rounds": rounds,
        **{name: runs[0] for name, runs in loops.items()},  # the first round's loops in detail
        "ratio": median(step), "ratio_rounds": step,
        "gpu_ratio": median(gpu), "gpu_ratio_rounds": gpu,  # the kernels' time alone (CUDA events)
        "overlap_ratio": median(pace), "overlap_ratio_rounds": pace,  # the loops run overlapped
        "overlap_gpu_ratio": median(ratios("median_gpu_ms", "on_demand_overlap", "premapped_overlap")),
    }  # fmt: skip


def run_b(backend: str, prompt: int, reps: int = 5, page_size: int | None = None, **layout) -> dict:
    cfg = geometry(backend, slots=4, max_seq_len=prompt, **layout)
    pool = PagePool(get_driver(backend, page_size=page_size), budget_bytes=None if backend == "cuda" else 512 << 20)
    out = {"prompt_tokens": prompt}
    with KVCache(cfg, pool) as cache:
        for label, keep in (("empty slot", False), ("reusable slot", True)):
            samples, calls = [], []
            for _ in range(reps):
                slot = cache.allocate(num_tokens=prompt)
                cache.grow(slot, prompt)
                cache.free(slot)
                if not keep:
                    cache.trim()  # pages back to the pool: the next admission maps them again
                before = pool.stats()
                t0 = time.perf_counter()
                slot = cache.allocate(num_tokens=prompt)
                cache.grow(slot, prompt)
                samples.append(time.perf_counter() - t0)
                after = pool.stats()
                calls.append((after.reused - before.reused) + (after.created - before.created))
                cache.free(slot)
            out[label] = {"median_us": statistics.median(samples) * 1e6, "pages_mapped_on_admission": max(calls)}
    pool.close()
    return out


def run_c(backend: str, gib: float, timeout_s: float, page_size: int | None = None, **layout) -> dict:
    """Model A (a child process) holds ``gib`` GiB in freed slots; model B (here) then grows by as much."""
    driver = get_driver(backend, page_size=page_size)
    pages = int(gib * 2**30) // driver.page_size
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ledger")
        budget = (pages + 4) * driver.page_size
        ledger = Ledger.open(budget_bytes=budget, page_size=driver.page_size, path=path)
        cmd = [sys.executable, __file__, "--hold", str(pages), "--backend", backend, "--ledger", path,
               "--page-bytes", str(driver.page_size), "--layout", layout.get("layout", "token")]  # fmt: skip
        cmd += ["--group-layers", str(layout["group_layers"])] if layout.get("group_layers") else []
        child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready", "the holding process did not start"
            pool = PagePool(driver, budget_bytes=budget, ledger=ledger, name="busy", ledger_timeout_s=timeout_s)
            cfg = geometry(backend, slots=1, max_seq_len=tokens_in(backend, pages, driver.page_size), **layout)
            with KVCache(cfg, pool) as cache:
                _, seconds = fill_a_slot(cache)
            pool.close()
        finally:
            child.stdin.close()
            child.wait(30)
        ledger.close()
    return {"gib": pages * driver.page_size / 2**30, "pages": pages, "ms": seconds * 1e3}


def hold(pages: int, backend: str, path: str, page_size: int, **layout) -> None:
    """The idle model of (c): map ``pages``, free the slot (kept), answer release requests until stdin closes."""
    driver = get_driver(backend, page_size=page_size)
    ledger = Ledger.open(path=path)
    pool = PagePool(driver, budget_bytes=(pages + 4) * driver.page_size, ledger=ledger, name="idle")
    cfg = geometry(backend, slots=1, max_seq_len=tokens_in(backend, pages, driver.page_size), **layout)
    with Mapper(idle_interval_s=0.001) as mapper, KVCache(cfg, pool, mapper=mapper) as cache:
        mapper.add_idle(pool.answer_release_requests)
        cache.free(fill_a_slot(cache)[0])
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def run_d(backend: str, nbytes: int, page_size: int | None = None, **layout) -> dict:
    driver = get_driver(backend, page_size=page_size)
    pages = nbytes // driver.page_size
    pool = PagePool(driver, budget_bytes=pages * driver.page_size)
    cfg = geometry(backend, slots=1, max_seq_len=tokens_in(backend, pages, driver.page_size), **layout)
    with KVCache(cfg, pool) as cache:
        slot, created = fill_a_slot(cache)  # new pages: create + map
        cache.free(slot)
        cache.trim()
        _, pooled = fill_a_slot(cache)  # pooled pages: map only
    pool.close()
    nbytes = pages * driver.page_size
    return {"pages": pages, "create_and_map_GBps": nbytes / created / 1e9, "map_pooled_GBps": nbytes / pooled / 1e9}


def fill_a_slot(cache: KVCache) -> tuple[int, float]:
    """A newly allocated slot, and the seconds it took to grow it to its capacity (allocation untimed)."""
    slot = cache.allocate()
    t0 = time.perf_counter()
    cache.grow(slot, cache.config.max_seq_len)
    return slot, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=None, help="cuda, host or auto (default)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller sizes")
    parser.add_argument("--eager", action="store_true", help="(a) without CUDA graphs only")
    parser.add_argument("--reclaim-gib", type=float, default=None, help="(c): GiB model B takes from model A")
    parser.add_argument("--page-mib", type=int, default=None, help="page size in MiB (default: the driver's, 2)")
    parser.add_argument("--layout", choices=("token", "layer", "grouped"), default="token", help="the caches' layout")
    parser.add_argument("--group-layers", type=int, default=None, help="layers per plane of --layout grouped")
    parser.add_argument("--only-a", action="store_true", help="measure (a) alone (with CUDA graphs)")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ledger", help=argparse.SUPPRESS)
    parser.add_argument("--page-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    backend = get_driver(args.backend).name
    if (args.layout == "grouped") != (args.group_layers is not None):
        parser.error("--group-layers goes with --layout grouped (and that layout needs it)")
    layout = {"layout": args.layout, "group_layers": args.group_layers}  # the cache layout of all four
    if args.hold is not None:
        return hold(args.hold, backend, args.ledger, args.page_bytes, **layout)
    if args.page_mib is not None and args.page_mib <= 0:
        parser.error(f"--page-mib must be a positive number of MiB, got {args.page_mib}")
    page_size = None if args.page_mib is None else args.page_mib << 20
    page_mib = get_driver(backend, page_size=page_size).page_size >> 20  # checks it against the granularity
    gpu = backend == "cuda"
    steps, graphs = (50 if args.quick else 300) if gpu else (6 if args.quick else 20), gpu and not args.eager
    gib = args.reclaim_gib if args.reclaim_gib is not None else (8.0 if gpu else 0.25)
    print(f"bench/elastic.py: {get_driver(backend, page_size=page_size).describe()}", flush=True)
    a = run_a(backend, steps, graphs, page_size, rounds=3 if graphs else 1, **layout)
    print(f"(a) step {a['on_demand']['median_step_ms']:.3f} ms on demand vs {a['premapped']['median_step_ms']:.3f} ms "
          f"pre-mapped (first round); on demand / pre-mapped per round {_fmt(a['ratio_rounds'])}, median "
          f"{a['ratio']:.3f}x; {a['on_demand']['sync_grows']} synchronous grows on the step path, "
          f"{a['on_demand']['prefill_sync_grows']} before a prefill "
          f"({'CUDA graphs' if a['graphs'] else 'eager launches'})", flush=True)  # fmt: skip
    if a["gpu_ratio"] is not None:
        print(f"(a) the kernels alone (CUDA events), on demand / pre-mapped per round {_fmt(a['gpu_ratio_rounds'])}, "
              f"median {a['gpu_ratio']:.3f}x", flush=True)  # fmt: skip
    print(f"(a) overlapped loops (the next step launched while one runs): on demand / pre-mapped per round "
          f"{_fmt(a['overlap_ratio_rounds'])}, median {a['overlap_ratio']:.3f}x; the kernels alone "
          f"{a['overlap_gpu_ratio'] or float('nan'):.3f}x", flush=True)  # fmt: skip
    for label in LOOPS:
        phases = ", ".join(f"{k} {v:.0f}" for k, v in a[label]["median_phase_us"].items())
        print(f"(a) {label}: median us per phase: {phases}; pages mapped during a step "
              f"{a[label]['pages_mapped_during_step']}", flush=True)  # fmt: skip
    if args.only_a:
        return
    if gpu and not args.eager:  # for reference: the same loop launching every kernel from Python
        eager = a["eager"] = run_a(backend, steps, False, page_size, **layout)
        print(f"(a) eager launches: {eager['ratio']:.3f}x, {eager['on_demand']['sync_grows']} synchronous grows")
    b = run_b(backend, prompt=2048 if gpu else 256, page_size=page_size, **layout)
    print(f"(b) admission {b}", flush=True)
    c = run_c(backend, gib, timeout_s=10.0, page_size=page_size, **layout)
    print(f"(c) {c['gib']:.2f} GiB from an idle process in {c['ms']:.1f} ms", flush=True)
    d = run_d(backend, nbytes=(4 << 30) if gpu else (256 << 20), page_size=page_size, **layout)
    print(f"(d) {d}", flush=True)
    path = write_json(
        f"elastic-{backend}"
        + ("" if args.page_mib is None else f"-{page_mib}mib")
        + ("" if args.layout == "token" else f"-{args.layout}{args.group_layers or ''}"),
        {"env": environment(), "backend": backend, "page_mib": page_mib, "layout_a": args.layout,
         "group_layers_a": args.group_layers, "decode_loop": a, "admission": b, "reclaim": c, "throughput": d},
    )  # fmt: skip
    rows = [
        ("(a) decode step, on-demand / pre-mapped", a["ratio"]), ("(a) the same, overlapped loops", a["overlap_ratio"]),
        ("(a) the kernels alone, on-demand / pre-mapped", a["gpu_ratio"]),
        ("(a) synchronous grows on the step path", a["on_demand"]["sync_grows"]),
        ("(b) admission, empty slot (us)", b["empty slot"]["median_us"]),
        ("(b) admission, reusable slot (us)", b["reusable slot"]["median_us"]),
        ("(b) pages mapped admitting into a reusable slot", b["reusable slot"]["pages_mapped_on_admission"]),
        (f"(c) take {c['gib']:.2f} GiB from an idle process (ms)", c["ms"]),
        (f"(d) map pooled {page_mib} MiB pages (GB/s)", d["map_pooled_GBps"]),
        ("(d) create + map new pages (GB/s)", d["create_and_map_GBps"]),
    ]  # fmt: skip
    print(f"wrote {path}")
    print_table([{"measure": m, "value": v} for m, v in rows], ["measure", "value"])


if __name__ == "__main__":
    main()
