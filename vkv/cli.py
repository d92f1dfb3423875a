# SPDX-License-Identifier: Apache-2.0
"""The vkv command line: ``vkv info``."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata

import torch

from vkv.allocator import BACKENDS, PagePool, VirtualRange, VkvError, get_driver


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def info(backend: str | None) -> dict:
    """Open the backend, map and check two pages through a pool, and report what was seen."""
    driver = get_driver(backend)
    free, total = driver.memory_info()
    pool = PagePool(driver, budget_bytes=4 * driver.page_size)
    with VirtualRange(pool, num_pages=4) as probe:
        probe.map([1, 3])
        view = probe.tensor()
        pattern = torch.arange(driver.page_size, device=driver.device, dtype=torch.int64).remainder_(251)
        view[driver.page_size : 2 * driver.page_size] = pattern.to(torch.uint8)
        ok = bool(view[driver.page_size : 2 * driver.page_size].eq(pattern.to(torch.uint8)).all())
        probe.unmap([1, 3])
        probe.map([0])  # served from the pool's free list, not created
        stats = pool.stats()
    pool.close()
    return {
        "vkv": _version("vkv"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda-python": _version("cuda-python"),
        "backend": driver.name,
        "device": torch.cuda.get_device_name(driver.device) if driver.name == "cuda" else "cpu (host mmap)",
        "page_size": driver.page_size,
        "memory_free": free,
        "memory_total": total,
        "probe_pages_ok": ok,
        "pool": {
            k: getattr(stats, k) for k in ("page_size", "budget_pages", "live", "in_use", "free", "created", "reused")
        },
    }


def _print_info(report: dict) -> None:
    gib = 1 << 30
    pool = report["pool"]
    rows = [
        (
            "vkv",
            f"{report['vkv']} (torch {report['torch']}, triton {report['triton']}, "
            f"cuda-python {report['cuda-python']})",
        ),
        ("backend", report["backend"]),
        ("device", report["device"]),
        ("page size", f"{report['page_size'] >> 10} KiB"),
        ("memory", f"{report['memory_free'] / gib:.1f} GiB free of {report['memory_total'] / gib:.1f} GiB"),
        ("probe", "mapped, written and read back 2 pages: " + ("ok" if report["probe_pages_ok"] else "MISMATCH")),
        (
            "pool",
            f"budget {pool['budget_pages']} pages, live {pool['live']}, in use {pool['in_use']}, free {pool['free']}, "
            f"created {pool['created']}, reused {pool['reused']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vkv", description="vkv: an elastic, virtualized KV cache for LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="backend, device, page size and pool statistics")
    p_info.add_argument("--backend", choices=(*BACKENDS, "auto"), default="auto", help="default: cuda if usable")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        report = info(args.backend)
    except VkvError as e:
        print(f"vkv: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0 if report["probe_pages_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
