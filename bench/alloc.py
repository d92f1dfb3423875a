# SPDX-License-Identifier: Apache-2.0
"""What vkv's allocator costs per page and per token, against the raw driver calls, on the backend at hand.

    python bench/alloc.py [--backend cuda|host] [--pages N]

Raw rows call the driver directly (cuda.bindings on cuda, libc mmap on the host), with no vkv code in
between; vkv rows go through the pool, the virtual range and the per-model cache. The cache rows use
Llama-3-8B's geometry (32 layers, 8 KV heads, head_dim 128, bf16: 128 KiB a token, 16 tokens a page).
Writes bench/results/alloc-<backend>.json and prints a table.
"""

from __future__ import annotations

import argparse

import torch
from common import environment, print_table, summary_us, time_each, write_json

from vkv import CacheConfig, KVCache, PagePool, VirtualRange, get_driver

LLAMA_8B = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)


def raw_rows(driver, n: int) -> list[dict]:
    """Per-call costs of the bare driver calls over n pages."""
    page = driver.page_size
    base = driver.reserve(n * page)
    rows = []
    if driver.name == "cuda":
        from cuda.bindings import driver as cu

        from vkv.allocator.cuda import check

        prop, access = driver._prop, [driver._access]
        handles: list = []
        rows.append(("cuMemCreate", time_each(lambda i: handles.append(check("c", cu.cuMemCreate(page, prop, 0))), n)))
        rows.append(
            ("cuMemMap", time_each(lambda i: check("m", cu.cuMemMap(base + i * page, page, 0, handles[i], 0)), n))
        )
        rows.append(
            ("cuMemSetAccess", time_each(lambda i: check("s", cu.cuMemSetAccess(base + i * page, page, access, 1)), n))
        )
        rows.append(("cuMemUnmap", time_each(lambda i: check("u", cu.cuMemUnmap(base + i * page, page)), n)))

        def map_and_access(i):
            check("m", cu.cuMemMap(base + i * page, page, 0, handles[i], 0))
            check("s", cu.cuMemSetAccess(base + i * page, page, access, 1))

        rows.append(("cuMemMap + cuMemSetAccess (pooled handle)", time_each(map_and_access, n)))
        for i in range(n):
            check("u", cu.cuMemUnmap(base + i * page, page))
        rows.append(("cuMemRelease", time_each(lambda i: check("r", cu.cuMemRelease(handles[i])), n)))
    else:
        import mmap

        from vkv.allocator import host

        offsets = [driver.create_page() for _ in range(n)]
        rw, shared_fixed = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | host._MAP_FIXED
        none_flags = host._RESERVE_FLAGS | host._MAP_FIXED
        lib = host._libc
        rows.append(
            (
                "mmap(MAP_FIXED|MAP_SHARED) (pooled page)",
                time_each(lambda i: lib.mmap(base + i * page, page, rw, shared_fixed, driver._fd, offsets[i]), n),
            )
        )
        rows.append(
            ("mmap(PROT_NONE) (unmap)", time_each(lambda i: lib.mmap(base + i * page, page, 0, none_flags, -1, 0), n))
        )
        mode = host._FALLOC_FL_PUNCH_HOLE | host._FALLOC_FL_KEEP_SIZE
        rows.append(
            (
                "fallocate(PUNCH_HOLE) (release)",
                time_each(lambda i: lib.fallocate(driver._fd, mode, offsets[i], page), n),
            )
        )
    driver.free_range(base, n * page)
    return [{"what": name, "level": "raw driver", **summary_us(s)} for name, s in rows]


def vkv_rows(driver, n: int) -> list[dict]:
    """Per-page costs through the pool and a virtual range."""
    pool = PagePool(driver, budget_bytes=n * driver.page_size)
    rows = []
    with VirtualRange(pool, n) as r:
        rows.append(("pool create + map (new page)", time_each(lambda i: r.map([i]), n)))
        rows.append(("unmap to the pool", time_each(lambda i: r.unmap([i]), n)))
        created = pool.stats().created
        rows.append(("map a pooled page", time_each(lambda i: r.map([i]), n)))
        r.unmap(range(n))
        batch = time_each(lambda i: r.map(range(n)), 1)[0]
        batch_unmap = time_each(lambda i: r.unmap(range(n)), 1)[0]  # adjacent pages: one driver call
        assert pool.stats().created == created, "a pooled page was created again"
    pool.close()
    out = [{"what": name, "level": "vkv range", **summary_us(s)} for name, s in rows]
    out.append(
        {"what": f"map {n} pooled pages in one call (per page)", "level": "vkv range", **summary_us([batch / n])}
    )
    per_page = summary_us([batch_unmap / n])
    out.append({"what": f"unmap {n} adjacent pages in one call (per page)", "level": "vkv range", **per_page})
    return out


def cache_rows(driver, max_seq_len: int = 4096) -> tuple[list[dict], dict]:
    """Per-token and per-page costs of growing, freeing and reusing a Llama-3-8B slot."""
    cfg = CacheConfig(**LLAMA_8B, max_slots=4, max_seq_len=max_seq_len)
    slot_pages = -(-max_seq_len * cfg.token_bytes // driver.page_size)
    pool = PagePool(driver, budget_bytes=2 * slot_pages * driver.page_size)
    rows, checks = [], {}
    with KVCache(cfg, pool) as cache:
        a = cache.allocate()
        per_token = time_each(lambda i: cache.grow(a, i + 1), max_seq_len)  # decode: one token a step
        rows.append({"what": "grow by 1 token (decode step; new pages)", "level": "vkv cache", **summary_us(per_token)})
        rows.append(
            {
                "what": "  the same, steps that mapped a page",
                "level": "vkv cache",
                **summary_us(
                    per_token[:: driver.page_size // cfg.token_bytes]
                    if cfg.token_bytes < driver.page_size
                    else per_token
                ),
            }
        )
        n = max_seq_len

        def row(what: str, seconds: float, per: int = 1) -> None:
            rows.append({"what": what, "level": "vkv cache", **summary_us([seconds / per])})

        row("free a slot (deferred: its pages stay mapped)", time_each(lambda i: cache.free(a), 1)[0])
        before = pool.stats()
        t_admit = time_each(lambda i: cache.grow(cache.allocate(num_tokens=n), n), 1)[0]
        row(f"admit a {n}-token request into the freed slot (allocate + grow)", t_admit)
        checks["driver_calls_on_reuse_admission"] = pool.stats() != before
        cache.free(a)
        row(
            "give a freed slot's pages back to the pool (trim, per page)",
            time_each(lambda i: cache.trim(), 1)[0],
            slot_pages,
        )
        created = pool.stats().created
        with KVCache(cfg, pool) as other:  # another model takes the pages the first gave back
            t_reuse = time_each(lambda i: other.grow(other.allocate(), n), 1)[0]
            row(f"another model grows a slot to {n} tokens from pooled pages (per page)", t_reuse, slot_pages)
            row("  the same, per token", t_reuse, n)
            checks["pages_created_on_reuse"] = pool.stats().created - created
            b = cache.allocate()
            t_new = time_each(lambda i: cache.grow(b, n), 1)[0]
            row(f"grow a slot to {n} tokens with new pages (per page)", t_new, slot_pages)
    pool.close()
    return rows, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=None, help="cuda, host or auto (default)")
    parser.add_argument("--pages", type=int, default=256, help="pages per measurement (default 256 = 512 MiB)")
    args = parser.parse_args()
    driver = get_driver(args.backend)
    print(f"bench/alloc.py: {driver.describe()}, {args.pages} pages per row")
    raw_rows(driver, 16), vkv_rows(driver, 16)  # warm-up: first calls load code and set up tables
    rows = raw_rows(driver, args.pages) + vkv_rows(driver, args.pages)
    crows, checks = cache_rows(driver)
    rows += crows

    by = {r["what"]: r["median_us"] for r in rows}
    raw_map = by.get("cuMemMap + cuMemSetAccess (pooled handle)") or by["mmap(MAP_FIXED|MAP_SHARED) (pooled page)"]
    checks["map_pooled_vs_raw"] = by["map a pooled page"] / raw_map
    for r in rows:
        r["vs raw map"] = r["median_us"] / raw_map
    path = write_json(
        f"alloc-{driver.name}",
        {"env": environment(), "backend": driver.name, "page_size": driver.page_size, "rows": rows, "checks": checks},
    )
    print_table(rows, ["level", "what", "median_us", "mean_us", "n", "vs raw map"])
    print(
        f"driver calls when a request is admitted into a freed slot: {checks['driver_calls_on_reuse_admission']}; "
        f"map of a pooled page / raw map(+setaccess): {checks['map_pooled_vs_raw']:.3f}x "
        f"(on the host Python costs more than mmap itself); "
        f"pages created when a freed slot was reused: {checks['pages_created_on_reuse']}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
