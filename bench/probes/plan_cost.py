# SPDX-License-Identifier: Apache-2.0
"""Host cost of AttentionWrapper.plan() for a 16-request decode step, and of its metadata upload two ways.

    python bench/probes/plan_cost.py

plan() as it is (a ring of persistent pinned rows), against what it replaced: a new host tensor pinned
for every plan (torch.tensor(...).pin_memory(), then a non-blocking copy). Medians of 2000 calls each,
taken in turn in 5 rounds, with a CUDA graph replay queued now and then as in a decode loop.
"""

from __future__ import annotations

import statistics
import time

import torch

from vkv import AttentionWrapper, CacheConfig, KVCache, PagePool, get_driver


def main() -> None:
    cfg = CacheConfig(32, 8, 128, torch.bfloat16, max_slots=16, max_seq_len=4096)
    pool = PagePool(get_driver("cuda"))
    with KVCache(cfg, pool) as cache:
        slots = [cache.allocate() for _ in range(16)]
        for s in slots:
            cache.grow(s, 2048)
        wrapper = AttentionWrapper(cache, num_q_heads=32)
        lens = [1000 + 37 * i for i in range(16)]
        dst = torch.empty(81, dtype=torch.int32, device="cuda")
        flat = list(range(81))

        def plan() -> None:
            wrapper.plan(slots, lens, [1] * 16)

        def pinned_per_call() -> None:
            dst.copy_(torch.tensor(flat, dtype=torch.int32).pin_memory(), non_blocking=True)

        def ring_row() -> None:
            wrapper._upload([slots, [n + 1 for n in lens], list(range(17)), slots, lens])

        calls = {"plan": plan, "upload: ring row": ring_row, "upload: pinned per call": pinned_per_call}
        results: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(5):
            for name, fn in calls.items():
                samples = []
                for i in range(2000):
                    t0 = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - t0)
                    if i % 50 == 0:
                        torch.cuda.synchronize()
                results[name].append(statistics.median(samples) * 1e6)
        torch.cuda.synchronize()
    pool.close()
    print(f"plan_cost on {torch.cuda.get_device_name()}, torch {torch.__version__}: median us per call, 5 rounds")
    for name, values in results.items():
        print(f"  {name:26s} {statistics.median(values):7.1f}  {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
