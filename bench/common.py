# SPDX-License-Identifier: Apache-2.0
"""Shared by the bench scripts: the environment record, tables, and result files under bench/results/."""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """What the numbers were measured on: date, GPU (or CPU), and versions."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda-python": version("cuda-python"),
        "cuda-bindings": version("cuda-bindings"),
        "vkv": version("vkv"),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda}
    else:
        env["gpu"] = None
    return env


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


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# -- shared by the GPU attention benchmarks (decode.py, prefill.py) -------------------------------------


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


# -- shared by decode.py and prefill.py: one measurement dict per method, {"error": ...} when it failed --


def attempt(what: Callable[[], dict]) -> dict:
    """what() or {"error": ...}: a failing method never stops the run."""
    try:
        return what()
    except Exception as exc:  # noqa: BLE001 - anything a baseline raises is recorded, not fatal
        return {"error": error_text(exc)}
    finally:
        free_device_memory()


LAYOUTS = ("token", "grouped", "layer")  # the layout rows of decode.py and prefill.py


def layout_options(layout: str, num_layers: int) -> dict:
    """CacheConfig arguments of a layout row: grouped in 4 planes where num_layers allows (else a layer a plane)."""
    if layout != "grouped":
        return {"layout": layout}
    return {"layout": layout, "group_layers": num_layers // 4 if num_layers % 4 == 0 else 1}


def layout_label(layout: str) -> str:
    return layout if layout == "grouped" else f"{layout}-major"


def ratio(a: dict, b: dict, key: str) -> float | None:
    """a[key] over b[key] (a rate), only when both were measured and both passed the correctness check."""
    return a[key] / b[key] if a.get("ok") and b.get("ok") else None


def fmt(m: dict, key: str, unit: str, digits: int) -> str:
    """One progress line's worth of a measurement."""
    if "error" in m:
        return na(m["error"])
    flag = "" if m.get("ok") else f" WRONG (rel err {m.get('rel_err', float('nan')):.3g})"
    return f"{m[key]:.{digits}f} {unit}, {m['us']:.1f} us{flag}"


def cell(m: dict | None, key: str, digits: int) -> str | float:
    """A table cell: the rate, 'WRONG' beside it when the check failed, or the error."""
    if m is None:
        return ""
    if "error" in m:
        return na(m["error"], 28)
    return m[key] if m.get("ok") else f"{m[key]:.{digits}f} WRONG"


def target(what: str, threshold: float, values: dict[str, float | None]) -> dict:
    """One of an issue's targets: met when every measured value reaches threshold (None: none measured)."""
    got = {k: v for k, v in values.items() if v is not None}
    return {
        "target": what,
        "threshold": threshold,
        "values": values,
        "met": all(v >= threshold for v in got.values()) if got else None,
        "unmeasured": [k for k, v in values.items() if v is None],
    }


def print_targets(goals: list[dict]) -> None:
    """The targets table: each target, whether it was met, and the worst measured value."""
    print("\ntargets")
    rows = [
        {
            "target": g["target"],
            "met": g["met"],
            "worst": min((v for v in g["values"].values() if v is not None), default=""),
        }
        for g in goals
    ]
    print_table(rows, ["target", "met", "worst"])


def collect_and_report(
    collect: Callable[[], dict], pool, log: Callable[[str], None], report: Callable[[dict], None], start: float
) -> None:
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
