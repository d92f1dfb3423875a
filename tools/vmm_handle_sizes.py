# SPDX-License-Identifier: Apache-2.0
"""Probe: what CUDA VMM calls cost per handle as handles grow, and whether page placement slows reads.

    python tools/vmm_handle_sizes.py [--total-mib 2048]

Part 1, per handle size (2 to 64 MiB), over --total-mib of memory: the median time of cuMemCreate, cuMemMap,
cuMemSetAccess, cuMemUnmap and cuMemRelease per handle, and what moving 8 GiB would cost at that size
(all five calls, one after another). The 8 GiB reclaim of bench/elastic.py (c) pays all five per page.
Part 2, reads: a float32 sum over the whole region (triton.testing.do_bench median) with 2 MiB handles
mapped in creation order, interleaved 16 ways (consecutive handles land in 16 different places, as when 16
slots grow a page each in turn), and shuffled, and with 32 MiB handles in order; against the same sum over a
torch.empty buffer. Tells whether physical page placement costs the kernels bandwidth (bench/elastic.py
(a): pre-mapped pages interleaved read ~3% slower than pages mapped slot after slot).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import triton.testing
from cuda.bindings import driver as cu
from vmm_two_procs import check, setup  # the same context and allocation properties

MIB = 1 << 20


class _Array:
    def __init__(self, addr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3}


def timed(samples: list[float], call, *args):
    t0 = time.perf_counter()
    out = check(call(*args))
    samples.append(time.perf_counter() - t0)
    return out


def call_costs(prop, access, size: int, total: int) -> dict:
    n = total // size
    base = check(cu.cuMemAddressReserve(total, size, 0, 0))
    t = {name: [] for name in ("create", "map", "setaccess", "unmap", "release")}
    handles = [timed(t["create"], cu.cuMemCreate, size, prop, 0) for _ in range(n)]
    for i, h in enumerate(handles):
        timed(t["map"], cu.cuMemMap, int(base) + i * size, size, 0, h, 0)
    for i in range(n):
        timed(t["setaccess"], cu.cuMemSetAccess, int(base) + i * size, size, [access], 1)
    for i in range(n):
        timed(t["unmap"], cu.cuMemUnmap, int(base) + i * size, size)
    for h in handles:
        timed(t["release"], cu.cuMemRelease, h)
    check(cu.cuMemAddressFree(base, total))
    per = {name: statistics.median(v) * 1e6 for name, v in t.items()}
    return {"handle_mib": size // MIB, "handles": n, "median_us": per,
            "8GiB_ms": sum(per.values()) * (8192 * MIB // size) / 1e3}  # fmt: skip


def read_tbps(prop, access, size: int, total: int, order: str) -> float:
    n = total // size
    base = int(check(cu.cuMemAddressReserve(total, size, 0, 0)))
    handles = [check(cu.cuMemCreate(size, prop, 0)) for _ in range(n)]
    if order == "in order":
        places = list(range(n))
    elif order == "interleaved 16":
        per = n // 16
        places = [(i % 16) * per + i // 16 for i in range(n)]
    else:
        places = random.Random(0).sample(range(n), n)
    for h, p in zip(handles, places, strict=True):
        check(cu.cuMemMap(base + p * size, size, 0, h, 0))
    check(cu.cuMemSetAccess(base, total, [access], 1))
    x = torch.as_tensor(_Array(base, total), device="cuda").view(torch.float32)
    x.fill_(1.0)
    ms = triton.testing.do_bench(lambda: x.sum(), warmup=50, rep=300)
    torch.cuda.synchronize()
    check(cu.cuMemUnmap(base, total))
    for h in handles:
        check(cu.cuMemRelease(h))
    check(cu.cuMemAddressFree(base, total))
    return total / (ms * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-mib", type=int, default=2048)
    total = parser.parse_args().total_mib * MIB
    torch.cuda.init()  # torch's context first: setup() then makes the primary context current
    prop, access = setup()
    print(f"{torch.cuda.get_device_name()}: per-handle VMM call medians (us) over {total // MIB} MiB")
    for size_mib in (2, 4, 8, 16, 32, 64):
        r = call_costs(prop, access, size_mib * MIB, total)
        calls = "  ".join(f"{k} {v:7.1f}" for k, v in r["median_us"].items())
        print(f"{size_mib:3d} MiB x {r['handles']:5d}: {calls}  -> 8 GiB all five: {r['8GiB_ms']:7.1f} ms", flush=True)
    plain = torch.ones(total // 4, device="cuda")
    ms = triton.testing.do_bench(lambda: plain.sum(), warmup=50, rep=300)
    print(f"read (float32 sum) of {total // MIB} MiB, torch.empty buffer: {total / (ms * 1e-3) / 1e12:.2f} TB/s")
    for size_mib, order in ((2, "in order"), (2, "interleaved 16"), (2, "shuffled"), (32, "in order")):
        tbps = read_tbps(prop, access, size_mib * MIB, total, order)
        print(f"read (float32 sum), {size_mib} MiB handles {order}: {tbps:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
