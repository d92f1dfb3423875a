# SPDX-License-Identifier: Apache-2.0
"""Does one VMM call slow the kernels that run after it? (bench/elastic.py (a): kernels 2-4% slower in a loop
that maps while it runs, in every step, whether or not that step mapped.)

    python tools/map_cost.py [--replays 60] [--rounds 3]

A Llama-3-8B cache (32 layers, 8 KV heads x 128, bf16, token-major) of 16 slots x 4096 tokens, each slot
mapped to its first 2048 tokens from a fresh pool; one decode step over all 32 layers at 2047 tokens a slot
is captured as a CUDA graph. Each replay: synchronize, then the pattern's VMM call(s) with the GPU idle (or,
for "during", right after the replay's launch), then the replay between two CUDA events. Patterns:
  none             no VMM call (the baseline)
  map-same         map one pooled page in the cache's own range, past every slot's 2048 tokens (unread)
  map-other        map one pooled page in a separate reservation
  map-same-during  map-same, but while the replay runs
  setaccess        cuMemSetAccess again over a page the step reads (no new mapping)
  unmap-same       unmap a page mapped past the read tokens earlier (untimed)
  map-same/8       map-same before every 8th replay only: times by replays since the mapping tell how long
                   any effect lasts
  map16-run        16 pages mapped before every 8th replay, 16 cuMemMap then one cuMemSetAccess over them
  map16-each       16 pages before every 8th replay, cuMemMap + cuMemSetAccess a page (the driver's map())
Prints medians (us) and ratios to "none" of the same round; writes $OUT/map_cost.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from vkv import AttentionWrapper, CacheConfig, KVCache, PagePool, get_driver
from vkv.allocator.cuda import check, cu

SLOTS, MAX_TOKENS, TOKENS = 16, 4096, 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replays", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--page-mib", type=int, default=2)
    args = parser.parse_args()
    cfg = CacheConfig(32, 8, 128, torch.bfloat16, max_slots=SLOTS, max_seq_len=MAX_TOKENS, layout="token")
    driver = get_driver("cuda", page_size=args.page_mib << 20)
    pool = PagePool(driver)
    size = pool.page_size
    with KVCache(cfg, pool) as cache:
        slots = [cache.allocate() for _ in range(SLOTS)]
        for s in slots:
            cache.grow(s, TOKENS)
        for layer in range(cfg.num_layers):
            cache.key_view(layer)[:, :TOKENS].normal_()
            cache.value_view(layer)[:, :TOKENS].normal_()
        layout = cache.layout
        first_unread = layout.pages_per_plane(TOKENS)  # the step reads tokens [0, TOKENS): pages before this
        if -(-args.replays // 8) * 16 > layout.pages_per_slot - first_unread:
            parser.error("--replays too large: the 16-page runs must fit in one slot's unread pages")
        # page addresses past every slot's read tokens, in the cache's range (slot-major order)
        spare_addrs = [
            cache.range.addr + i * size
            for s in slots
            for i in layout.slot_pages(s, layout.pages_per_slot, first_unread)
        ]
        read_addr = cache.range.addr + layout.slot_pages(0, 1)[0] * size
        other_base = driver.reserve(len(spare_addrs) * size)
        other_addrs = [other_base + i * size for i in range(len(spare_addrs))]
        handles = pool.acquire(len(spare_addrs))  # created now, before any timing

        wrapper = AttentionWrapper(cache, num_q_heads=32)
        q = torch.randn(SLOTS, 32, 128, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(SLOTS, 8, 128, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        wrapper.plan(slots, [TOKENS - 1] * SLOTS, [1] * SLOTS)
        for layer in range(cfg.num_layers):
            wrapper.run(layer, q, kv, kv, out=out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for layer in range(cfg.num_layers):
                wrapper.run(layer, q, kv, kv, out=out)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        access = [driver._access]

        mapped: list[int] = []  # addresses this probe mapped (to undo after each pattern)
        cursor = {"i": 0}

        def map_one(addrs: list[int], set_access: bool = True) -> int:
            i = cursor["i"]
            cursor["i"] += 1
            addr = addrs[i]
            check("cuMemMap", cu.cuMemMap(addr, size, 0, handles[i], 0))
            if set_access:
                check("cuMemSetAccess", cu.cuMemSetAccess(addr, size, access, 1))
            mapped.append(addr)
            return addr

        def map_run(n: int, each: bool) -> None:
            start = cursor["i"]
            for _ in range(n):
                map_one(spare_addrs, set_access=each)
            if not each:  # the run is contiguous within a slot: one call sets access over all of it
                first = spare_addrs[start]
                assert spare_addrs[start + n - 1] == first + (n - 1) * size
                check("cuMemSetAccess", cu.cuMemSetAccess(first, n * size, access, 1))

        def undo() -> None:
            torch.cuda.synchronize()
            for addr in mapped:
                check("cuMemUnmap", cu.cuMemUnmap(addr, size))
            mapped.clear()
            cursor["i"] = 0

        def replay_timed(before=None, during=None) -> float:
            torch.cuda.synchronize()
            if before:
                before()
            begin.record()
            graph.replay()
            end.record()
            if during:
                during()
            end.synchronize()
            return begin.elapsed_time(end) * 1e3

        def pattern(name: str) -> list[float]:
            times = []
            n = args.replays
            if name == "unmap-same":  # map the pages first (untimed), then unmap one before each replay
                for _ in range(n):
                    map_one(spare_addrs)
                torch.cuda.synchronize()
                for _ in range(3):
                    replay_timed()
                for _ in range(n):
                    addr = mapped.pop()
                    times.append(replay_timed(before=lambda a=addr: check("cuMemUnmap", cu.cuMemUnmap(a, size))))
                undo()
                return times
            for _ in range(3):
                replay_timed()  # settle after the previous pattern's unmaps
            for r in range(n):
                if name == "none":
                    times.append(replay_timed())
                elif name == "map-same":
                    times.append(replay_timed(before=lambda: map_one(spare_addrs)))
                elif name == "map-other":
                    times.append(replay_timed(before=lambda: map_one(other_addrs)))
                elif name == "map-same-during":
                    times.append(replay_timed(during=lambda: map_one(spare_addrs)))
                elif name == "setaccess":
                    times.append(
                        replay_timed(
                            before=lambda: check("cuMemSetAccess", cu.cuMemSetAccess(read_addr, size, access, 1))
                        )
                    )
                elif name == "map-same/8":
                    times.append(replay_timed(before=(lambda: map_one(spare_addrs)) if r % 8 == 0 else None))
                elif name in ("map16-run", "map16-each"):
                    each = name == "map16-each"
                    times.append(replay_timed(before=(lambda e=each: map_run(16, e)) if r % 8 == 0 else None))
                else:
                    raise ValueError(name)
            undo()
            return times

        names = ["none", "map-same", "map-other", "map-same-during", "setaccess", "unmap-same", "map-same/8",
                 "map16-run", "map16-each"]  # fmt: skip
        rounds: list[dict[str, list[float]]] = []
        print(f"{torch.cuda.get_device_name()}, {args.page_mib} MiB pages; {SLOTS} slots x {TOKENS} tokens, "
              f"one decode step over 32 layers; medians of {args.replays} replays (us)", flush=True)  # fmt: skip
        for r in range(args.rounds):
            try:
                rounds.append({name: pattern(name) for name in names})
            finally:
                undo()  # a pattern that failed midway leaves no probe page mapped in the cache's range
            base = statistics.median(rounds[-1]["none"])
            line = "  ".join(f"{name} {statistics.median(t):.1f} (x{statistics.median(t) / base:.3f})"
                             for name, t in rounds[-1].items())  # fmt: skip
            print(f"round {r}: {line}", flush=True)
            for name in ("map-same/8", "map16-run", "map16-each"):
                t = rounds[-1][name]
                by = [statistics.median(t[k::8]) / base for k in range(8)]
                print(f"  {name} by replays since the mapping: " + " ".join(f"{x:.3f}" for x in by), flush=True)
        graph.reset()
        driver.free_range(other_base, len(other_addrs) * size)
        pool.release(handles)
    pool.close()
    if os.environ.get("OUT"):
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "page_mib": args.page_mib}
        with open(os.path.join(os.environ["OUT"], f"map_cost_{args.page_mib}mib.json"), "w") as f:
            json.dump({"env": env, "rounds": rounds}, f)


if __name__ == "__main__":
    main()
