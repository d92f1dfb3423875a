# SPDX-License-Identifier: Apache-2.0
"""Probe: do the CUDA VMM calls of two processes on one GPU overlap?

    python tools/vmm_two_procs.py

Times, in separate processes started together: A unmapping + releasing 1024 mapped 2 MiB pages, B creating
+ mapping + setting access on 1024, each alone, then both at once, then two creators at once. On the H200
(2026-11-29): release 35 ms and create 49 ms alone; side by side 69 ms and 80 ms, two creators 71 and
66 ms: the driver serialises them, so one model's pages cannot be created while another's are released
any faster than one after the other. "release_range" unmaps all the pages in one cuMemUnmap call (to see
whether the per-call cost of unmapping can be cut; not yet measured). "give + take" hands the pages over
(exported as POSIX fds over a unix socket, imported and mapped by the other process) instead of release +
create (not yet measured).
"""

import os
import socket
import subprocess
import sys
import time

from cuda.bindings import driver as cu

PAGE = 2 << 20
FD_HANDLE = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
FDS_PER_MESSAGE = 200  # file descriptors per SCM_RIGHTS message (the kernel allows 253)


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


def handover(role: str, n: int, start_at: float, sock_fd: int) -> None:
    """The pages change hands instead of being released and created: "give" (A) unmaps each page,
    exports it as a POSIX fd, sends the fds over a unix socket and drops its handle; "take" (B) imports,
    maps and sets access."""
    prop, access = setup()
    prop.requestedHandleTypes = FD_HANDLE
    sock = socket.socket(fileno=sock_fd)
    base = int(check(cu.cuMemAddressReserve(n * PAGE, 0, 0, 0)))
    handles = [create_and_map(prop, access, base + i * PAGE) for i in range(n)] if role == "give" else []
    while time.time() < start_at:
        pass
    t = time.perf_counter()
    if role == "give":
        for first in range(0, n, FDS_PER_MESSAGE):
            fds = []
            for i in range(first, min(n, first + FDS_PER_MESSAGE)):
                check(cu.cuMemUnmap(base + i * PAGE, PAGE))
                fds.append(int(check(cu.cuMemExportToShareableHandle(handles[i], FD_HANDLE, 0))))
                check(cu.cuMemRelease(handles[i]))  # the fd keeps the memory alive until B imports it
            socket.send_fds(sock, [b"p"], fds)
            for fd in fds:
                os.close(fd)
    else:
        taken = 0
        while taken < n:
            _, fds, _, _ = socket.recv_fds(sock, 1, FDS_PER_MESSAGE)
            for fd in fds:
                handle = check(cu.cuMemImportFromShareableHandle(fd, FD_HANDLE))
                os.close(fd)
                check(cu.cuMemMap(base + taken * PAGE, PAGE, 0, handle, 0))
                check(cu.cuMemSetAccess(base + taken * PAGE, PAGE, [access], 1))
                taken += 1
    print(f"{role} {n} pages: {1e3 * (time.perf_counter() - t):.1f} ms", flush=True)


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
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    start_at = time.time() + 5
    procs = [
        subprocess.Popen([sys.executable, __file__, role, str(n), str(start_at), str(s.fileno())],
                         stdout=subprocess.PIPE, text=True, pass_fds=[s.fileno()])
        for role, s in (("give", a), ("take", b))
    ]  # fmt: skip
    a.close()
    b.close()
    outs = [p.communicate()[0].strip() for p in procs]
    print("give + take (hand-over) ->", "; ".join(outs), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 4:
        handover(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1:
        worker(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
    else:
        main()
