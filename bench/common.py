# SPDX-License-Identifier: Apache-2.0
"""Shared by the bench scripts: the environment record, tables, timers, result files under bench/results/, what
the attention benchmarks (decode.py, prefill.py) have in common, and the engine's step trace (serve.py)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vkv.allocator.nvml import DeviceMemory
from vkv.environment import environment as environment

RESULTS = Path(__file__).resolve().parent / "results"


def progress() -> Callable[[str], None]:
    """log(msg): prints msg after the seconds since this call."""
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    return log


def time_each(call: Callable[[int], object], n: int) -> list[float]:
    """Seconds of ``call(i)`` for i in range(n), each timed on its own (host-side calls)."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - t0)
    return out


def summary_us(samples: list[float]) -> dict:
    return {
        "median_us": statistics.median(samples) * 1e6,
        "mean_us": statistics.fmean(samples) * 1e6,
        "n": len(samples),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(name: str, payload: dict, folder: Path = RESULTS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def require_cuda(script: str) -> None:
    """Exit with status 2 and a one-line message (no traceback) when there is no CUDA GPU."""
    if not torch.cuda.is_available():
        print(
            f"{script} needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}); "
            "run it on the GPU machine",
            file=sys.stderr,
        )
        raise SystemExit(2)


def gpu_timer(warmup_ms: int = 150, rep_ms: int = 100, graph: bool = False) -> Callable[[Callable[[], object]], float]:
    """timer(fn) -> median microseconds of fn().

    graph=False: triton.testing.do_bench (L2 flushed before each call); host launch overhead shows up
    whenever it exceeds the GPU time. graph=True: fn is captured in a CUDA graph and its replays are
    timed (triton.testing.do_bench_cudagraph), which measures the GPU work alone, as a serving engine
    running decode under CUDA graphs sees it; if capture fails, it falls back to do_bench.
    ``timer.last_mode`` says which timer produced the last number.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    def timer(fn: Callable[[], object]) -> float:
        if graph:
            try:
                do_bench(fn, warmup=warmup_ms, rep=1)  # warm clocks and caches, compile outside capture
                us = do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3
                timer.last_mode = "cuda-graph"
                return us
            except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
                torch.cuda.synchronize()
        timer.last_mode = "eager"
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3

    timer.last_mode = None
    return timer


def copy_tbps(timer: Callable[[Callable[[], object]], float], gib: int = 2) -> float:
    """Device-to-device copy bandwidth of a ``gib`` GiB tensor, TB/s of bytes read + written."""
    src, dst = (torch.ones(gib << 30, dtype=torch.uint8, device="cuda") for _ in range(2))
    us = timer(lambda: dst.copy_(src))
    src = dst = None  # noqa: F841 - drop the buffers before emptying the allocator's cache
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / us / 1e6


def error_text(exc: BaseException, limit: int = 300) -> str:
    """One line naming an exception: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:limit]


def na(reason: str, width: int = 48) -> str:
    """A table cell for something not measured: "n/a: <reason>", cut to ``width`` characters."""
    text = f"n/a: {reason}"
    return text if len(text) <= width else text[: width - 3] + "..."


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a sticky error of a failed baseline, recorded where it happened
            torch.cuda.synchronize()
        torch.cuda.empty_cache()


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    causal: bool,
    seqused_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch's bundled FlashAttention-2, varlen path (``aten::_flash_attention_forward``).

    q [total_q, Hq, D], k/v [total_k, Hkv, D]; cu_seqlens int32 [B + 1]; seqused_k int32 [B] (only this many
    keys of each request are read). Causal masks are bottom-right aligned (FlashAttention >= 2.1). Schema
    (torch 2.5 - 2.13): (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
    return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None, seqused_k=None,
    alibi_slopes=None, ...) -> (output, softmax_logsumexp, rng_state, unused, debug_attn_mask).
    """
    outputs = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, 0.0, causal, False, seqused_k=seqused_k
    )
    return outputs[0]


def plot_bars(
    path: Path,
    title: str,
    ylabel: str,
    groups: list[str],
    series: dict[str, list[float | None]],
    hline: tuple[float, str] | None = None,
) -> str:
    """Grouped bars (one group per shape, one bar per series) saved as a PNG; returns what it did."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"skipped the plot {path.name}: matplotlib is not available ({exc})"
    path.parent.mkdir(parents=True, exist_ok=True)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(groups) * max(len(series), 1) * 0.4 + 3), 4.8))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
    if hline is not None:
        ax.axhline(hline[0], color="black", linestyle="--", linewidth=1, label=hline[1])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


class StepClock:
    """Times a loop's launched steps with CUDA events: each step's kernels (its begin to its end) and, with
    ``overlap``, its pace (the previous step's end to its own, over steps marked clean after a timed one).

    ``make_event`` makes a timing event (None: no events, as on the host). The events form a ring of
    ``RING`` (begin, end) pairs: a step's pair is read in :meth:`finished`, which the loop calls once the
    step has finished and before the step ``RING`` later records over the same pair (checked)."""

    RING = 4

    def __init__(self, make_event: Callable[[], object] | None, overlap: bool):
        self.ring = [(make_event(), make_event()) for _ in range(self.RING)] if make_event else None
        self.overlap = overlap
        self.steps: list[dict] = []  # per launched step: timed, clean, read
        self.kernels: list[float] = []  # seconds, per timed step in launch order
        self.intervals: list[float] = []  # seconds, per clean timed step after a timed one (overlap)

    def begin(self) -> int:
        """Record the next step's begin; returns its number k."""
        k = len(self.steps)
        if k >= self.RING and not self.steps[k - self.RING]["read"]:
            raise RuntimeError(f"step {k} would record over the events of step {k - self.RING}, not read yet")
        if self.ring:
            self.ring[k % self.RING][0].record()
        return k

    def end(self, k: int, timed: bool, clean: bool) -> None:
        """Record step k's end, once its kernels are launched. ``clean``: nothing else ran on the device since
        the previous step's end, so the interval between the two ends is this step's pace."""
        if self.ring:
            self.ring[k % self.RING][1].record()
        self.steps.append({"timed": timed, "clean": clean, "read": False})

    def wait(self, k: int, synchronize: Callable[[], None]) -> None:
        """Block until step k has finished (its end event; the whole device where there are no events)."""
        if self.ring:
            self.ring[k % self.RING][1].synchronize()
        else:
            synchronize()

    def finished(self, k: int) -> None:
        """Step k has finished on the device: read its events."""
        rec = self.steps[k]
        rec["read"] = True
        if not rec["timed"] or not self.ring:
            return
        begin, end = self.ring[k % self.RING]
        self.kernels.append(begin.elapsed_time(end) / 1e3)
        prev = self.steps[k - 1] if k else None
        if self.overlap and rec["clean"] and prev is not None and prev["timed"]:
            self.intervals.append(self.ring[(k - 1) % self.RING][1].elapsed_time(end) / 1e3)


# -- the attention benchmarks (decode.py, prefill.py): one measurement dict per method ----------------------

TOLERANCE = 2e-2  # max |out - ref| / max |ref| on the checked rows (bf16 output)
LAYOUTS = ("token", "grouped", "layer")  # the layout rows


@dataclass
class KernelBench:
    """What every measurement of an attention benchmark shares: device, page pool, timer, options."""

    device: torch.device
    pool: object  # vkv.PagePool
    timer: Callable[[Callable[[], object]], float]
    num_layers: int = 8
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Rate:
    """The rate an attention benchmark reports (``key`` of each measurement dict, e.g. "tbps" in TB/s)."""

    key: str
    unit: str
    digits: int

    def ratio(self, a: dict, b: dict) -> float | None:
        """a's rate over b's, only when both were measured and both passed the correctness check."""
        return a[self.key] / b[self.key] if a.get("ok") and b.get("ok") else None

    def fmt(self, m: dict) -> str:
        """One progress line's worth of a measurement."""
        if "error" in m:
            return na(m["error"])
        flag = "" if m.get("ok") else f" WRONG (rel err {m.get('rel_err', float('nan')):.3g})"
        return f"{m[self.key]:.{self.digits}f} {self.unit}, {m['us']:.1f} us{flag}"

    def cell(self, m: dict | None) -> str | float:
        """A table cell: the rate, 'WRONG' beside it when the check failed, or the error."""
        if m is None:
            return ""
        if "error" in m:
            return na(m["error"], 28)
        return m[self.key] if m.get("ok") else f"{m[self.key]:.{self.digits}f} WRONG"


def kernel_parser(doc: str, budget_gib: int) -> argparse.ArgumentParser:
    """The options decode.py and prefill.py share."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="layers of the cache (32 is Llama-3-8B; default 8)")
    parser.add_argument("--warmup", type=int, default=150, help="do_bench warm-up, ms (long enough for clocks to ramp)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-layout", action="store_true", help="skip the token-major / grouped / layer-major rows")
    parser.add_argument("--budget-gib", type=int, default=budget_gib, help="page pool budget for the caches, GiB")
    return parser


def select(parser: argparse.ArgumentParser, names: str | None, quick: bool, known: dict, quick_names, what: str,
           parse: Callable[[str], object | None] = lambda name: None) -> list:  # fmt: skip
    """The entries of ``known`` that ``names`` lists (comma-separated; ``parse`` makes one from a name it knows, e.g.
    BATCHxLENGTH), else the quick ones with --quick, else all; an unknown name exits with a usage error."""
    chosen = list(quick_names) if quick and not names else (names.split(",") if names else list(known))
    known = dict(known) | {n: entry for n in chosen if n not in known and (entry := parse(n)) is not None}
    if unknown := [n for n in chosen if n not in known]:
        parser.error(f"unknown {what} {unknown}; expected names from {list(known)}")
    return [known[n] for n in chosen]


def checked(out: torch.Tensor, got: torch.Tensor, ref: torch.Tensor) -> dict:
    """A method's output ``out`` (all finite?) and its checked rows ``got`` against the float32 reference ``ref``:
    the errors, and ok when finite and within TOLERANCE."""
    finite = bool(torch.isfinite(out).all())
    diff = (got.float() - ref).abs().max().item()
    rel = diff / max(ref.abs().max().item(), 1e-30)
    return {"max_abs_err": diff, "rel_err": rel, "finite": finite, "ok": finite and rel <= TOLERANCE}


def attempt(what: Callable[[], dict]) -> dict:
    """what() or {"error": ...}: a failing method never stops the run."""
    try:
        return what()
    except Exception as exc:  # noqa: BLE001 - anything a baseline raises is recorded, not fatal
        return {"error": error_text(exc)}
    finally:
        free_device_memory()


def layout_options(layout: str, num_layers: int) -> dict:
    """CacheConfig arguments of a layout row: grouped in 4 planes where num_layers allows (else a layer a plane)."""
    if layout != "grouped":
        return {"layout": layout}
    return {"layout": layout, "group_layers": num_layers // 4 if num_layers % 4 == 0 else 1}


@dataclass
class CachedBatch:
    """A batch's K/V in a KVCache: request b reads slot slots[b], tokens [0, lengths[b]) of layer 0's views."""

    cache: object  # vkv.KVCache
    slots: list[int]
    lengths: list[int]
    k: torch.Tensor  # layer 0's views [max_slots, max_seq_len, Hkv, D]
    v: torch.Tensor
    slot_ids: torch.Tensor  # int32 [B]
    seq_lens: torch.Tensor  # int32 [B]

    def kv_of(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request b's K and V, [n, Hkv, D] views of the cache."""
        n = self.lengths[b]
        return self.k[self.slots[b], :n], self.v[self.slots[b], :n]

    def dense(self) -> list[torch.Tensor]:
        """K and V as dense [B, Hkv, L, D] copies (equal lengths only), as torch SDPA takes them."""
        return [torch.stack([self.kv_of(b)[i] for b in range(len(self.slots))]).transpose(1, 2).contiguous()
                for i in (0, 1)]  # fmt: skip

    def close(self) -> None:
        self.cache.close()


def filled_cache(bench: KernelBench, shape, lengths: list[int], layout: str, gen: torch.Generator) -> CachedBatch:
    """A KVCache with one slot a request (slots permuted by the seed), each grown to its length and its layer 0
    K/V filled with fresh random values from ``gen``. ``shape``: num_kv_heads, head_dim."""
    from vkv import CacheConfig, KVCache

    cfg = CacheConfig(num_layers=bench.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                      dtype=bench.dtype, max_slots=len(lengths), max_seq_len=max(lengths),
                      **layout_options(layout, bench.num_layers))  # fmt: skip
    cache = KVCache(cfg, bench.pool)
    try:
        for _ in lengths:
            cache.allocate()
        slots = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(bench.seed)).tolist()
        k, v = cache.key_view(0), cache.value_view(0)
        for slot, n in zip(slots, lengths, strict=True):
            cache.grow(slot, n)  # maps the pages of tokens [0, n): the only bytes any kernel may read
            for view in (k, v):
                view[slot, :n].copy_(torch.randn(n, shape.num_kv_heads, shape.head_dim, generator=gen,
                                                 device=bench.device, dtype=torch.float32))  # fmt: skip
        index = dict(dtype=torch.int32, device=bench.device)
        return CachedBatch(cache, slots, lengths, k, v, torch.tensor(slots, **index), torch.tensor(lengths, **index))
    except BaseException:
        cache.close()
        raise


def run_methods(row: dict, problem, runners: dict[str, Callable[[], dict]], rate: Rate, log, baselines) -> dict:
    """Each runner in turn into row["methods"] (a failure is its error, the run goes on), logged; then the problem's
    cache is closed (a failure to close, after a sticky CUDA error of some method, is row["close_error"]), and
    row["ratios"] gets vkv's rate over each baseline's."""
    methods = row["methods"] = {}
    try:
        for method, runner in runners.items():
            methods[method] = attempt(runner)
            log(f"{row.get('shape') or row['case']}: {method} {rate.fmt(methods[method])}")
    finally:
        try:
            problem.close()
        except Exception as exc:  # noqa: BLE001
            row["close_error"] = error_text(exc)
        free_device_memory()
    row["ratios"] = {name: rate.ratio(methods["vkv"], methods[name]) for name in baselines}
    return row


def layout_row(name: str, num_layers: int, make: Callable[[str], object], run: Callable[[object], dict], rate: Rate,
               log) -> dict:  # fmt: skip
    """vkv over token-major, grouped (4 planes where num_layers allows) and layer-major caches: run(make(layout))."""

    def measure(layout: str) -> dict:
        problem = make(layout)
        try:
            return run(problem)
        finally:
            problem.close()

    row: dict = {"group_layers": layout_options("grouped", num_layers)["group_layers"]}
    for layout in LAYOUTS:
        row[layout] = attempt(lambda layout=layout: measure(layout))
        label = layout if layout == "grouped" else f"{layout}-major"
        log(f"layout {name} {label}: {rate.fmt(row[layout])}")
    row["token_vs_layer"] = rate.ratio(row["token"], row["layer"])
    row["grouped_vs_token"] = rate.ratio(row["grouped"], row["token"])
    return row


def build(row: dict, make: Callable[[], object], log) -> object | None:
    """make() (a problem in a cache), or None with row["error"] set when it could not be built."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001
        row["error"] = error_text(exc)
        log(f"{row.get('shape') or row['case']}: could not build the cache: {row['error']}")
        free_device_memory()
        return None


def print_layouts(rows: list[dict], label: str, rate: Rate) -> None:
    """The layout rows as a table: vkv's rate over each layout, and the ratios between them."""
    if not rows:
        return
    print("\nlayout: vkv over token-major, grouped and layer-major caches")
    unit = rate.unit
    cols = [label, f"token {unit}", f"grouped ({rows[0]['group_layers']} layers) {unit}", f"layer {unit}"]
    cells = [[r[label], rate.cell(r["token"]), rate.cell(r["grouped"]), rate.cell(r["layer"])] for r in rows]
    table = [dict(zip(cols, c, strict=True)) | {"token/layer": r["token_vs_layer"] or "",
                                                 "grouped/token": r["grouped_vs_token"] or ""}
             for c, r in zip(cells, rows, strict=True)]  # fmt: skip
    print_table(table, [*cols, "token/layer", "grouped/token"])


def print_methods(rows: list[dict], label: str, rate: Rate, columns: dict[str, Callable[[dict], object]],
                  baselines: tuple[str, ...]) -> None:  # fmt: skip
    """The main table: a row per shape or case, ``columns`` (name: cell of a row), then each baseline's rate and
    vkv's ratio to it (only outputs that passed the check)."""
    out = []
    for r in rows:
        if "methods" not in r:
            out.append({label: r[label], "vkv": na(r.get("error", "?"), 40)})
            continue
        row = {label: r[label], "vkv": rate.cell(r["methods"]["vkv"])}
        row |= {name: cell(r) for name, cell in columns.items()}
        row |= {name: rate.cell(r["methods"][name]) for name in baselines}
        row |= {f"x {b}": r["ratios"][b] if r["ratios"][b] is not None else "" for b in baselines}
        out.append(row)
    measured = [r for r in rows if "methods" in r]
    ok = sum(bool(r["methods"]["vkv"].get("ok")) for r in measured)
    ranges = ", ".join(f"{b} {lo:.2f}-{hi:.2f}" for b, (lo, hi) in ratio_summary(rows, baselines).items())
    print(f"\nvkv matched the float32 reference in {ok} of {len(rows)} rows; vkv / baseline: {ranges or 'none'}")
    print(f"\nvkv and baselines, {rate.unit} (x = vkv / baseline; only outputs that passed the check)")
    print_table(out, [label, "vkv", *columns, *baselines, *(f"x {b}" for b in baselines)])


def ratio_summary(rows: list[dict], baselines: tuple[str, ...]) -> dict[str, list[float]]:
    """Per baseline, the lowest and highest vkv / baseline ratio over the rows that have one."""
    out = {}
    for b in baselines:
        got = [r["ratios"][b] for r in rows if r.get("ratios", {}).get(b) is not None]
        if got:
            out[b] = [min(got), max(got)]
    return out


def collect_and_report(collect: Callable[[], dict], pool, log, report: Callable[[dict], None], start: float) -> None:
    """Run ``collect()``, always close the page pool (a failure to close is logged, the results still
    written), then stamp the wall time on the payload and ``report`` it."""
    try:
        payload = collect()
    finally:
        try:
            pool.close()
        except Exception as exc:  # noqa: BLE001 - the results are still written
            log(f"closing the page pool failed: {error_text(exc)}")
    payload["wall_s"] = time.perf_counter() - start
    report(payload)


# -- bench/stress.py and its members: the memory that the members of a run hold ----------------------------------

SETTLE_S = 1.0  # a dead member's memory may stay a little after the process: samples wait that long
NVML, DEVICE_WIDE = "nvml per process", "device-wide (cuMemGetInfo less an average context)"


def kv_bytes(used: dict[int, int], live: dict, dead: dict, now: float) -> int | None:
    """The supervisor's (bench/stress.py) bytes of pages alive from NVML's {pid: bytes}: each member's less its own
    context. ``live``: pid -> member (``ready()``, ``context``); ``dead``: pid -> (when it went, member). None while
    it cannot be told: a ready member without a figure; a member gone less than SETTLE_S ago still listed."""
    if any(m.ready() and pid not in used for pid, m in live.items()):
        return None
    total = 0
    for pid, nbytes in used.items():
        if pid in live and live[pid].ready():  # one not ready maps no page before it says so (after ``used`` was read)
            if live[pid].context is None:
                return None
            total += nbytes - live[pid].context
        elif pid in dead and pid not in live:  # after SETTLE_S, what it holds beyond its context is alive
            if now - dead[pid][0] < SETTLE_S:
                return None
            total += max(0, nbytes - (nbytes if dead[pid][1].context is None else dead[pid][1].context))
    return total


HISTORY = 40  # samples (~0.4 s) of a member's pages and excess kept for the over-budget breakdown


def excess_by_member(watcher: AliveMemory, stats, now: float) -> list[dict]:
    """bench/stress.py, every sample with a ledger half: the 3 members (live or dead) whose NVML bytes in the
    watcher's last read most exceed their context + the pages their ledger entries count, with what was done to
    them last (SIGCONT or start; death); the first carries its last HISTORY samples (seconds before now, pages,
    excess MiB): did its excess come with a release, or was it there all along?"""
    used, dead, page_size = watcher.last_used, watcher.dead, watcher.page_size
    members = list({m.proc.pid: m for m in [*(m for _, m in dead.values()), *watcher.members]}.values())
    pages: Counter = Counter()
    for e in stats.entries if stats is not None else ():
        pages[e.pid] += e.pages_mapped
    rows = [{"pid": m.proc.pid, "excess_mib": (used[m.proc.pid] - m.context - pages[m.proc.pid] * page_size) / 2**20,
             "pages": pages[m.proc.pid], "stopped": m.stopped_at is not None, "since_resumed_s": now - m.resumed,
             "dead_s": now - dead[m.proc.pid][0] if m.proc.pid in dead else None}
            for m in members if m.context is not None and m.proc.pid in (used or {})]  # fmt: skip
    for r in rows:
        watcher.history.setdefault(r["pid"], deque(maxlen=HISTORY)).append((now, r["pages"], r["excess_mib"]))
    rows = sorted(rows, key=lambda r: -r["excess_mib"])[:3]
    if rows:
        rows[0]["history"] = [(round(t - now, 3), p, e) for t, p, e in watcher.history[rows[0]["pid"]]]
    return rows


def late_frees(events: list[dict]) -> dict:
    """bench/stress.py's report of the members' "late_free" events (bench/stress_worker.py's check_freed, cuda):
    releases (by a trim or by the pool's ledger thread: by origin) after which NVML still counted the pages; how many
    were never seen freed; the largest excess and the longest wait. A diagnostic, not a target."""
    return {"late_frees": len(events), "late_frees_not_freed": sum(not e["freed"] for e in events),
            "late_frees_by_origin": dict(Counter(e.get("origin", "trim") for e in events)),
            "late_free_mib_max": max((e["excess_mib"] for e in events), default=None),
            "late_free_s_max": max((e["lasted_s"] for e in events), default=None)}  # fmt: skip


def last_unclaims(samples: list[dict], unclaims: dict[int, list[dict]]) -> dict:
    """bench/stress.py: each kept over-budget sample's members with an excess get the last "unclaim" of theirs
    before it (``last_unclaim``: how long before, how long the call took, pages, caller, thread), so an episode names
    the path that counted the pages out while NVML still showed them. Returns the episodes (a member's first sample
    in a run of samples over budget) by that path ("caller on thread"; "none" where no unclaim came before)."""
    paths: Counter = Counter()
    last_sample: dict[int, float] = {}
    for sample in samples:
        for row in (r for r in sample["members"] if r["excess_mib"] > 0):
            pid, t = row["pid"], sample["t"]
            before = [e for e in unclaims.get(pid, ()) if e["t"] <= t]
            e = before[-1] if before else None
            row["last_unclaim"] = e and {"before_s": round(t - e["t"], 4), "took_s": round(e["t"] - e["t0"], 4),
                                         "pages": e["pages"], "caller": e["caller"], "thread": e["thread"]}  # fmt: skip
            if t - last_sample.get(pid, -1e9) > 0.1:  # a new episode of this member
                paths[f"{e['caller']} on {e['thread']}" if e else "none"] += 1
            last_sample[pid] = t
    return dict(paths)


class AliveMemory:
    """The bytes of pages the members of a stress run hold, as the OS or the driver sees them (``alive()``): host, the
    blocks of each member's page memfd; cuda, each member's bytes in NVML less its own context, or where NVML has no
    figure per process (``why``), the device's used bytes less this process's and an average context a member."""

    def __init__(self, backend: str, members: list):
        self.backend, self.members = backend, members  # the supervisor's list: the current incarnation of each index
        self.lock, self._fds = threading.Lock(), {}
        self.baseline = self.used_cuda() if backend == "cuda" else 0  # this process's context included
        self.context_bytes = 0  # cuda, device-wide: one member's context
        self.settled_at = 0.0  # cuda, device-wide: a second after the last SIGKILL
        self.nvml, self.why = DeviceMemory() if backend == "cuda" else None, None  # why: not NVML per process
        self.method = "memfd blocks per member" if backend == "host" else None
        self.dead: dict[int, tuple[float, object]] = {}  # cuda: pid -> (when it was seen gone, its member)
        self.last_used: dict[int, int] | None = None  # cuda, NVML: the {pid: bytes} the last alive() read
        self.history: dict[int, deque] = {}  # pid -> its last HISTORY (time, pages, excess MiB): excess_by_member

    def memfd_bytes(self, pid: int) -> int:
        """Bytes the OS holds for the member's page memfd (released pages are holes: they hold none)."""
        try:
            if pid not in self._fds:
                links = (f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd"))
                self._fds[pid] = next(link for link in links if "memfd:vkv-pages" in os.readlink(link))
            return os.stat(self._fds[pid]).st_blocks * 512
        except (OSError, StopIteration):  # gone meanwhile, or no pool yet
            self._fds.pop(pid, None)
            return 0

    def choose(self, members: list) -> None:
        """cuda, once every member is ready: NVML per process if it has a figure for each, else device-wide."""
        used = self.nvml.used()
        if used is not None and all(m.context is not None and m.proc.pid in used for m in members):
            self.method = NVML
            return self.nvml.focus({m.proc.pid for m in members})
        self.why = self.nvml.why or f"NVML {'failed' if used is None else 'gave no figure for a member (pid ns?)'}"
        self.method, self.context_bytes = DEVICE_WIDE, max(0, self.used_cuda() - self.baseline) // len(members)

    def bury(self, m) -> None:
        """``m`` is gone (killed, exited): its memory may stay a little (cuda)."""
        with self.lock:
            self.dead[m.proc.pid] = (time.monotonic(), m)

    def alive(self) -> int | None:
        """Bytes of pages alive; None on cuda while a member starts or dies (its context is only partly there)."""
        if self.method == NVML:
            used = self.nvml.used()  # first: a member that is not ready below had mapped no page by now
            self.last_used = used  # the over-budget breakdown (bench/stress.py) reads the same answer
            live = {m.proc.pid: m for m in list(self.members) if m.proc.returncode is None}
            with self.lock:
                dead = dict(self.dead)
            return None if used is None else kv_bytes(used, live, dead, time.monotonic())
        live = [m for m in list(self.members) if m.proc.returncode is None]
        if self.backend == "host":
            return sum(self.memfd_bytes(m.proc.pid) for m in live)
        if time.monotonic() < self.settled_at or not all(m.ready() for m in live):
            return None
        return max(0, self.used_cuda() - self.baseline - self.context_bytes * len(live))

    @staticmethod
    def used_cuda() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free


def print_stress_report(r: dict, reap_target_s: float) -> None:
    """bench/stress.py's table: each figure beside what it should be."""

    def mib(nbytes: int | None) -> str:
        return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"

    lines = [(f"ops {k}", v, "") for k, v in sorted(r["operations"].items())]
    lines += [(f"refused {k}", v, "(normal)") for k, v in sorted(r["refused"].items())]
    lines += [
        ("checksum failures, unexpected errors", f"{r['checksum_failures']}, {r['unexpected_errors']}", "0, 0"),
        ("samples (ledger busy), over budget", f"{r['samples']} ({r['samples_ledger_busy']}), "
         f"{r['samples_over_budget']}", "0 over"),
        ("max alive / counted / budget MiB",
         f"{r['max_alive_bytes'] >> 20} / {r['max_counted_bytes'] >> 20} / {r['budget_bytes'] >> 20}", ""),
        ("bytes lost (quiesced, end)", f"{r['lost_bytes_quiesced']}, {r['lost_bytes_end']}", "0, 0"),
        ("alive by; alive - counted MiB min / max", f"{r['alive_method']}; {mib(r['alive_minus_counted_bytes_min'])}"
         f" / {mib(r['alive_minus_counted_bytes_max'])}", r["alive_method_why"] or "(read under the ledger's lock)"),
        ("member contexts MiB min / max (n)", f"{mib(r['context_bytes_min'])} / {mib(r['context_bytes_max'])} "
         f"({r['contexts_measured']})", "cuda: each its own"),
        ("kills; reap s max (median)", f"{r['kills']}; {r['reap_s_max'] or 0:.3f} ({r['reap_s_median'] or 0:.3f})",
         f"< {reap_target_s}"),
        ("stops (holding lock); delay s", f"{r['stops']} ({r['stops_holding_lock']}); {r['stop_delay_s_max']:.3f}",
         f"<= {r['config']['lock_timeout_s']}"),
        ("crashes, hangs", f"{len(r['crashes'])}, {len(r['hangs'])}", "0, 0"),
    ]  # fmt: skip
    columns = ["what", "value", "expected"]
    print_table([dict(zip(columns, line, strict=True)) for line in lines], columns)
    for line in r["error_examples"] + r["crashes"] + r["hangs"]:
        print("  ", line)
    missed = [k for k, ok in r["targets_met"].items() if not ok]
    print("all targets met" if not missed else f"targets missed: {', '.join(missed)}")


class StepTrace:
    """Over a phase (``with``): the engine's step records (StepClock.trace) and the interpreter's garbage
    collections, summed by ``summary()`` into where an inter-token tail comes from."""

    def __init__(self, engine):  # a vkv.engine.Engine
        self.engine, self.records, self.collections = engine, [], []  # collections: (start, end, generation)
        self._gc_start = 0.0

    def __enter__(self) -> StepTrace:
        self.engine.clock.trace = self.records
        gc.callbacks.append(self._heard_gc)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._heard_gc)
        self.engine.clock.trace = None

    def _heard_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.collections.append((self._gc_start, time.perf_counter(), info["generation"]))

    def summary(self, gap_steps: list[int] | None = None) -> dict:
        """Per kind of step: count, wall p50/p99/max, CPU p50, the forward's GPU span p50/p99, mean tokens and
        requests; the slow steps (wall over 1.4x the median): by kind, their tokens, requests, GPU span, CPU time
        and the garbage collection within them (gc_ms; gc_ms_all: within any step, on average); the collections by
        generation; with ``gap_steps`` (the offline gaps in steps), the share of gaps over one step (a request left
        out of a step, not a slow step)."""
        from vkv.engine.clock import KINDS  # (vkv.engine brings transformers: only for the scripts that use it)

        ms = lambda values, q: round(quantile(values, q) * 1e3, 3) if values else None  # noqa: E731
        mean = lambda values: round(statistics.fmean(values), 2) if values else None  # noqa: E731
        steps = [r for r in self.records if r.kind is not None]
        out: dict = {"steps": len(steps)}
        for kind in KINDS:
            mine = [r for r in steps if r.kind == kind]
            gpu = [r.forward_gpu_s for r in mine if r.forward_gpu_s is not None]
            walls = [r.wall_s for r in mine]
            out[kind] = {"steps": len(mine), "wall_p50_ms": ms(walls, 0.5), "wall_p99_ms": ms(walls, 0.99),
                         "wall_max_ms": round(max(walls) * 1e3, 3) if walls else None,
                         "cpu_p50_ms": ms([r.cpu_s for r in mine], 0.5), "gpu_p50_ms": ms(gpu, 0.5),
                         "gpu_p99_ms": ms(gpu, 0.99), "tokens": mean([r.tokens for r in mine]),
                         "requests": mean([r.sequences for r in mine])}  # fmt: skip
        median = quantile([r.wall_s for r in steps], 0.5) if steps else 0.0
        slow = [r for r in steps if r.wall_s > 1.4 * median]

        def in_gc(r) -> float:  # ms of collections within the step
            return sum(max(0.0, min(b, r.started + r.wall_s) - max(a, r.started)) for a, b, _ in self.collections) * 1e3

        out["slow"] = {"over_ms": round(1.4 * median * 1e3, 3), "steps": len(slow),
                       **{kind: sum(r.kind == kind for r in slow) for kind in KINDS},
                       "tokens": mean([r.tokens for r in slow]), "requests": mean([r.sequences for r in slow]),
                       "gpu_ms": mean([r.forward_gpu_s * 1e3 for r in slow if r.forward_gpu_s is not None]),
                       "cpu_ms": mean([r.cpu_s * 1e3 for r in slow]), "gc_ms": mean([in_gc(r) for r in slow]),
                       "gc_ms_all": mean([in_gc(r) for r in steps])}  # fmt: skip
        out["gc"] = {f"gen{g}": sum(1 for *_, gen in self.collections if gen == g) for g in range(3)}
        out["gc"]["total_ms"] = round(sum(b - a for a, b, _ in self.collections) * 1e3, 3)
        out["gc"]["max_ms"] = round(max((b - a for a, b, _ in self.collections), default=0.0) * 1e3, 3)
        if gap_steps:
            out["gaps_over_one_step"] = sum(g > 1 for g in gap_steps) / len(gap_steps)
        return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quantiles_ms(gaps: list[float], *percents: int) -> list[float | None]:
    cuts = statistics.quantiles(gaps, n=100) if len(gaps) > 100 else None
    return [cuts[p - 1] * 1e3 if cuts else None for p in percents]
