# SPDX-License-Identifier: Apache-2.0
"""Probe: do the CUDA VMM calls of two processes on one GPU overlap?

    python bench/probes/vmm_two_procs.py

Times, in separate processes started together: A unmapping + releasing 1024 mapped 2 MiB pages, B creating
+ mapping + setting access on 1024, each alone, then both at once, then two creators at once. On the H200
(2026-11-29): release 35 ms and create 49 ms alone; side by side 69 ms and 80 ms, two creators 71 and
66 ms: the driver serialises them, so one model's pages cannot be created while another's are released
any faster than one after the other. "release_range" unmaps all the pages in one cuMemUnmap call (to see
whether the per-call cost of unmapping can be cut; not yet measured).
"""

import subprocess
import sys
import time

from cuda.bindings import driver as cu

PAGE = 2 << 20


def check(result: tuple):
    if result[0] != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {result[0]}")
    return result[1] if len(result) == 2 else None


def setup() -> tuple:
    check(cu.cuInit(0))
    ctx = check(cu.cuDevicePrimaryCtxRetain(check(cu.cuDeviceGet(0))))
    check(cu.cuCtxSetCurrent(ctx))
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = 0
    access = cu.CUmemAccessDesc()
    access.location = prop.location
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return prop, access


def create_and_map(prop, access, addr: int) -> object:
    handle = check(cu.cuMemCreate(PAGE, prop, 0))
    check(cu.cuMemMap(addr, PAGE, 0, handle, 0))
    check(cu.cuMemSetAccess(addr, PAGE, [access], 1))
    return handle


def worker(role: str, n: int, start_at: float) -> None:
    prop, access = setup()
    base = int(check(cu.cuMemAddressReserve(n * PAGE, 0, 0, 0)))
    mapped = role.startswith("release")
    handles = [create_and_map(prop, access, base + i * PAGE) for i in range(n)] if mapped else []
    while time.time() < start_at:
        pass
    t = time.perf_counter()
    if role == "release_range":  # one cuMemUnmap over all n pages, then the releases
        check(cu.cuMemUnmap(base, n * PAGE))
        for h in handles:
            check(cu.cuMemRelease(h))
    for i in range(n if role in ("release", "create") else 0):
        if role == "release":
            check(cu.cuMemUnmap(base + i * PAGE, PAGE))
            check(cu.cuMemRelease(handles[i]))
        else:
            handles.append(create_and_map(prop, access, base + i * PAGE))
    print(f"{role} {n} pages: {1e3 * (time.perf_counter() - t):.1f} ms", flush=True)


def main() -> None:
    n = 1024
    for roles in (["release"], ["release_range"], ["create"], ["release", "create"], ["create", "create"]):
        start_at = time.time() + 5  # after every process has started and set up
        procs = [
            subprocess.Popen([sys.executable, __file__, role, str(n), str(start_at)], stdout=subprocess.PIPE, text=True)
            for role in roles
        ]
        outs = [p.communicate()[0].strip() for p in procs]
        print(" + ".join(roles), "->", "; ".join(outs), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        worker(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
