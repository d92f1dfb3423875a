# SPDX-License-Identifier: Apache-2.0
"""Where do (a)'s 2-4% go? bench/elastic.py's decode loop in several variants, in turn, for a few rounds.

    python bench/probes/elastic_ab.py [--rounds 3] [--steps 300] [--page-mib 2]

Variants (each on a fresh pool; the same requests every time):
  premapped           every page mapped before the loop (the baseline of every ratio)
  premapped+lead      the same, the GPU spinning ~100 us before each step's start event, so the host has
                      queued the step's graph launch by then: the events time the kernels alone
  free                on demand, the mapper free to run any time (VMM calls may meet the step's launch)
  free+lead           the same, kernels alone (ratio against premapped+lead)
  held                on demand, the step holds the mapper from its checks to its launch (jobs of 4 pages)
  held+lead           the same, kernels alone
  held-1              held, jobs of one page
  unchunked-free      one job maps a slot's whole growth (a 1024-token prompt: 64 pages), mapper free
  premapped-rand      premapped, every page filled with random data first (the others read zeros where no
                      step wrote: does the data change the kernels' time?)
  warm-zero           on demand (held) over a pool whose pages were all created first: maps, no creates
  warm-rand           the same, the pages filled with random data before they went back to the pool
  headroom-256        held, 256 tokens of headroom instead of 64 (a slot's mapping runs further ahead)
  headroom-full       held, every admitted slot mapped to max_seq_len at once (pre-mapping at admission)
  premapped-partial   every slot mapped to 3136 of its 4096 tokens before the loop (enough for any request):
                      partly mapped slots, no mapping while the loop runs
  premapped-warm      every slot mapped in full before the loop from a warm pool (last in, first out): the
                      physical order of warm-zero without mapping during the loop
  recapture-50        held, the CUDA graphs dropped and captured again every 50 steps
  stop-K              held, and at step K (--stop, default 150) every slot is mapped to max_seq_len, so
                      nothing is mapped after it: do the later steps' kernels recover? (the summary adds, for
                      every variant, the ratio of the kernels' medians over the steps from K on)
  stop-K-remap        stop-K, then every page of the range unmapped and mapped again at the same address
                      (the same physical page, in address order): if the later steps recover, the loss is
                      in how the mappings were made (their history), not in which page backs which address
  premapped-remap     premapped, with the same remap at step K (what remapping alone does)
  premapped-interleaved  premapped, a page of every slot in turn (growth's scattering, mapped beforehand)
If free+lead / premapped+lead is ~1.00 while free / premapped is 1.02-1.04, the loss is the launch waiting on
the driver behind the mapper's VMM calls, not slower kernels. Prints per-round ratios of the CUDA-event
(kernels) medians and of the host step medians; writes $OUT/elastic_ab.json when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from elastic import decode_loop, geometry, premapped_loop  # noqa: E402

from vkv import KVCache, PagePool, get_driver  # noqa: E402
from vkv.allocator import Mapper  # noqa: E402

LEAD = 200_000  # GPU clock cycles, ~100 us on an H200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--page-mib", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--stop", type=int, default=150, help="the step at which stop-K stops mapping")
    args = parser.parse_args()
    page_size = args.page_mib << 20
    cfg = geometry("cuda", slots=16, max_seq_len=4096)

    @contextlib.contextmanager
    def fresh_pool() -> Iterator[PagePool]:
        """A new pool of this run's page size (each variant's pages created for it), closed afterwards."""
        pool = PagePool(get_driver("cuda", page_size=page_size))
        try:
            yield pool
        finally:
            pool.close()

    def remap(cache: KVCache) -> None:
        """Unmap every page of the cache's range and map each again at the same address, in address order."""
        r, driver = cache.range, cache.pool.driver
        with r._lock:
            pairs = sorted(r._pages.items())
            for index, _ in pairs:
                driver.unmap(r.addr + index * r.page_size)
            for index, handle in pairs:
                driver.map(r.addr + index * r.page_size, handle)
        driver.synchronize()

    def on_demand(
        hold: bool,
        job_pages: int,
        lead: int,
        headroom: int = 64,
        recapture: int = 0,
        stop: int = 0,
        at_stop: Callable[[KVCache], None] | None = None,
    ) -> dict:
        with fresh_pool() as pool:
            mapper = Mapper()
            with mapper, KVCache(cfg, pool, mapper=mapper, headroom_tokens=headroom, job_pages=job_pages) as c:
                out = decode_loop(
                    c,
                    args.steps,
                    elastic=True,
                    graphs=True,
                    hold=hold,
                    lead_cycles=lead,
                    recapture_every=recapture,
                    stop_mapping_at=stop,
                    late_from=args.stop,
                    at_stop=at_stop,
                )
                out["mapper_failed"] = mapper.failed
                return out

    def warm(pool: PagePool, fill: bool) -> None:
        """Create every page the loop could use (slot after slot), optionally fill them with random data, and
        give them back to the pool: an on-demand loop after this maps pooled pages, no cuMemCreate."""
        with KVCache(cfg, pool) as scratch:
            slots = [scratch.allocate() for _ in range(cfg.max_slots)]
            for s in slots:
                scratch.grow(s, cfg.max_seq_len)
            if fill:
                scratch._buffer.normal_()
            torch.cuda.synchronize()
            for s in slots:
                scratch.free(s)
            scratch.trim()

    def warm_on_demand(fill: bool) -> dict:
        with fresh_pool() as pool:
            warm(pool, fill)
            with Mapper() as mapper, KVCache(cfg, pool, mapper=mapper, headroom_tokens=64) as c:
                return decode_loop(c, args.steps, elastic=True, graphs=True)

    def premapped_random() -> dict:
        with fresh_pool() as pool, KVCache(cfg, pool) as cache:
            slots = [cache.allocate() for _ in range(cfg.max_slots)]
            for s in slots:
                cache.grow(s, cfg.max_seq_len)
            cache._buffer.normal_()
            for s in slots:
                cache.free(s)
            return decode_loop(cache, args.steps, elastic=False, graphs=True)

    def premapped_warm() -> dict:
        """The pre-mapped loop over a pool of pre-created pages (warm): each slot mapped in full before the loop,
        but from the pool's free list (last in, first out), the physical order warm-zero's growth gets."""
        with fresh_pool() as pool:
            warm(pool, False)
            return premapped_loop(pool, cfg, args.steps, graphs=True, interleaved=False)

    def premapped_partial(tokens: int) -> dict:
        """Every slot mapped to ``tokens`` before the loop (at least what any request reaches), nothing mapped
        during it: partly mapped slots without mapping while the loop runs."""
        with fresh_pool() as pool, KVCache(cfg, pool) as cache:
            slots = [cache.allocate() for _ in range(cfg.max_slots)]
            for s in slots:
                cache.grow(s, tokens)
            for s in slots:
                cache.free(s)
            return decode_loop(cache, args.steps, elastic=False, graphs=True)

    def premapped_interleaved() -> dict:
        with fresh_pool() as pool:
            return premapped_loop(pool, cfg, args.steps, graphs=True, interleaved=True, late_from=args.stop)

    def premapped(lead: int, at_stop: Callable[[KVCache], None] | None = None) -> dict:
        stop = {"stop_mapping_at": args.stop, "at_stop": at_stop} if at_stop else {}
        with fresh_pool() as pool:
            return premapped_loop(
                pool, cfg, args.steps, graphs=True, interleaved=False, lead_cycles=lead, late_from=args.stop, **stop
            )

    variants = {
        "premapped": lambda: premapped(0),
        "premapped+lead": lambda: premapped(LEAD),
        "free": lambda: on_demand(False, 4, 0),
        "free+lead": lambda: on_demand(False, 4, LEAD),
        "held": lambda: on_demand(True, 4, 0),
        "held+lead": lambda: on_demand(True, 4, LEAD),
        "held-1": lambda: on_demand(True, 1, 0),
        "unchunked-free": lambda: on_demand(False, 1 << 20, 0),
        "premapped-rand": premapped_random,
        "warm-zero": lambda: warm_on_demand(False),
        "warm-rand": lambda: warm_on_demand(True),
        "headroom-256": lambda: on_demand(True, 4, 0, headroom=256),
        "headroom-full": lambda: on_demand(True, 4, 0, headroom=cfg.max_seq_len),
        # requests reach at most max_seq_len // 4 + max_seq_len // 2 + 2 tokens (bench/elastic.py's loop)
        "premapped-partial": lambda: premapped_partial(cfg.max_seq_len * 3 // 4 + 64),
        "premapped-warm": premapped_warm,
        "recapture-50": lambda: on_demand(True, 4, 0, recapture=50),
        f"stop-{args.stop}": lambda: on_demand(True, 4, 0, stop=args.stop),
        f"stop-{args.stop}-remap": lambda: on_demand(True, 4, 0, stop=args.stop, at_stop=remap),
        "premapped-remap": lambda: premapped(0, at_stop=remap),
        "premapped-interleaved": premapped_interleaved,
    }
    chosen = [v for v in args.only.split(",") if v] or list(variants)
    chosen = ["premapped", "premapped+lead"] + [v for v in chosen if v not in ("premapped", "premapped+lead")]
    runs: dict[str, list[dict]] = {name: [] for name in chosen}
    for r in range(args.rounds):
        for name in chosen:
            runs[name].append(variants[name]())
            x = runs[name][-1]
            phases = ", ".join(f"{k} {v:.0f}" for k, v in x["median_phase_us"].items())
            by_map = ", ".join(f"{k} {'n/a' if v is None else f'{v * 1e3:.1f}'}"
                               for k, v in x["median_gpu_ms_by_mapping"].items())  # fmt: skip
            print(f"round {r} {name:15s} step {x['median_step_ms'] * 1e3:7.1f} us  "
                  f"kernels {x['median_gpu_ms'] * 1e3:7.1f} us {by_map}  phases {{{phases}}}  "
                  f"sync_grows {x['sync_grows']}",
                  flush=True)  # fmt: skip

    summary = {}
    for name in chosen:
        base = "premapped+lead" if name.endswith("+lead") else "premapped"
        gpu = [a["median_gpu_ms"] / b["median_gpu_ms"] for a, b in zip(runs[name], runs[base], strict=True)]
        step = [a["median_step_ms"] / b["median_step_ms"] for a, b in zip(runs[name], runs[base], strict=True)]
        late = [a["median_gpu_ms_late"] / b["median_gpu_ms_late"]
                for a, b in zip(runs[name], runs[base], strict=True)
                if a.get("median_gpu_ms_late") and b.get("median_gpu_ms_late")]  # fmt: skip
        summary[name] = {"vs": base, "kernels": gpu, "step": step, "kernels_median": statistics.median(gpu),
                         "step_median": statistics.median(step), f"kernels_from_step_{args.stop}": late}  # fmt: skip
        print(f"{name:15s} / {base:15s} kernels {statistics.median(gpu):.3f} {[round(g, 3) for g in gpu]}"
              f"  step {statistics.median(step):.3f} {[round(g, 3) for g in step]}"
              + (f"  kernels from step {args.stop} {[round(g, 3) for g in late]}" if late else ""))  # fmt: skip
    if os.environ.get("OUT"):
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "page_mib": args.page_mib}
        with open(os.path.join(os.environ["OUT"], f"elastic_ab_{args.page_mib}mib.json"), "w") as f:
            json.dump({"env": env, "summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
