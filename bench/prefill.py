# SPDX-License-Identifier: Apache-2.0
"""Causal prefill / extend attention: vkv's kernel over a KVCache's views against torch baselines (TFLOP/s).

    python bench/prefill.py [--quick] [--cases 1x0+8192,4x8192+2048] [--layers 8]

Cases are (batch, cached prefix, new tokens) per request; 32 query / 8 KV heads, head_dim 128, bf16. Every
case lives in a KVCache on the cuda backend (--layers layers, Llama-3-8B-like); the new tokens' K/V are in
the cache before timing, so only attention is timed. Methods, all on the same data:
  vkv    vkv.kernels.extend_attention over layer 0's views (slots permuted), causal bottom-right aligned
  sdpa   torch SDPA, is_causal=True, enable_gqa=True on dense [B, Hq, N, D] (no-prefix cases only: SDPA's
         causal mask is top-left aligned)
  fa2    torch's FlashAttention-2 varlen op (aten._flash_attention_forward, cum_seq_q / cum_seq_k,
         is_causal=True: bottom-right aligned) over packed [sum(prefix + new), Hkv, D] K/V
Outputs are checked against a float32 torch reference (some query rows of the first and last request)
before timing (triton.testing.do_bench medians); a failing method is recorded as "n/a: <reason>".
FLOPs = 4 * Hq * D * sum(new * prefix + new * (new + 1) / 2). Also one token-major / grouped / layer-major row.
Writes bench/results/prefill.json and prefill.png, prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    environment,
    error_text,
    flash_attention_forward,
    free_device_memory,
    gpu_timer,
    na,
    plot_bars,
    print_table,
    require_cuda,
    write_json,
)

from vkv import CacheConfig, KVCache, PagePool
from vkv.kernels import extend_attention
from vkv.kernels.extend import extend_config

# The shared helpers of bench/common.py, bound to this script's rate (TFLOP/s).
attempt, target = common.attempt, common.target
ratio = functools.partial(common.ratio, key="tflops")
fmt = functools.partial(common.fmt, key="tflops", unit="TFLOP/s", digits=1)
cell = functools.partial(common.cell, key="tflops", digits=1)

TOLERANCE = 2e-2  # max |out - ref| / max |ref| on the checked rows (bf16 output)
CHECKED_ROWS = 64  # query rows per checked request
METHODS = ("vkv", "sdpa", "fa2")
BASELINES = METHODS[1:]


@dataclass(frozen=True, slots=True)
class Case:
    batch: int
    prefix: int
    new: int
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.prefix}+{self.new}"

    @property
    def seq_len(self) -> int:
        return self.prefix + self.new

    @property
    def flops(self) -> int:
        return (
            4
            * self.num_q_heads
            * self.head_dim
            * self.batch
            * (self.new * self.prefix + self.new * (self.new + 1) // 2)
        )


CASES = (
    Case(1, 0, 8192),
    Case(4, 0, 4096),
    Case(16, 0, 1024),
    Case(1, 0, 32768),
    Case(4, 8192, 2048),
    Case(8, 4096, 512),
)
QUICK = ("16x0+1024", "8x4096+512")
LAYOUT_CASE = Case(4, 8192, 2048)


@dataclass
class Bench:
    device: torch.device
    pool: PagePool
    timer: Callable[[Callable[[], object]], float]
    num_layers: int = 8
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0


@dataclass
class Problem:
    """One case in a KVCache: request b's new queries are q[b * new:(b + 1) * new], its K/V slot slots[b]."""

    case: Case
    slots: list[int]
    cache: KVCache
    k: torch.Tensor  # layer 0's views [B, prefix + new, Hkv, D]
    v: torch.Tensor
    q: torch.Tensor  # [B * new, Hq, D]
    slot_ids: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    checked: list[tuple[int, torch.Tensor]]  # (request, its query rows) compared with the reference
    ref: torch.Tensor  # float32 [checked rows, Hq, D]

    def kv_of(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.case.seq_len
        return self.k[self.slots[b], :n], self.v[self.slots[b], :n]

    def close(self) -> None:
        self.cache.close()


def causal_reference(q: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float32 causal attention of query rows q [r, Hq, D] at ``positions`` over k, v [n, Hkv, D] -> [r, Hq, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    qf = q.float().view(q.shape[0], num_kv_heads, -1, head_dim)
    scores = torch.einsum("rhgd,nhd->hgrn", qf, k.float()) / math.sqrt(head_dim)
    visible = torch.arange(k.shape[0], device=k.device)[None, :] <= positions[:, None]  # [r, n]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hgrn,nhd->rhgd", probs, v.float()).reshape(q.shape[0], -1, head_dim)


def make_problem(bench: Bench, case: Case, layout: str = "token") -> Problem:
    dev, dtype = bench.device, bench.dtype
    cfg = CacheConfig(
        num_layers=bench.num_layers,
        num_kv_heads=case.num_kv_heads,
        head_dim=case.head_dim,
        dtype=dtype,
        max_slots=case.batch,
        max_seq_len=case.seq_len,
        **common.layout_options(layout, bench.num_layers),
    )
    cache = KVCache(cfg, bench.pool)
    try:
        for _ in range(case.batch):
            cache.allocate()
        gen = torch.Generator(device=dev).manual_seed(bench.seed)
        slots = torch.randperm(case.batch, generator=torch.Generator().manual_seed(bench.seed)).tolist()
        k, v = cache.key_view(0), cache.value_view(0)
        for slot in slots:
            cache.grow(slot, case.seq_len)  # the prefix and the new tokens: the new tokens' K/V are stored too
            for view in (k, v):
                view[slot, : case.seq_len].copy_(
                    torch.randn(
                        case.seq_len, case.num_kv_heads, case.head_dim, generator=gen, device=dev, dtype=torch.float32
                    )
                )
        q = torch.randn(
            case.batch * case.new, case.num_q_heads, case.head_dim, generator=gen, device=dev, dtype=torch.float32
        ).to(dtype)
        as_index = dict(dtype=torch.int32, device=dev)
        rows = torch.linspace(0, case.new - 1, min(CHECKED_ROWS, case.new), device=dev).round().long().unique()
        checked = [(b, rows) for b in sorted({0, case.batch - 1})]
        p = Problem(
            case,
            slots,
            cache,
            k,
            v,
            q,
            torch.tensor(slots, **as_index),
            torch.arange(case.batch + 1, **as_index) * case.new,
            torch.full((case.batch,), case.seq_len, **as_index),
            checked,
            torch.empty(0),
        )
        p.ref = torch.cat([causal_reference(q[b * case.new + r], case.prefix + r, *p.kv_of(b)) for b, r in checked])
        return p
    except BaseException:
        cache.close()
        raise


def measure(
    bench: Bench,
    p: Problem,
    run: Callable[[], torch.Tensor],
    rows: Callable[[torch.Tensor], torch.Tensor] = lambda out: out,
) -> dict:
    """Check rows(run()) ([B * new, Hq, D]) against the reference, then time run() alone."""
    c = p.case
    out = rows(run())
    finite = bool(torch.isfinite(out).all())
    got = torch.cat([out[b * c.new + r].float() for b, r in p.checked])
    diff = (got - p.ref).abs().max().item()
    rel = diff / max(p.ref.abs().max().item(), 1e-30)
    us = bench.timer(run)
    return {
        "us": us,
        "tflops": c.flops / us / 1e6,
        "max_abs_err": diff,
        "rel_err": rel,
        "finite": finite,
        "ok": finite and rel <= TOLERANCE,
    }


def run_vkv(bench: Bench, p: Problem, tma: bool = True, packed: bool = True) -> dict:
    """vkv's extend kernel at its default config; tma=False: the same with every tile loaded through pointers;
    packed=False: the same tiles with one query head a program (block_m positions of one head)."""
    out = torch.full_like(p.q, float("nan"))  # poisoned: every element must be written
    cfg = extend_config(p.case.head_dim, p.q.device, p.case.prefix + p.case.new)  # the hint a plan passes
    cfg = dataclasses.replace(cfg, tma=tma)
    if not packed:
        cfg = dataclasses.replace(cfg, pack_heads=1)
    return measure(
        bench,
        p,
        lambda: extend_attention(
            p.q, p.k, p.v, p.slot_ids, p.cu_seqlens_q, p.seq_lens, out=out, max_new_tokens=p.case.new, config=cfg
        ),
    )


def run_sdpa(bench: Bench, p: Problem) -> dict:
    """torch SDPA causal on dense [B, H, N, D] copies (no cached prefix: its causal mask is top-left aligned)."""
    c = p.case
    if c.prefix:
        return {"error": "SDPA's is_causal is top-left aligned; no-prefix cases only", "skipped": True}
    k, v = (torch.stack([p.kv_of(b)[i] for b in range(c.batch)]).transpose(1, 2).contiguous() for i in (0, 1))
    q = p.q.view(c.batch, c.new, c.num_q_heads, c.head_dim).transpose(1, 2).contiguous()

    return measure(
        bench,
        p,
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        rows=lambda out: out.transpose(1, 2).reshape(c.batch * c.new, c.num_q_heads, c.head_dim),
    )


def run_fa2(bench: Bench, p: Problem) -> dict:
    """FlashAttention-2 varlen, causal (bottom-right), over packed [sum(prefix + new), Hkv, D] K/V."""
    c = p.case
    k, v = (torch.cat([p.kv_of(b)[i] for b in range(c.batch)]) for i in (0, 1))
    cu_k = torch.arange(c.batch + 1, dtype=torch.int32, device=p.q.device) * c.seq_len
    return measure(
        bench, p, lambda: flash_attention_forward(p.q, k, v, p.cu_seqlens_q, cu_k, c.new, c.seq_len, causal=True)
    )


def run_case(bench: Bench, case: Case, log: Callable[[str], None]) -> dict:
    row: dict = {"case": case.name, "batch": case.batch, "prefix": case.prefix, "new": case.new, "flops": case.flops}
    try:
        p = make_problem(bench, case)
    except Exception as exc:  # noqa: BLE001
        row["error"] = error_text(exc)
        log(f"{case.name}: could not build the cache: {row['error']}")
        free_device_memory()
        return row
    try:
        methods = {"vkv": attempt(lambda: run_vkv(bench, p))}
        log(f"{case.name}: vkv {fmt(methods['vkv'])}")
        methods["vkv_pointers"] = attempt(lambda: run_vkv(bench, p, tma=False))
        log(f"{case.name}: vkv without TMA {fmt(methods['vkv_pointers'])}")
        methods["vkv_unpacked"] = attempt(lambda: run_vkv(bench, p, packed=False))
        log(f"{case.name}: vkv one query head a program {fmt(methods['vkv_unpacked'])}")
        for name, runner in (("sdpa", run_sdpa), ("fa2", run_fa2)):
            methods[name] = attempt(lambda runner=runner: runner(bench, p))
            log(f"{case.name}: {name} {fmt(methods[name])}")
        row["methods"] = methods
        row["ratios"] = {name: ratio(methods["vkv"], methods[name]) for name in BASELINES}
    finally:
        try:
            p.close()
        except Exception as exc:  # noqa: BLE001 - after a sticky CUDA error of some method; recorded
            row["close_error"] = error_text(exc)
        free_device_memory()
    return row


def run_layout(bench: Bench, case: Case, log: Callable[[str], None]) -> dict:
    row: dict = {"case": case.name, "group_layers": common.layout_options("grouped", bench.num_layers)["group_layers"]}
    for layout in common.LAYOUTS:

        def one(layout=layout) -> dict:
            p = make_problem(bench, case, layout)
            try:
                return run_vkv(bench, p)
            finally:
                p.close()

        row[layout] = attempt(one)
        log(f"layout {case.name} {common.layout_label(layout)}: {fmt(row[layout])}")
    row["token_vs_layer"] = ratio(row["token"], row["layer"])
    row["grouped_vs_token"] = ratio(row["grouped"], row["token"])
    return row


def targets(rows: list[dict]) -> list[dict]:
    measured = [r for r in rows if "methods" in r]

    return [
        target(
            "vkv output matches the float32 reference, every case",
            1.0,
            {r["case"]: float(bool(r["methods"]["vkv"].get("ok"))) for r in measured},
        ),
        target(
            "vkv >= 0.85x torch SDPA causal (no-prefix cases)",
            0.85,
            {r["case"]: r["ratios"]["sdpa"] for r in measured if r["prefix"] == 0},
        ),
        target(
            "vkv >= 1.3x FA2 varlen (prefix cases)",
            1.3,
            {r["case"]: r["ratios"]["fa2"] for r in measured if r["prefix"] > 0},
        ),
    ]


def collect(
    bench: Bench, cases: list[Case], layout_case: Case | None, log: Callable[[str], None], config: dict
) -> dict:
    start = time.perf_counter()
    rows = [run_case(bench, case, log) for case in cases]
    layout = run_layout(bench, layout_case, log) if layout_case is not None else None
    config = {
        **config,
        "dtype": str(bench.dtype).removeprefix("torch."),
        "num_layers": bench.num_layers,
        "seed": bench.seed,
        "tolerance_rel": TOLERANCE,
        "checked_rows_per_request": CHECKED_ROWS,
        "flops": "4 * Hq * D * sum(new * prefix + new * (new + 1) / 2)",
    }
    return {
        "env": environment(),
        "config": config,
        "rows": rows,
        "layout": layout,
        "targets": targets(rows),
        "wall_s": time.perf_counter() - start,
    }


def report(payload: dict) -> None:
    rows, layout, goals = payload["rows"], payload["layout"], payload["targets"]
    path = write_json("prefill", payload)
    measured = [r for r in rows if "methods" in r]
    series = {name: [r["methods"][name].get("tflops") for r in measured] for name in METHODS}
    print(
        plot_bars(
            RESULTS / "prefill.png",
            f"causal prefill / extend, bf16, 32/8 heads, D128 ({payload['env'].get('gpu')})",
            "TFLOP/s",
            [r["case"] for r in measured],
            series,
        )
    )
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    if layout:
        print(
            f"\nlayout, {layout['case']}: vkv token-major {fmt(layout['token'])}; grouped "
            f"({layout.get('group_layers')} layers a plane) {fmt(layout.get('grouped', {'error': 'not run'}))}; "
            f"layer-major {fmt(layout['layer'])}; token/layer {layout['token_vs_layer'] or float('nan'):.3f}; "
            f"grouped/token {layout.get('grouped_vs_token') or float('nan'):.3f}"
        )
    common.print_targets(goals)
    print("\ncausal prefill / extend, TFLOP/s (x = vkv / baseline; only outputs that passed the check)")
    table = []
    for r in rows:
        if "methods" not in r:
            table.append({"case (B x prefix+new)": r["case"], "vkv": na(r.get("error", "?"), 40)})
            continue
        table.append(
            {
                "case (B x prefix+new)": r["case"],
                "vkv us": r["methods"]["vkv"].get("us", ""),
                "no-TMA": cell(r["methods"]["vkv_pointers"]),
                "unpacked": cell(r["methods"].get("vkv_unpacked", {})),
                **{name: cell(r["methods"][name]) for name in METHODS},
                **{f"x {b}": r["ratios"][b] if r["ratios"][b] is not None else "" for b in BASELINES},
            }
        )
    columns = ["case (B x prefix+new)", "vkv us", "no-TMA", "unpacked", *METHODS, *(f"x {b}" for b in BASELINES)]
    print_table(table, columns)


def case_parser(doc: str, cases: Sequence[Case], quick: Sequence[str]) -> argparse.ArgumentParser:
    """An argument parser with --quick and --cases over ``cases``; see :func:`selected_cases`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(quick)}")
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated case names (B x prefix + new), from: {', '.join(c.name for c in cases)}",
    )
    return parser


def selected_cases(
    parser: argparse.ArgumentParser, args: argparse.Namespace, cases: Sequence[Case], quick: Sequence[str]
) -> list[Case]:
    """The cases --cases names (else the quick ones with --quick, else all); unknown names exit with an error."""
    names = quick if args.quick and not args.cases else (args.cases.split(",") if args.cases else None)
    known = {c.name: c for c in cases}
    if names is not None and (unknown := [n for n in names if n not in known]):
        parser.error(f"unknown cases {unknown}; expected names from {list(known)}")
    return [known[n] for n in names] if names is not None else list(cases)


def main() -> None:
    parser = case_parser(__doc__, CASES, QUICK)
    parser.add_argument("--layers", type=int, default=8, help="layers of the cache (32 is Llama-3-8B; default 8)")
    parser.add_argument("--warmup", type=int, default=150, help="do_bench warm-up, ms (long enough for clocks to ramp)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-layout", action="store_true", help="skip the token-major / grouped / layer-major row")
    parser.add_argument("--budget-gib", type=int, default=32, help="page pool budget for the caches, GiB")
    args = parser.parse_args()
    cases = selected_cases(parser, args, CASES, QUICK)
    require_cuda("bench/prefill.py")
    layout_case = None if args.no_layout else (cases[-1] if args.quick else LAYOUT_CASE)

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    torch.manual_seed(args.seed)
    timer = gpu_timer(args.warmup, args.rep)
    log(f"{torch.cuda.get_device_name()}, {len(cases)} cases")
    pool = PagePool("cuda", budget_bytes=args.budget_gib << 30)
    bench = Bench(torch.device("cuda"), pool, timer, num_layers=args.layers, seed=args.seed)
    config = {
        "cache": f"vkv KVCache, backend cuda, token-major unless noted, {args.layers} layers x 8 KV heads x "
        "head_dim 128 (Llama-3-8B-like; --layers)",
        "cases": [c.name for c in cases],
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "timer": "triton.testing.do_bench, median",
    }
    common.collect_and_report(lambda: collect(bench, cases, layout_case, log, config), pool, log, report, start)


if __name__ == "__main__":
    main()
