# SPDX-License-Identifier: Apache-2.0
"""Does the order in which slots get their pages change decode time? (bench/elastic.py (a) saw ~2-3%.)

    python tools/placement.py

16 slots of a Llama-3-8B cache (32 layers, 8 KV heads x 128, bf16), 4096 tokens each, are mapped from a fresh
pool in runs of R pages per slot in turn: R = 1 is what growth during decode produces (a page of every slot
in turn), R = all maps slot after slot (a cache mapped up front). Then one decode step over all 32 layers
(a CUDA graph, AttentionWrapper) is timed: median of 50 replays. Token-major and layer-major, 2 and 8 MiB
pages. New handles come from cuMemCreate in mapping order, so R sets how many physically adjacent handles
sit at adjacent virtual addresses of one slot; "random order" creates every page first and hands them out
shuffled (the physical placement a long-running pool's free list tends to).
"""

from __future__ import annotations

import random
import statistics

import torch

from vkv import AttentionWrapper, CacheConfig, KVCache, PagePool, get_driver

SLOTS, TOKENS, REPLAYS = 16, 4096, 50


def step_us(layout: str, page_mib: int, run: int | None, shuffled: bool = False) -> float:
    cfg = CacheConfig(32, 8, 128, torch.bfloat16, max_slots=SLOTS, max_seq_len=TOKENS, layout=layout)
    pool = PagePool(get_driver("cuda", page_size=page_mib << 20))
    try:
        if shuffled:  # every page created first, then handed out in a random order
            pages = pool.acquire(SLOTS * TOKENS * cfg.token_bytes // pool.page_size)
            random.Random(0).shuffle(pages)
            pool.release(pages)
        with KVCache(cfg, pool) as cache:
            slots = [cache.allocate() for _ in range(SLOTS)]
            pages = cache.layout.pages_per_plane(TOKENS)
            step = pages if run is None else run
            for done in range(step, pages + step, step):
                for s in slots:
                    cache.grow(s, min(cache.layout.tokens_in(min(done, pages)), TOKENS))
            wrapper = AttentionWrapper(cache, num_q_heads=32)
            q = torch.randn(SLOTS, 32, 128, device="cuda", dtype=torch.bfloat16)
            kv = torch.randn(SLOTS, 8, 128, device="cuda", dtype=torch.bfloat16)
            out = torch.empty_like(q)
            wrapper.plan(slots, [TOKENS - 1] * SLOTS, [1] * SLOTS)
            for layer in range(32):
                wrapper.run(layer, q, kv, kv, out=out)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for layer in range(32):
                    wrapper.run(layer, q, kv, kv, out=out)
            times = []
            for _ in range(REPLAYS):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            del graph
            return statistics.median(times)
    finally:
        pool.close()


def main() -> None:
    print(f"{torch.cuda.get_device_name()}; {SLOTS} slots x {TOKENS} tokens, one decode step over 32 layers")
    for layout in ("token", "layer"):
        for page_mib in (2, 8):
            base = None
            for run, shuffled in ((None, False), (16, False), (1, False), (None, True), (1, True)):
                us = step_us(layout, page_mib, run, shuffled)
                base = base or us
                label = ("all" if run is None else str(run)) + (" (pages in random order)" if shuffled else "")
                print(
                    f"{layout}-major {page_mib} MiB, runs of {label} pages: {us:7.1f} us  x{us / base:.3f}", flush=True
                )


if __name__ == "__main__":
    main()
