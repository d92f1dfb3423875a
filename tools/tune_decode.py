# SPDX-License-Identifier: Apache-2.0
"""Tuning sweep for vkv's decode kernel: tile configs x split counts, and what the memory under it costs.

    python tools/tune_decode.py [--shapes 8x8192,1x65536,...]

For each shape: the same K/V (a) in a fresh cuda-mapped cache, (b) in a cache whose pages were reused
after pool churn (scattered physical order), (c) in one cudaMalloc'd buffer with the same strides; then
a sweep of DecodeConfig (block_n, warps, stages) x num_splits on (a). Writes tools/results/tune_decode.json.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py, the benchmarks
from common import environment, free_device_memory, gpu_timer, print_table, require_cuda, write_json  # noqa: E402

from vkv import CacheConfig, KVCache, PagePool  # noqa: E402
from vkv.kernels import DecodeConfig, choose_num_splits, decode_attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    "8x8192": (8, 8192),
    "64x8192": (64, 8192),
    "1x65536": (1, 65536),
    "256x1024": (256, 1024),
    "varied": (64, 4096),
}
HQ, HKV, D, LAYERS = 32, 8, 128, 8


def lengths_of(name: str) -> list[int]:
    batch, length = SHAPES[name]
    if name == "varied":
        rng = random.Random(0)
        return [rng.randint(1024, 4096) for _ in range(batch)]
    return [length] * batch


def fill_cache(pool: PagePool, lengths: list[int]) -> KVCache:
    cfg = CacheConfig(
        num_layers=LAYERS,
        num_kv_heads=HKV,
        head_dim=D,
        dtype=torch.bfloat16,
        max_slots=len(lengths),
        max_seq_len=max(lengths),
    )
    cache = KVCache(cfg, pool)
    for n in lengths:
        cache.grow(cache.allocate(), n)
    buf = cache.range.tensor().view(torch.bfloat16)
    for s, n in enumerate(lengths):  # random bytes only where mapped
        for layer in range(LAYERS):
            for view in (cache.key_view(layer), cache.value_view(layer)):
                view[s, :n].normal_()
    del buf
    return cache


def main() -> None:
    require_cuda("tools/tune_decode.py")
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    timer = gpu_timer(150, 100, graph=True)
    dev = torch.device("cuda")
    pool = PagePool("cuda", budget_bytes=60 << 30)
    rows, sweep = [], []
    for name in args.shapes.split(","):
        lengths = lengths_of(name)
        batch, kv_bytes = len(lengths), 2 * sum(lengths) * HKV * D * 2
        q = torch.randn(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        slots = torch.arange(batch, device=dev, dtype=torch.int32)
        lens = torch.tensor(lengths, device=dev, dtype=torch.int32)
        out = torch.empty_like(q)
        h = choose_num_splits(batch, HKV, max(lengths), head_dim=D, device=dev, total_tokens=sum(lengths))

        def tbps(k, v, splits=h, config=None, q=q, slots=slots, lens=lens, out=out, lengths=lengths, kv_bytes=kv_bytes):
            def call():
                return decode_attention(
                    q, k, v, slots, lens, out=out, num_splits=splits, max_len=max(lengths), config=config
                )

            return kv_bytes / timer(call) / 1e6

        fresh = fill_cache(pool, lengths)
        row = {"shape": name, "splits": h, "fresh pages": tbps(fresh.key_view(0), fresh.value_view(0))}
        dense = torch.empty(fresh.range.nbytes // 2, device=dev, dtype=torch.bfloat16).normal_()
        kd, vd = (fresh.layout.view(dense, 0, kv) for kv in (0, 1))
        row["cudaMalloc same strides"] = tbps(kd, vd)
        kc = torch.randn(batch, max(lengths), HKV, D, device=dev, dtype=torch.bfloat16)
        row["cudaMalloc contiguous"] = tbps(kc, torch.randn_like(kc))
        del dense, kd, vd, kc
        free_device_memory()
        for cfg, splits in itertools.product(
            [DecodeConfig(bn, w, st) for bn, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))],
            sorted({h, max(1, h // 2), 2 * h, 4 * h}),
        ):
            point = {"shape": name, "block_n": cfg.block_n, "warps": cfg.num_warps, "stages": cfg.num_stages}
            point["splits"] = splits
            try:
                point["tbps"] = tbps(fresh.key_view(0), fresh.value_view(0), splits, cfg)
            except Exception as exc:  # noqa: BLE001 - an unfit config (shared memory) is recorded, not fatal
                point["error"] = str(exc)[:200]
            sweep.append(point)
        fresh.close()
        # churn: fill and free a cache twice the size, so the next cache gets pages in scattered order
        churn = fill_cache(pool, [max(lengths)] * min(2 * batch, 128))
        churn.close()
        reused = fill_cache(pool, lengths)
        row["reused pages"] = tbps(reused.key_view(0), reused.value_view(0))
        reused.close()
        pool.shrink()
        best = max((s for s in sweep if s["shape"] == name and "tbps" in s), key=lambda s: s["tbps"])
        row["best sweep"] = best["tbps"]
        row["best config"] = f"bn{best['block_n']} w{best['warps']} st{best['stages']} sp{best['splits']}"
        rows.append(row)
        print(row, flush=True)
    write_json("tune_decode", {"env": environment(), "rows": rows, "sweep": sweep}, RESULTS)
    print_table(
        rows,
        [
            "shape",
            "splits",
            "fresh pages",
            "reused pages",
            "cudaMalloc same strides",
            "cudaMalloc contiguous",
            "best sweep",
            "best config",
        ],
    )


if __name__ == "__main__":
    main()
