# SPDX-License-Identifier: Apache-2.0
"""Causal prefill / extend attention: vkv's kernel over a KVCache's views against torch baselines (TFLOP/s).

    python bench/prefill.py [--quick] [--cases 1x0+8192,4x8192+2048] [--layers 8]

Cases are (batch, cached prefix, new tokens) per request; 32 query / 8 KV heads, head_dim 128, bf16. Every
case lives in a KVCache on the cuda backend (--layers layers, Llama-3-8B-like); the new tokens' K/V are in
the cache before timing, so only attention is timed. Methods, all on the same data:
  vkv    vkv.kernels.extend_attention over layer 0's views (slots permuted), causal bottom-right aligned
         (vkv_pointers: the same with every K/V tile loaded through pointers, no TMA; vkv_unpacked: the same
         tiles with one query head a program)
  sdpa   torch SDPA, is_causal=True, enable_gqa=True on dense [B, Hq, N, D] (no-prefix cases only: SDPA's
         causal mask is top-left aligned)
  fa2    torch's FlashAttention-2 varlen op (aten._flash_attention_forward, cum_seq_q / cum_seq_k,
         is_causal=True: bottom-right aligned) over packed [sum(prefix + new), Hkv, D] K/V
Outputs are checked against a float32 torch reference (some query rows of the first and last request)
before timing (triton.testing.do_bench medians); a failing method is recorded as "n/a: <reason>".
FLOPs = 4 * Hq * D * sum(new * prefix + new * (new + 1) / 2). Also one token-major / grouped / layer-major row.
Writes bench/results/prefill.json and prefill.png, prints a table last with vkv / baseline ratios.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F
from common import RESULTS, CachedBatch, KernelBench, Rate, flash_attention_forward

from vkv import PagePool
from vkv.kernels import extend_attention
from vkv.kernels.extend import extend_config

TFLOPS = Rate("tflops", "TFLOP/s", 1)
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
        pairs = self.new * self.prefix + self.new * (self.new + 1) // 2  # (query, key) pairs of one request
        return 4 * self.num_q_heads * self.head_dim * self.batch * pairs


CASES = (Case(1, 0, 8192), Case(4, 0, 4096), Case(16, 0, 1024), Case(1, 0, 32768), Case(4, 8192, 2048),
         Case(8, 4096, 512))  # fmt: skip
QUICK = ("16x0+1024", "8x4096+512")
LAYOUT_CASE = Case(4, 8192, 2048)


@dataclass
class Problem(CachedBatch):
    """One case in a KVCache: request b's new queries are q[b * new:(b + 1) * new], its K/V slot slots[b]."""

    case: Case | None = None
    q: torch.Tensor | None = None  # [B * new, Hq, D]
    cu_seqlens_q: torch.Tensor | None = None
    checked: list[tuple[int, torch.Tensor]] | None = None  # (request, its query rows) compared with the reference
    ref: torch.Tensor | None = None  # float32 [checked rows, Hq, D]


def causal_reference(q: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float32 causal attention of query rows q [r, Hq, D] at ``positions`` over k, v [n, Hkv, D] -> [r, Hq, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    qf = q.float().view(q.shape[0], num_kv_heads, -1, head_dim)
    scores = torch.einsum("rhgd,nhd->hgrn", qf, k.float()) / math.sqrt(head_dim)
    visible = torch.arange(k.shape[0], device=k.device)[None, :] <= positions[:, None]  # [r, n]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hgrn,nhd->rhgd", probs, v.float()).reshape(q.shape[0], -1, head_dim)


def make_problem(bench: KernelBench, case: Case, layout: str = "token") -> Problem:
    """A cache holding the case's prefixes and new tokens (fresh random K/V), the queries, and the reference."""
    dev = bench.device
    gen = torch.Generator(device=dev).manual_seed(bench.seed)
    batch = common.filled_cache(bench, case, [case.seq_len] * case.batch, layout, gen)
    try:
        q = torch.randn(case.batch * case.new, case.num_q_heads, case.head_dim, generator=gen, device=dev)
        index = dict(dtype=torch.int32, device=dev)
        rows = torch.linspace(0, case.new - 1, min(CHECKED_ROWS, case.new), device=dev).round().long().unique()
        p = Problem(**vars(batch), case=case, q=q.to(bench.dtype), cu_seqlens_q=torch.arange(case.batch + 1, **index)
                    * case.new, checked=[(b, rows) for b in sorted({0, case.batch - 1})])  # fmt: skip
        refs = [causal_reference(p.q[b * case.new + r], case.prefix + r, *p.kv_of(b)) for b, r in p.checked]
        p.ref = torch.cat(refs)
        return p
    except BaseException:
        batch.close()
        raise


def measure(bench: KernelBench, p: Problem, run: Callable[[], torch.Tensor], rows=lambda out: out) -> dict:
    """Check rows(run()) ([B * new, Hq, D]) against the reference, then time run() alone."""
    c = p.case
    out = rows(run())
    result = common.checked(out, torch.cat([out[b * c.new + r] for b, r in p.checked]), p.ref)
    us = bench.timer(run)
    return {"us": us, "tflops": c.flops / us / 1e6, **result}


def run_vkv(bench: KernelBench, p: Problem, tma: bool = True, packed: bool = True) -> dict:
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


def run_sdpa(bench: KernelBench, p: Problem) -> dict:
    """torch SDPA causal on dense [B, H, N, D] copies (no cached prefix: its causal mask is top-left aligned)."""
    c = p.case
    if c.prefix:
        return {"error": "SDPA's is_causal is top-left aligned; no-prefix cases only", "skipped": True}
    k, v = p.dense()
    q = p.q.view(c.batch, c.new, c.num_q_heads, c.head_dim).transpose(1, 2).contiguous()
    return measure(
        bench,
        p,
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        rows=lambda out: out.transpose(1, 2).reshape(c.batch * c.new, c.num_q_heads, c.head_dim),
    )


def run_fa2(bench: KernelBench, p: Problem) -> dict:
    """FlashAttention-2 varlen, causal (bottom-right), over packed [sum(prefix + new), Hkv, D] K/V."""
    c = p.case
    k, v = (torch.cat([p.kv_of(b)[i] for b in range(c.batch)]) for i in (0, 1))
    cu_k = torch.arange(c.batch + 1, dtype=torch.int32, device=p.q.device) * c.seq_len
    return measure(
        bench, p, lambda: flash_attention_forward(p.q, k, v, p.cu_seqlens_q, cu_k, c.new, c.seq_len, causal=True)
    )


def run_case(bench: KernelBench, case: Case, log: Callable[[str], None]) -> dict:
    row: dict = {"case": case.name, "batch": case.batch, "prefix": case.prefix, "new": case.new, "flops": case.flops}
    if (p := common.build(row, lambda: make_problem(bench, case), log)) is None:
        return row
    runners = {
        "vkv": lambda: run_vkv(bench, p),
        "vkv_pointers": lambda: run_vkv(bench, p, tma=False),
        "vkv_unpacked": lambda: run_vkv(bench, p, packed=False),
        "sdpa": lambda: run_sdpa(bench, p),
        "fa2": lambda: run_fa2(bench, p),
    }
    return common.run_methods(row, p, runners, TFLOPS, log, BASELINES)


def run_layout(bench: KernelBench, case: Case, log: Callable[[str], None]) -> dict:
    make = functools.partial(make_problem, bench, case)
    return {"case": case.name, **common.layout_row(case.name, bench.num_layers, make, functools.partial(run_vkv, bench),
                                                   TFLOPS, log)}  # fmt: skip


def collect(bench: KernelBench, cases: list[Case], layout_case: Case | None, log, config: dict) -> dict:
    rows = [run_case(bench, case, log) for case in cases]
    layout = run_layout(bench, layout_case, log) if layout_case is not None else None
    config |= {"dtype": str(bench.dtype).removeprefix("torch."), "num_layers": bench.num_layers, "seed": bench.seed,
               "tolerance_rel": common.TOLERANCE, "checked_rows_per_request": CHECKED_ROWS,
               "flops": "4 * Hq * D * sum(new * prefix + new * (new + 1) / 2)"}  # fmt: skip
    return {"env": common.environment(), "config": config, "rows": rows, "layout": layout,
            "ratio_range": common.ratio_summary(rows, BASELINES)}  # fmt: skip


def report(payload: dict) -> None:
    """Write prefill.json and prefill.png; print the layout row, then the main table last."""
    rows = payload["rows"]
    path = common.write_json("prefill", payload)
    measured = [r for r in rows if "methods" in r]
    series = {name: [r["methods"][name].get("tflops") for r in measured] for name in METHODS}
    title = f"causal prefill / extend, bf16, 32/8 heads, D128 ({payload['env'].get('gpu')})"
    print(common.plot_bars(RESULTS / "prefill.png", title, "TFLOP/s", [r["case"] for r in measured], series))
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    common.print_layouts([payload["layout"]] if payload["layout"] else [], "case", TFLOPS)
    columns = {
        "vkv us": lambda r: r["methods"]["vkv"].get("us", ""),
        "no-TMA": lambda r: TFLOPS.cell(r["methods"]["vkv_pointers"]),
        "unpacked": lambda r: TFLOPS.cell(r["methods"]["vkv_unpacked"]),
    }
    common.print_methods(rows, "case", TFLOPS, columns, BASELINES)


def main() -> None:
    parser = common.kernel_parser(__doc__, budget_gib=32)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", help=f"case names (B x prefix + new), from: {', '.join(c.name for c in CASES)}")
    args = parser.parse_args()
    cases = common.select(parser, args.cases, args.quick, {c.name: c for c in CASES}, QUICK, "cases")
    common.require_cuda("bench/prefill.py")
    layout_case = None if args.no_layout else (cases[-1] if args.quick else LAYOUT_CASE)
    start, log = time.perf_counter(), common.progress()
    torch.manual_seed(args.seed)
    timer = common.gpu_timer(args.warmup, args.rep)
    log(f"{torch.cuda.get_device_name()}, {len(cases)} cases")
    pool = PagePool("cuda", budget_bytes=args.budget_gib << 30)
    bench = KernelBench(torch.device("cuda"), pool, timer, num_layers=args.layers, seed=args.seed)
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
