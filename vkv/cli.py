# SPDX-License-Identifier: Apache-2.0
"""The vkv command line: ``vkv info``, ``vkv top`` (every model on a GPU, live) and ``vkv limit MODEL SIZE``."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from importlib import metadata

import torch

from vkv.allocator import BACKENDS, PagePool, VirtualRange, VkvError, get_driver
from vkv.allocator.ledger import Ledger, LedgerStats, format_bytes


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


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """Bytes in ``8GiB``, ``512MiB``, ``1.5G`` (K/M/G/T and KiB/.. are binary, KB/MB/.. decimal), ``4096``;
    None for ``none`` (no limit). Raises ValueError."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)b?|b?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"bad size {text!r}: expected a number of bytes or a size like 8GiB, 512MiB, 1.5G, or none")
    number, unit, binary = match.groups()
    unit = (unit or "").lower()
    decimal = unit and not binary and text.strip().lower().endswith("b")  # KB, MB, GB, TB: powers of 1000
    scale = 1000 ** ("kmgt".index(unit) + 1) if decimal else _UNITS[unit]
    return int(float(number) * scale) if "." in number else int(number) * scale


def _pages(n: int, page_size: int) -> str:
    return f"{n} ({format_bytes(n * page_size)})"


def _table(stats: LedgerStats, rates: dict[tuple, tuple[float, float]] | None) -> str:
    """The budget line and one row per model; rates are pages/s mapped and unmapped since the last frame."""
    size, budget, mapped = stats.page_size, stats.budget_pages, stats.pages_mapped
    share = f"{100 * mapped / budget:.0f}%" if budget else "-"
    lines = [
        f"{stats.path}  page {format_bytes(size)}  budget {_pages(budget, size)}  mapped {_pages(mapped, size)} "
        f"{share}  in use {_pages(stats.pages_in_use, size)}  models {len(stats.entries)}",
    ]
    rows = [("MODEL", "PID", "MAPPED", "IN USE", "LIMIT", "PRIO/MIN", "MAP/s", "UNMAP/s", "ASKED")]
    for e in sorted(stats.entries, key=lambda e: (-e.pages_mapped, e.name)):
        up, down = (rates or {}).get((e.index, e.pid, e.name), (None, None))
        rows.append(
            (
                e.name,
                str(e.pid),
                _pages(e.pages_mapped, size),
                _pages(e.pages_in_use, size),
                _pages(e.limit_pages, size) if e.limit_pages else "none",
                f"{e.priority}/{e.min_pages}",
                "-" if up is None else f"{up:.1f}",
                "-" if down is None else f"{down:.1f}",
                str(e.release_asked),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    for row in rows:  # name and pid to the left, numbers to the right
        cells = [cell.ljust(w) if k < 2 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _rates(before: LedgerStats, after: LedgerStats, seconds: float) -> dict[tuple, tuple[float, float]]:
    old = {(e.index, e.pid, e.name): e for e in before.entries}
    rates = {}
    for e in after.entries:
        key = (e.index, e.pid, e.name)
        if key in old and seconds > 0:
            was = old[key]
            up, down = e.mapped_total - was.mapped_total, e.unmapped_total - was.unmapped_total
            rates[key] = up / seconds, down / seconds
    return rates


def top(device: str, path: str | None, interval: float, once: bool) -> int:
    """Show the ledger's models every ``interval`` seconds until Ctrl-C; ``once``: one table, with the rates
    measured over one interval."""
    with Ledger.open(device, path=path) as ledger:
        before, since, first = ledger.stats(), time.monotonic(), not once  # a first live frame has no rates
        try:
            while True:
                if once:
                    time.sleep(interval)
                stats, now = ledger.stats(), time.monotonic()
                table = _table(stats, None if first else _rates(before, stats, now - since))
                if once:
                    print(table)
                    return 0
                print("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + table, flush=True)
                before, since, first = stats, now, False
                time.sleep(interval)
        except KeyboardInterrupt:
            return 0


def limit(model: str, size: str, device: str, path: str | None) -> int:
    try:
        nbytes = parse_size(size)
    except ValueError as e:
        print(f"vkv limit: {e}", file=sys.stderr)
        return 1
    with Ledger.open(device, path=path) as ledger:
        e, size = ledger.set_limit(model, nbytes), ledger.page_size
        shown = f"{e.limit_pages} pages ({format_bytes(e.limit_pages * size)})" if e.limit_pages else "none"
        asked = f"; asked to give back {e.release_asked}" if e.release_asked else ""
        print(f"limit of {model!r} set to {shown}; it has {e.pages_mapped} pages mapped{asked}")
    return 0


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vkv", description="vkv: an elastic, virtualized KV cache for LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="backend, device, page size and pool statistics")
    p_info.add_argument("--backend", choices=(*BACKENDS, "auto"), default="auto", help="default: cuda if usable")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_top = commands.add_parser("top", help="every model sharing a GPU's budget, live: mapped, in use, limit, rates")
    p_limit = commands.add_parser("limit", help="change a running model's page limit")
    p_limit.add_argument("model", help="the model's name in the ledger (see vkv top)")
    p_limit.add_argument("size", help="8GiB, 512MiB, 1.5G (binary), 2GB (decimal), bytes, or none")
    for p in (p_top, p_limit):
        p.add_argument("--device", default="0", help="the ledger's device (default 0)")
        p.add_argument("--path", default=None, help="the ledger file (default /dev/shm/vkv-UID/ledger-DEVICE)")
    p_top.add_argument("--interval", type=_seconds, default=1.0, help="seconds between refreshes (default 1)")
    p_top.add_argument("--once", action="store_true", help="print one table (rates over one interval) and exit")
    args = parser.parse_args(argv)
    try:
        if args.command == "top":
            return top(args.device, args.path, args.interval, args.once)
        if args.command == "limit":
            return limit(args.model, args.size, args.device, args.path)
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
