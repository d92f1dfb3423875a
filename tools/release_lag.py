# SPDX-License-Identifier: Apache-2.0
"""Does device memory go back to the driver when cuMemUnmap + cuMemRelease return, or some time after?

    python tools/release_lag.py [--pages 27] [--rounds 5] [--poll-ms 200]

bench/stress.py on an H100 (2026-12-06) saw every over-budget sample in one member whose ledger entries counted 0
pages while NVML still gave it 34-54 MiB beyond its context (17-27 pages of 2 MiB) for ~40-50 ms. This probe maps
--pages pages of 2 MiB into a range, writes them (a kernel), unmaps and releases them, then polls every ~1 ms for
--poll-ms: NVML's figure for this process and cuMemGetInfo's free bytes. It prints when each came back to its
level before the pages were created. Both late: the memory is held after the calls return (the budget can be
over for that long); NVML alone late: its per-process figure lags (the stress watcher's reading, not the budget).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import DeviceMemory  # noqa: E402

from vkv import get_driver  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=27)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--poll-ms", type=float, default=200.0)
    args = p.parse_args()
    driver = get_driver("cuda", page_size=2 << 20)
    page, pid, nvml = driver.page_size, os.getpid(), DeviceMemory()
    nbytes = args.pages * page
    addr = driver.reserve(nbytes)

    def readings() -> tuple[int | None, int]:
        used = nvml.used()
        return (used or {}).get(pid), driver.memory_info()[0]

    for r in range(args.rounds):
        torch.cuda.synchronize()
        before_nvml, before_free = readings()
        handles = [driver.create_page() for _ in range(args.pages)]
        for i, h in enumerate(handles):
            driver.map(addr + i * page, h)
        driver.tensor(addr, nbytes).fill_(r + 1)  # touched by a kernel, as the cache's pages are
        torch.cuda.synchronize()
        held_nvml, held_free = readings()
        driver.unmap_range(addr, nbytes)
        for h in handles:
            driver.release_page(h)
        returned = time.perf_counter()
        nvml_back = free_back = None
        while time.perf_counter() - returned < args.poll_ms / 1e3 and (nvml_back is None or free_back is None):
            now_nvml, now_free = readings()
            t = (time.perf_counter() - returned) * 1e3
            if nvml_back is None and now_nvml is not None and before_nvml is not None and now_nvml <= before_nvml:
                nvml_back = t
            if free_back is None and now_free >= before_free:
                free_back = t
            time.sleep(0.001)
        mib = 2**20
        print(f"round {r}: held NVML +{((held_nvml or 0) - (before_nvml or 0)) / mib:.0f} MiB, free "
              f"-{(before_free - held_free) / mib:.0f} MiB; after release NVML back in "
              f"{'>' if nvml_back is None else ''}{nvml_back or args.poll_ms:.1f} ms, cuMemGetInfo back in "
              f"{'>' if free_back is None else ''}{free_back or args.poll_ms:.1f} ms", flush=True)  # fmt: skip
    driver.free_range(addr, nbytes)


if __name__ == "__main__":
    main()
