# SPDX-License-Identifier: Apache-2.0
"""The vkv command line: ``vkv info``, ``vkv top`` (every model on a GPU, live) and ``vkv limit MODEL SIZE``.

Exit status: 0 done; 1 a vkv error at run time, printed as ``vkv: <message>``; 2 bad arguments, with the
command's usage. No input gives a traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import sys
import termios
import textwrap
import time
import tty
from importlib import metadata
from pathlib import Path

import torch

from vkv.allocator import BACKENDS, InvalidRequestError, PagePool, VirtualRange, VkvError, get_driver
from vkv.allocator.ledger import (
    Ledger,
    LedgerBusyError,
    LedgerError,
    LedgerStats,
    default_path,
    format_bytes,
    ledger_devices,
)
from vkv.allocator.ledger_file import DIRECTORY_ENV, ledger_directory


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


MAX_SIZE = (1 << 63) - 1  # the ledger counts in signed 64-bit integers


def _size(text: str) -> int | None:
    """parse_size for argparse: a bad or too large size is a usage error (exit 2)."""
    try:
        nbytes = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if nbytes is not None and nbytes > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is too large: expected at most {MAX_SIZE} bytes (8 EiB)")
    return nbytes


MAX_INTERVAL_S = 86400.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_INTERVAL_S:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_INTERVAL_S:.0f} seconds, got {text}")
    return value


WIDTH = 80  # every line of vkv top fits a terminal of 80 columns


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (\x1b, \n, ...): never sent raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _fit(text: str, width: int, *, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "~" + text[len(text) - width + 1 :] if keep_end else text[: width - 1] + "~"


def _wrapped(text: str) -> str:
    """``text`` with every line longer than WIDTH wrapped (messages; table lines fit already)."""
    lines = []
    for line in text.split("\n"):
        lines += textwrap.wrap(line, WIDTH, break_on_hyphens=False) if len(line) > WIDTH else [line]
    return "\n".join(lines)


def _short(nbytes: int) -> str:
    """Bytes in at most 5 characters: 0, 512B, 20M, 1.5G, 1023M, 140G."""
    if nbytes < 1024:
        return f"{nbytes}B" if nbytes else "0"
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if nbytes >= 1 << shift:
            value = nbytes / (1 << shift)
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    raise AssertionError("unreachable")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 1000 else f"{value:.1f}"


def _table(
    stats: LedgerStats, rates: dict[tuple, tuple[float, float]] | None, clock: str = "", device: str | None = None
) -> str:
    """Two header lines (the device and where, then the budget) and one row per model, every line at most WIDTH
    columns. Sizes are bytes (K/M/G/T binary); rates are pages/s mapped and unmapped since the last frame."""
    size, budget, mapped = stats.page_size, stats.budget_pages, stats.pages_mapped
    share = f"{100 * mapped / budget:.0f}%" if budget else "-"
    where = clock + ("" if device is None else f"device {_printable(device)}  ")
    where += f"page {format_bytes(size)}  models {len(stats.entries)}  "
    lines = [
        where + _fit(_printable(stats.path), WIDTH - len(where), keep_end=True),
        f"budget {_pages(budget, size)}  mapped {_pages(mapped, size)} {share}  "
        f"in use {_pages(stats.pages_in_use, size)}",
    ]
    rows = [("MODEL", "PID", "MAPPED", "USED", "LIMIT", "PRIO/MIN", "MAP/s", "UNMAP/s", "ASKED")]
    for e in sorted(stats.entries, key=lambda e: (-e.pages_mapped, e.name)):
        up, down = (rates or {}).get((e.index, e.pid, e.name), (None, None))
        rows.append(
            (
                _printable(e.name),
                str(e.pid),
                _short(e.pages_mapped * size),
                _short(e.pages_in_use * size),
                _short(e.limit_pages * size) if e.limit_pages else "none",
                f"{e.priority}/{_short(e.min_pages * size)}",
                _rate(up),
                _rate(down),
                _short(e.release_asked * size),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    gaps = [2, 2] + [1] * (len(widths) - 3)  # name and pid apart; the numbers one space apart, right-aligned
    widths[0] = max(len(rows[0][0]), min(widths[0], WIDTH - sum(widths[1:]) - sum(gaps)))
    for row in rows:
        cells = [_fit(row[0], widths[0]).ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:], strict=True)]
        lines.append("".join(cell + " " * gap for cell, gap in zip(cells, gaps, strict=False)) + cells[-1])
    return "\n".join(lines)


def _pages(n: int, page_size: int) -> str:
    return f"{n} ({format_bytes(n * page_size)})"


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


class _Keys:
    """Keys pressed on a terminal's stdin, read without blocking (cbreak mode, restored on exit)."""

    def __enter__(self) -> _Keys:
        self._fd, self._saved = None, None
        if sys.stdin is not None and sys.stdin.isatty():
            fd = sys.stdin.fileno()
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self._fd = fd
        return self

    @property
    def interactive(self) -> bool:
        return self._fd is not None

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def quit_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True as soon as q is pressed (or the terminal hangs up)."""
        if self._fd is None:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self._fd], [], [], left)[0]:
                key = os.read(self._fd, 1)
                if key in (b"q", b"Q", b""):
                    return True
        return False


class _Watched:
    """One ledger that top shows: opened once its file exists, its last table kept (and shown while it is busy)."""

    def __init__(self, device: str | None, path: str | None, directory: str | None, lock_wait: float):
        self.device, self.lock_wait = device, lock_wait
        self.where = {"path": path} if path is not None else {"directory": directory}
        self.file = path if path is not None else default_path(device, directory)
        self.ledger: Ledger | None = None
        self.before: LedgerStats | None = None
        self.since, self.table = 0.0, ""

    def open(self) -> Ledger:
        if self.ledger is None:
            self.ledger = Ledger.open(self.device, lock_timeout_s=self.lock_wait, **self.where)
        return self.ledger

    def frame(self, clock: str) -> str:
        try:
            if self.ledger is None and not os.path.exists(self.file):
                return f"{clock}waiting for a ledger at {_printable(self.file)}: no vkv process has created one yet"
            stats, now = self.open().stats(), time.monotonic()
            rates = None if self.before is None else _rates(self.before, stats, now - self.since)
            self.table, self.before, self.since = _table(stats, rates, clock, self.device), stats, now
            return self.table
        except LedgerBusyError as e:  # a member holds the lock (stopped?): say so, keep refreshing
            return (self.table + "\n" if self.table else clock) + f"ledger busy: {e}"

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()


def _watch_list(watched: dict[str, _Watched], device: str | None, path: str | None, directory: str | None,
                lock_wait: float) -> list[_Watched]:  # fmt: skip
    """The ledgers to show: ``path``'s, ``device``'s, or (neither given) every device's found in the directory,
    looked for again at each refresh (``watched`` keeps those seen, by file)."""
    if path is not None or device is not None:
        found = [(device, path)]
    else:
        found = [(d, None) for d in ledger_devices(directory)]
    for d, p in found:
        key = p if p is not None else default_path(d, directory)
        if key not in watched:
            watched[key] = _Watched(d, p, directory, lock_wait)
    return list(watched.values())


def top(device: str | None, path: str | None, directory: str | None, interval: float, once: bool) -> int:
    """Show the models of every device's ledger (or of ``device``'s, or of the file ``path``), a block per device,
    every ``interval`` seconds until q or Ctrl-C; ``once``: one frame, with the rates measured over one interval.
    Live, it waits for a ledger that does not exist yet and shows a lock that stays held (a stopped member)
    instead of hanging."""
    lock_wait, watched = min(interval, 1.0), {}
    try:
        if once:
            shown = _watch_list(watched, device, path, directory, lock_wait)
            if not shown:
                raise LedgerError(f"no ledger in {ledger_directory(directory)}: no vkv process has created one")
            befores = [(w.open().stats(), time.monotonic()) for w in shown]
            time.sleep(interval)
            tables = []
            for w, (before, since) in zip(shown, befores, strict=True):
                stats = w.open().stats()
                tables.append(_table(stats, _rates(before, stats, time.monotonic() - since), device=w.device))
            print("\n\n".join(tables))
            return 0
        with _Keys() as keys:
            while True:
                clock = time.strftime("%H:%M:%S  ")
                shown = _watch_list(watched, device, path, directory, lock_wait)
                frames = [w.frame(clock) for w in shown] or [
                    f"{clock}waiting for a ledger in {_printable(ledger_directory(directory))}: no vkv process has "
                    "created one yet"
                ]
                note = "q or Ctrl-C quits" if keys.interactive else "Ctrl-C quits"
                print("\x1b[H\x1b[2J" + _wrapped("\n\n".join(frames) + f"\n{note}"), flush=True)
                if keys.quit_within(interval):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for w in watched.values():
            w.close()


def limit(model: str, nbytes: int | None, device: str | None, path: str | None, directory: str | None) -> int:
    """Set ``model``'s limit in ``path``'s or ``device``'s ledger, or (neither given) in every device's ledger that
    has it (a tensor-parallel model has an entry on each of its devices): all or none."""
    if path is not None or device is not None:
        where = {"path": path} if path is not None else {"directory": directory}
        with Ledger.open(device, **where) as ledger:
            print(_limited(ledger, model, nbytes))
        return 0
    devices = ledger_devices(directory)
    if not devices:
        raise LedgerError(f"no ledger in {ledger_directory(directory)}: no vkv process has created one")
    ledgers = [Ledger.open(d, directory=directory) for d in devices]
    try:
        holding = [(d, b) for d, b in zip(devices, ledgers, strict=True) if any(e.name == model for e in b.entries())]
        if not holding:
            live = sorted({repr(e.name) for b in ledgers for e in b.entries()})
            raise LedgerError(
                f"no model named {model!r} in the ledgers of devices {', '.join(devices)} in "
                f"{ledger_directory(directory)}; live models: {', '.join(live) or 'none'}"
            )
        for _, ledger in holding:  # refuse before changing any: a limit under a minimum, a bad size
            e = next(e for e in ledger.entries() if e.name == model)
            pages = ledger._limit_pages(nbytes)
            if pages and pages < e.min_pages:
                raise InvalidRequestError(f"limit {pages} pages is below {model!r}'s minimum of {e.min_pages} pages")
        for d, ledger in holding:
            print(f"device {d}: {_limited(ledger, model, nbytes)}")
    finally:
        for ledger in ledgers:
            ledger.close()
    return 0


def _limited(ledger: Ledger, model: str, nbytes: int | None) -> str:
    e, size = ledger.set_limit(model, nbytes), ledger.page_size
    shown = f"{e.limit_pages} pages ({format_bytes(e.limit_pages * size)})" if e.limit_pages else "none"
    asked = f"; asked to give back {e.release_asked}" if e.release_asked else ""
    return f"limit of {model!r} set to {shown}; it has {e.pages_mapped} pages mapped{asked}"


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`vkv serve`: build the engines (one pool), serve until interrupted, close them. With --tensor-parallel N,
    ranks 1..N-1 are spawned first and follow this process's (rank 0's) engines."""
    if not torch.cuda.is_available() or (args.device or "").startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter: before they load
    try:
        from vkv.server import serve as run_server
        from vkv.server.launch import build_engines, start_tensor_parallel, stop_tensor_parallel
    except ImportError as e:
        print(f'vkv serve needs the serving extras: pip install "vkv[serve]" ({e})', file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype) if args.dtype else None
    build_args = {
        "budget_bytes": args.budget, "dtype": dtype, "page_size": args.page_size, "partition": args.partition,
        "ledger": args.ledger, "max_num_seqs": args.max_num_seqs, "max_seq_len": args.max_seq_len,
        "max_num_batched_tokens": args.max_num_batched_tokens, "idle_release_s": args.idle_release,
    }  # fmt: skip
    engines, followers = [], []
    try:
        tp, followers, device = start_tensor_parallel(args.tensor_parallel, args.models, build_args, args.device)
        engines = build_engines(args.models, device=device, tensor_parallel=tp, **build_args)
        for engine in engines:  # kernels compiled and decode graphs captured now, not in the first requests
            print(f"vkv serve: {engine.name} warmed up in {engine.warm_up():.1f} s", flush=True)
        pools = list(dict.fromkeys(e.pool for e in engines))
        names = ", ".join(e.name for e in engines)
        budget = " + ".join(format_bytes(p.stats().budget_bytes) for p in pools)
        ranks = f", {args.tensor_parallel} tensor-parallel ranks" if args.tensor_parallel > 1 else ""
        print(f"vkv serve: {names} on http://{args.host}:{args.port}/v1 (KV budget {budget}{ranks})", flush=True)
        run_server(engines, args.host, args.port)
    except InvalidRequestError as e:
        parser.error(str(e))
    except (VkvError, OSError) as e:
        print(f"vkv: {e}", file=sys.stderr)
        return 1
    finally:
        for engine in engines:
            engine.close()
        for pool in dict.fromkeys(e.pool for e in engines):
            pool.close()
        stop_tensor_parallel(followers)
    return 0


def demo(args: argparse.Namespace) -> int:
    """`vkv demo`: the multi-model scenario at a size that fits the machine (vkv.demo); prints a table."""
    try:
        from vkv import demo as scenario
    except ImportError as e:
        print(f'vkv demo needs the demo extras: pip install "vkv[demo]" ({e})', file=sys.stderr)
        return 1
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    sc = scenario.gpu_scenario() if gpu else scenario.Scenario(device="cpu")
    sc.mode = args.mode
    where = "GPU: 3 Llama-3-8B-shaped random models" if gpu else "CPU: 3 tiny random models (Triton's interpreter)"
    print(f"vkv demo on the {where}, {args.mode}; KV budget {format_bytes(sc.kv_budget_bytes)} for all", flush=True)
    try:
        payload = scenario.run(sc, Path(args.out))
    except (VkvError, OSError, RuntimeError) as e:
        print(f"vkv: {e}", file=sys.stderr)
        return 1
    print(scenario.table(payload))
    print(f"wrote {args.out} and {payload['png']}")
    lost = sum(run["lost"] for run in payload["runs"])
    over = [run["policy"] for run in payload["runs"] if not run["within_budget"]]
    if lost or over:
        print(f"vkv demo: {lost} requests lost; over budget: {over or 'none'}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a vkv error at run time ("vkv: <message>"), 2 bad arguments (usage and message)."""
    parser = argparse.ArgumentParser(prog="vkv", description="vkv: an elastic, virtualized KV cache for LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="backend, device, page size and pool statistics")
    p_info.add_argument("--backend", choices=(*BACKENDS, "auto"), default="auto", help="default: cuda if usable")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_top = commands.add_parser("top", help="every model sharing a GPU's budget, live: mapped, in use, limit, rates")
    p_limit = commands.add_parser("limit", help="change a running model's page limit")
    p_limit.add_argument("model", help="the model's name in the ledger (see vkv top)")
    p_limit.add_argument("size", type=_size, help="8GiB, 512MiB, 1.5G (binary), 2GB (decimal), bytes, or none")
    for p in (p_top, p_limit):
        p.add_argument("--device", default=None, help="the ledger's device (default every device's ledger found)")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--path", default=None, help="the ledger file (default LEDGER_DIR/ledger-DEVICE)")
        where.add_argument(
            "--ledger-dir",
            default=None,
            help=f"the ledger's directory (default ${DIRECTORY_ENV}, else /dev/shm/vkv-UID)",
        )
    p_top.add_argument(
        "--interval", type=_seconds, default=1.0, help=f"seconds between refreshes, at most {MAX_INTERVAL_S:.0f} (1)"
    )
    p_top.add_argument("--once", action="store_true", help="print one table (rates over one interval) and exit")
    p_serve = commands.add_parser("serve", help="an OpenAI-compatible server over one or several models")
    p_serve.add_argument(
        "models", nargs="+", metavar="[NAME=]SOURCE",
        help="a model directory (config.json, *.safetensors, tokenizer), random:PRESET (tiny-llama, tiny-qwen3, "
        "llama-3-8b, qwen3-8b: random weights) or random:DIR (a directory's config, random weights)",
    )  # fmt: skip
    p_serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p_serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p_serve.add_argument("--budget", type=_size, default=None, help="KV budget of all models (default 90%% of free)")
    p_serve.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once, a model (32)")
    p_serve.add_argument("--max-seq-len", type=int, default=None, help="tokens a request, prompt + output")
    p_serve.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens a step (2048)")
    p_serve.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default cuda if there is one)")
    p_serve.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p_serve.add_argument(
        "--tensor-parallel", type=int, default=1, metavar="N",
        help="shard each model's heads over N ranks: cuda:0..N-1, or N CPU processes (default 1)",
    )  # fmt: skip
    p_serve.add_argument("--page-size", type=_size, default=None, help="KV page size (default the device's, 2 MiB)")
    share = p_serve.add_mutually_exclusive_group()
    share.add_argument("--partition", action="store_true", help="a static equal split of the budget: no borrowing")
    share.add_argument(
        "--ledger", default=None, help="a ledger file shared with other vkv processes (created with --budget if new)"
    )
    p_serve.add_argument(
        "--idle-release", type=float, default=2.0, help="seconds idle before a model gives its kept pages back (2)"
    )
    p_demo = commands.add_parser("demo", help="several models under bursty load: static KV split against elastic")
    p_demo.add_argument(
        "--mode", choices=("one-process", "processes"), default="one-process",
        help="the models in one server process on one pool, or one process each on a ledger",
    )  # fmt: skip
    p_demo.add_argument("--out", default="vkv-demo.json", help="the JSON (a PNG is written beside it)")
    p_demo.add_argument("--device", default=None, help="cuda or cpu (default cuda if there is one)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args, p_serve)
    if args.command == "demo":
        return demo(args)
    try:
        if args.command == "top":
            return top(args.device, args.path, args.ledger_dir, args.interval, args.once)
        if args.command == "limit":
            return limit(args.model, args.size, args.device, args.path, args.ledger_dir)
        report = info(args.backend)
    except InvalidRequestError as e:  # an argument the checks behind the parser refused: a usage error
        {"top": p_top, "limit": p_limit, "info": p_info}[args.command].error(str(e))
    except (VkvError, OSError) as e:
        print(f"vkv: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0 if report["probe_pages_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
