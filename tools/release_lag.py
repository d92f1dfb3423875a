# SPDX-License-Identifier: Apache-2.0
"""Probe: after cuMemUnmap + cuMemRelease + cuCtxSynchronize, how long until the memory shows as freed, per
process (NVML, what bench/stress.py reads) and device-wide (cuMemGetInfo)?

    python tools/release_lag.py [--pages 17] [--trials 8] [--out tools/results/release_lag.json]

bench/stress.py saw a member whose pages had all left the ledger still hold them by NVML for 30-60 ms (issue 12).
Each trial maps --pages 2 MiB pages, writes them, then releases them and synchronizes, in three settings: the GPU
idle; 20 ms of this process's own work queued before the release; another process keeping the GPU busy meanwhile.
It then polls both figures every ~0.2 ms for up to 500 ms and records when each came back down: a lag in NVML's
figure alone is NVML's bookkeeping, one in cuMemGetInfo too is memory the driver has not yet freed.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

from cuda.bindings import driver as cu

from vkv.allocator.nvml import DeviceMemory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from common import environment  # noqa: E402
from vmm_two_procs import PAGE, setup  # noqa: E402 - a context and the page's properties


def check(result: tuple):
    if result[0] != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {result[0]}")
    return result[1] if len(result) == 2 else result[1:] if len(result) > 2 else None


def busy(seconds: float) -> None:
    """Another process: back-to-back 256 MiB memsets for ``seconds``."""
    setup()
    buf = check(cu.cuMemAlloc(256 << 20))
    stream = check(cu.cuStreamCreate(0))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            check(cu.cuMemsetD8Async(buf, 1, 256 << 20, stream))
        check(cu.cuStreamSynchronize(stream))


def trial(prop, access, base: int, pages: int, filler: int, stream, queued: bool, nvml: DeviceMemory) -> dict:
    pid = os.getpid()
    handles = []
    for i in range(pages):
        handles.append(check(cu.cuMemCreate(PAGE, prop, 0)))
        check(cu.cuMemMap(base + i * PAGE, PAGE, 0, handles[-1], 0))
        check(cu.cuMemSetAccess(base + i * PAGE, PAGE, [access], 1))
    check(cu.cuMemsetD8Async(base, 7, pages * PAGE, stream))
    check(cu.cuCtxSynchronize())
    time.sleep(0.05)
    held_nvml, held_free = (nvml.used() or {}).get(pid), check(cu.cuMemGetInfo())[0]
    if queued:  # ~20 ms of work ahead of the release (66 x 1 GiB written at ~3 TB/s)
        for _ in range(60):
            check(cu.cuMemsetD8Async(filler, 3, 1 << 30, stream))
    start = time.perf_counter()
    for i in range(pages):
        check(cu.cuMemUnmap(base + i * PAGE, PAGE))
        check(cu.cuMemRelease(handles[i]))
    released = time.perf_counter() - start
    check(cu.cuCtxSynchronize())
    synced = time.perf_counter() - start
    nvml_at = free_at = None
    while time.perf_counter() - start < 0.5 and (nvml_at is None or free_at is None):
        now = time.perf_counter() - start
        used = (nvml.used() or {}).get(pid)
        if nvml_at is None and used is not None and held_nvml is not None and used <= held_nvml - pages * PAGE:
            nvml_at = now
        if free_at is None and check(cu.cuMemGetInfo())[0] >= held_free + pages * PAGE * 0.9:
            free_at = now
        time.sleep(0.0002)
    ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
    return {"release_ms": ms(released), "synchronized_ms": ms(synced), "nvml_freed_ms": ms(nvml_at),
            "device_freed_ms": ms(free_at)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=17)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "release_lag.json")
    args = parser.parse_args()
    prop, access = setup()
    nvml = DeviceMemory()
    if nvml.why:
        sys.exit(nvml.why)
    base = int(check(cu.cuMemAddressReserve(args.pages * PAGE, 0, 0, 0)))
    filler = check(cu.cuMemAlloc(1 << 30))
    stream = check(cu.cuStreamCreate(0))
    rows = []
    for setting in ("idle", "queued", "other process busy"):
        other = None
        if setting == "other process busy":
            other = multiprocessing.get_context("spawn").Process(target=busy, args=(args.trials * 1.5 + 5,))
            other.start()
            time.sleep(3)
        runs = [trial(prop, access, base, args.pages, filler, stream, setting == "queued", nvml)
                for _ in range(args.trials)]  # fmt: skip
        if other is not None:
            other.terminate()
            other.join()
        row = {"setting": setting, "trials": runs}
        for key in ("synchronized_ms", "nvml_freed_ms", "device_freed_ms"):
            got = [r[key] for r in runs if r[key] is not None]
            row[f"{key}_median"] = statistics.median(got) if got else None
            row[f"{key}_max"] = max(got) if got else None
            row[f"{key}_missed"] = len(runs) - len(got)  # not seen within 500 ms
        rows.append(row)
        print({k: v for k, v in row.items() if k != "trials"}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(), "pages": args.pages, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
