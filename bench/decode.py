# SPDX-License-Identifier: Apache-2.0
"""Decode attention: vkv's kernel over a KVCache's strided views against paged and torch baselines (KV TB/s).

    python bench/decode.py [--quick] [--shapes 1x65536,varied] [--layers 8] [--no-flex]

Every shape lives in a KVCache on the cuda backend (CUDA VMM pages), Llama-3-8B-like geometry (8 KV heads,
head_dim 128, bf16) with --layers layers; each request reads its slot (a permutation of the slots) through
layer 0's K/V views. Methods, all on the same data:
  vkv         vkv.kernels.decode_attention over the cache views, the split count of choose_num_splits
              (vkv_pointers: the same with TMA descriptors off, every tile loaded through pointers;
              vkv_no_pdl: the same with the reduce kernel launched after the split kernel, not alongside)
  paged       vkv.kernels.paged_decode_attention, block size 16, shuffled block table over its own pages
  sdpa        torch SDPA, dense [B, Hq, 1, D] x [B, Hkv, L, D], enable_gqa=True (equal lengths only)
  flex_paged  torch.compile(flex_attention) + torch's experimental PagedAttention, page size 128
  fa2         torch's FlashAttention-2 op (aten._flash_attention_forward), varlen over fixed slots
              [B, Lmax, Hkv, D] with seqused_k = the lengths
Each output is checked against a float32 reference (some requests), then timed (CUDA-graph replays, medians); a
method that fails is "n/a: <reason>" and the run goes on. Also vkv over token-major, grouped and layer-major caches.
Writes bench/results/decode.json and decode.png, prints a table last with vkv / baseline ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F
from common import RESULTS, CachedBatch, KernelBench, Rate, flash_attention_forward

from vkv import PagePool
from vkv.kernels import DecodeConfig, choose_num_splits, decode_attention, decode_config, paged_decode_attention

PAGED_BLOCK = 16
FLEX_PAGE = 128
FLEX_RESERVE_ROUNDS = 4  # PagedAttention.reserve in rounds, requests in random order: interleaved pages
TBPS = Rate("tbps", "TB/s", 2)
METHODS = ("vkv", "paged", "sdpa", "flex_paged", "fa2")
BASELINES = METHODS[1:]


@dataclass(frozen=True, slots=True)
class Shape:
    batch: int
    length: int  # every request's length, or the longest allowed when varied
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    varied: int | None = None  # lengths uniform in [varied, length]

    @property
    def name(self) -> str:
        if self.varied is not None:
            return "varied"
        return f"{self.batch}x{self.length}" + ("" if self.num_q_heads == 32 else f"-hq{self.num_q_heads}")

    def lengths(self, seed: int) -> list[int]:
        if self.varied is None:
            return [self.length] * self.batch
        rng = random.Random(seed)
        return [rng.randint(self.varied, self.length) for _ in range(self.batch)]


SHAPES = (
    Shape(1, 65536), Shape(8, 8192), Shape(32, 4096), Shape(64, 8192), Shape(128, 2048), Shape(256, 1024),
    Shape(32, 4096, num_q_heads=64), Shape(64, 4096, varied=1024),
)  # fmt: skip
QUICK = ("8x8192", "varied")
LAYOUT_SHAPES, QUICK_LAYOUT_SHAPES = (Shape(64, 4096), Shape(1, 65536)), (Shape(8, 8192),)


def parse_shape(name: str) -> Shape | None:  # a shape besides the named ones: BATCHxLENGTH (equal lengths, 32/8 heads)
    return Shape(*(int(x) for x in name.split("x"))) if re.fullmatch(r"[1-9]\d*x[1-9]\d*", name) else None


@dataclass
class Bench(KernelBench):
    copy_tbps: float = 0.0
    flex: bool = True
    flex_budget_s: float = 150.0
    flex_spent_s: float = 0.0


@functools.cache
def compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape
        with contextlib.suppress(AttributeError):
            setattr(torch._dynamo.config, knob, 64)
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


@dataclass
class Problem(CachedBatch):
    """One shape's batch in a KVCache, its query and the float32 reference of the checked requests."""

    shape: Shape | None = None
    q: torch.Tensor | None = None  # [B, Hq, D]
    checked: list[int] | None = None  # requests compared with the reference
    ref: torch.Tensor | None = None  # float32 [len(checked), Hq, D]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def kv_bytes(self) -> int:
        return 2 * sum(self.lengths) * self.shape.num_kv_heads * self.shape.head_dim * self.k.element_size()


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float32 attention of one request: q [Hq, D] over k, v [n, Hkv, D] -> [Hq, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    qf = q.float().view(num_kv_heads, -1, head_dim)
    scores = torch.einsum("hgd,nhd->hgn", qf, k.float()) / math.sqrt(head_dim)
    return torch.einsum("hgn,nhd->hgd", torch.softmax(scores, dim=-1), v.float()).reshape(-1, head_dim)


def make_problem(bench: Bench, shape: Shape, layout: str = "token") -> Problem:
    """A cache holding the shape's batch of fresh random K/V, a query, and the reference on a subset."""
    dev, lengths = bench.device, shape.lengths(bench.seed)
    gen = torch.Generator(device=dev).manual_seed(bench.seed)
    batch = common.filled_cache(bench, shape, lengths, layout, gen)
    try:
        q = torch.randn(shape.batch, shape.num_q_heads, shape.head_dim, generator=gen, device=dev).to(bench.dtype)
        longest = max(range(shape.batch), key=lengths.__getitem__)
        p = Problem(**vars(batch), shape=shape, q=q, checked=sorted({0, shape.batch // 2, shape.batch - 1, longest}))
        p.ref = torch.stack([attend_reference(q[b], *p.kv_of(b)) for b in p.checked])
        return p
    except BaseException:
        batch.close()
        raise


def measure(bench: Bench, p: Problem, run: Callable[[], torch.Tensor]) -> dict:
    """Check run()'s output [B, Hq, (1,) D] against the reference, then time it."""
    out = run().reshape(p.shape.batch, p.shape.num_q_heads, p.shape.head_dim)
    result = common.checked(out, out[p.checked], p.ref)
    us = bench.timer(run)
    tbps = p.kv_bytes / us / 1e6
    frac_copy = tbps / bench.copy_tbps if bench.copy_tbps else None
    return {"us": us, "tbps": tbps, "timer": getattr(bench.timer, "last_mode", None), "frac_copy": frac_copy, **result}


# -- methods: each returns a measurement dict -----------------------------------------------------------


def heuristic_splits(p: Problem) -> int:
    """The split count vkv's attention plan uses (choose_num_splits with the batch's total tokens)."""
    s = p.shape
    return choose_num_splits(s.batch, s.num_kv_heads, p.max_len, head_dim=s.head_dim, device=p.q.device,
                             total_tokens=sum(p.lengths))  # fmt: skip


def vkv_decode(p: Problem, splits: int, config: DecodeConfig | None = None) -> Callable[[], torch.Tensor]:
    """vkv's decode over p at ``splits`` splits, into a poisoned output (every element must be written)."""
    out = torch.full_like(p.q, float("nan"))
    return lambda: decode_attention(
        p.q, p.k, p.v, p.slot_ids, p.seq_lens, out=out, num_splits=splits, max_len=p.max_len, config=config
    )


def run_vkv(bench: Bench, p: Problem, splits: int) -> dict:
    """vkv at the split count its attention plan uses."""
    return {"num_splits": splits, **measure(bench, p, vkv_decode(p, splits))}


def run_vkv_without(bench: Bench, p: Problem, splits: int, **off: bool) -> dict:
    """vkv with tma=False (K/V tiles loaded through pointers) or pdl=False (the reduce kernel launched plainly)."""
    config = dataclasses.replace(decode_config(p.shape.head_dim, p.q.device), **off)
    return measure(bench, p, vkv_decode(p, splits, config))


def run_paged(bench: Bench, p: Problem, splits: int) -> dict:
    """vkv's paged baseline kernel over its own pool of 16-token blocks, shuffled across requests."""
    s, dev = p.shape, p.q.device
    blocks = [-(-n // PAGED_BLOCK) for n in p.lengths]
    gen = torch.Generator(device=dev).manual_seed(bench.seed + 1)
    pages = [
        torch.randn(sum(blocks), PAGED_BLOCK, s.num_kv_heads, s.head_dim, generator=gen, device=dev).to(p.q.dtype)
        for _ in range(2)
    ]  # random, not zeros, in the tails
    order = torch.randperm(sum(blocks), generator=torch.Generator().manual_seed(bench.seed))
    table = torch.zeros(s.batch, max(blocks), dtype=torch.int32)
    first = 0
    for b, nb in enumerate(blocks):
        ids = order[first : first + nb]
        first += nb
        table[b, :nb] = ids
        tokens = (ids[:, None] * PAGED_BLOCK + torch.arange(PAGED_BLOCK)).reshape(-1)[: p.lengths[b]].to(dev)
        for dst, src in zip(pages, p.kv_of(b), strict=True):
            dst.view(-1, s.num_kv_heads, s.head_dim)[tokens] = src
    table, out = table.to(dev), torch.full_like(p.q, float("nan"))
    k_pages, v_pages = pages

    def run() -> torch.Tensor:
        return paged_decode_attention(
            p.q, k_pages, v_pages, table, p.seq_lens, out=out, num_splits=splits, max_len=p.max_len
        )

    return {"num_splits": splits, **measure(bench, p, run)}


def run_sdpa(bench: Bench, p: Problem) -> dict:
    """torch SDPA over dense [B, Hkv, L, D] copies (equal lengths only)."""
    if len(set(p.lengths)) != 1:
        return {"error": "dense SDPA needs equal lengths", "skipped": True}
    k, v = p.dense()
    q = p.q.unsqueeze(2)  # [B, Hq, 1, D]
    return measure(bench, p, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def run_fa2(bench: Bench, p: Problem) -> dict:
    """FlashAttention-2 varlen over fixed slots [B, Lmax, Hkv, D]; seqused_k = the lengths."""
    s, dev, lmax = p.shape, p.q.device, p.max_len
    gen = torch.Generator(device=dev).manual_seed(bench.seed + 2)
    kv = [
        torch.randn(s.batch, lmax, s.num_kv_heads, s.head_dim, generator=gen, device=dev).to(p.q.dtype)
        for _ in range(2)
    ]  # tails past a length: random
    for b in range(s.batch):
        for dst, src in zip(kv, p.kv_of(b), strict=True):
            dst[b, : p.lengths[b]] = src
    k, v = (t.view(s.batch * lmax, s.num_kv_heads, s.head_dim) for t in kv)
    cu_q = torch.arange(s.batch + 1, dtype=torch.int32, device=dev)
    cu_k = cu_q * lmax
    return measure(
        bench, p, lambda: flash_attention_forward(p.q, k, v, cu_q, cu_k, 1, lmax, causal=False, seqused_k=p.seq_lens)
    )


def run_flex_paged(bench: Bench, p: Problem) -> dict:
    """flex_attention over torch's PagedAttention (page 128): converted block mask, compiled."""
    if not bench.flex:
        return {"error": "disabled (--no-flex)", "skipped": True}
    if bench.flex_spent_s > bench.flex_budget_s:
        return {"error": f"skipped: flex time budget ({bench.flex_budget_s:.0f} s) spent", "skipped": True}
    t0 = time.perf_counter()
    try:
        return _flex_paged(bench, p)
    finally:
        bench.flex_spent_s += time.perf_counter() - t0


def _flex_paged(bench: Bench, p: Problem) -> dict:
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, noop_mask

    s, dev = p.shape, p.q.device
    n_pages = sum(-(-n // FLEX_PAGE) for n in p.lengths)
    paged = PagedAttention(n_pages, FLEX_PAGE, s.batch, device=str(dev))
    rng = random.Random(bench.seed)
    for r in range(1, FLEX_RESERVE_ROUNDS + 1):  # grow in rounds, requests shuffled: pages interleave
        for b in rng.sample(range(s.batch), s.batch):
            target = -(-p.lengths[b] * r // FLEX_RESERVE_ROUNDS)
            paged.reserve(torch.tensor(b), torch.tensor(target, device=dev))
    k_cache, v_cache = (
        torch.zeros(1, s.num_kv_heads, n_pages * FLEX_PAGE, s.head_dim, device=dev, dtype=p.q.dtype) for _ in range(2)
    )
    for b in range(s.batch):
        k, v = p.kv_of(b)
        positions = torch.arange(p.lengths[b], device=dev)[None]
        batch_idx = torch.tensor([b], device=dev)
        paged.assign(batch_idx, positions, k.transpose(0, 1)[None], v.transpose(0, 1)[None], k_cache, v_cache)
    lens = p.seq_lens
    mask_mod = noop_mask if len(set(p.lengths)) == 1 else lambda b, h, q_idx, kv_idx: kv_idx < lens[b]
    logical = create_block_mask(mask_mod, s.batch, None, 1, p.max_len, device=dev, BLOCK_SIZE=FLEX_PAGE)
    convert = paged.convert_logical_block_mask
    extra = {"kv_len": lens} if "kv_len" in inspect.signature(convert).parameters else {}
    block_mask = convert(logical, **extra)
    flex = compiled_flex_attention()
    q = p.q.unsqueeze(2)
    t0 = time.perf_counter()
    flex(q, k_cache, v_cache, block_mask=block_mask, enable_gqa=True)
    compile_s = time.perf_counter() - t0
    result = measure(bench, p, lambda: flex(q, k_cache, v_cache, block_mask=block_mask, enable_gqa=True))
    return {**result, "first_call_s": compile_s}


# -- one shape, layouts, the run ----------------------------------------------------------------------------


def run_shape(bench: Bench, shape: Shape, log: Callable[[str], None]) -> dict:
    row: dict = {"shape": shape.name, "batch": shape.batch, "num_q_heads": shape.num_q_heads,
                 "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                 "varied": shape.varied is not None}  # fmt: skip
    if (p := common.build(row, lambda: make_problem(bench, shape), log)) is None:
        return row
    row |= {"max_len": p.max_len, "total_tokens": sum(p.lengths), "kv_bytes": p.kv_bytes, "checked_requests": p.checked}
    if shape.varied is not None:
        row["lengths"] = p.lengths
    splits: dict = {}  # the heuristic's split count, set by vkv's runner

    def vkv() -> dict:
        splits["chosen"] = heuristic_splits(p)
        return run_vkv(bench, p, splits["chosen"])

    runners = {
        "vkv": vkv,
        "vkv_pointers": lambda: run_vkv_without(bench, p, splits["chosen"], tma=False),
        "vkv_no_pdl": lambda: run_vkv_without(bench, p, splits["chosen"], pdl=False),
        "paged": lambda: run_paged(bench, p, splits["chosen"]),
        "sdpa": lambda: run_sdpa(bench, p),
        "flex_paged": lambda: run_flex_paged(bench, p),
        "fa2": lambda: run_fa2(bench, p),
    }
    return common.run_methods(row, p, runners, TBPS, log, BASELINES)


def run_layout(bench: Bench, shape: Shape, log: Callable[[str], None]) -> dict:
    make, run = functools.partial(make_problem, bench, shape), lambda p: run_vkv(bench, p, heuristic_splits(p))
    return {"shape": shape.name, **common.layout_row(shape.name, bench.num_layers, make, run, TBPS, log)}


def report(payload: dict) -> None:
    """Write decode.json and decode.png; print the layout table, then the main table last."""
    rows, copy = payload["rows"], payload["config"]["copy_tbps"]
    path = common.write_json("decode", payload)
    measured = [r for r in rows if "methods" in r]
    series = {name: [r["methods"][name].get("tbps") for r in measured] for name in METHODS}
    title, line = f"decode attention, bf16, D128 ({payload['env'].get('gpu')})", (copy, f"d2d copy {copy:.2f} TB/s")
    print(common.plot_bars(RESULTS / "decode.png", title, "KV TB/s", [r["shape"] for r in measured], series, line))
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    common.print_layouts(payload["layout"], "shape", TBPS)
    vkv = lambda r: r["methods"]["vkv"]  # noqa: E731
    columns = {
        "% copy": lambda r: 100 * vkv(r)["frac_copy"] if vkv(r).get("frac_copy") else "",
        "splits": lambda r: vkv(r).get("num_splits", ""),
        "no-TMA": lambda r: TBPS.cell(r["methods"]["vkv_pointers"]),
        "no-PDL": lambda r: TBPS.cell(r["methods"]["vkv_no_pdl"]),
    }
    common.print_methods(rows, "shape", TBPS, columns, BASELINES)


def collect(bench: Bench, shapes: list[Shape], layout_shapes: tuple[Shape, ...], log, config: dict) -> dict:
    """Run every shape (and the layout rows) and build the result payload."""
    rows = [run_shape(bench, shape, log) for shape in shapes]
    layouts = [run_layout(bench, shape, log) for shape in layout_shapes]
    config |= {
        "dtype": str(bench.dtype).removeprefix("torch."), "num_layers": bench.num_layers, "seed": bench.seed,
        "paged_block_size": PAGED_BLOCK, "flex_page_size": FLEX_PAGE,
        "flex_mode": "torch.compile(flex_attention, dynamic=False, fullgraph=True) over PagedAttention's "
        "converted block mask (its mask_mod maps physical to logical positions), no score_mod",
        "tolerance_rel": common.TOLERANCE, "kv_bytes": "2 * sum(lengths) * Hkv * D * 2",
        "copy_tbps": bench.copy_tbps, "flex_seconds": bench.flex_spent_s,
    }  # fmt: skip
    return {"env": common.environment(), "config": config, "rows": rows, "layout": layouts,
            "ratio_range": common.ratio_summary(rows, BASELINES)}  # fmt: skip


def main() -> None:
    parser = common.kernel_parser(__doc__, budget_gib=48)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (and a small layout row)")
    parser.add_argument("--shapes", help=f"BATCHxLENGTH or names, comma-separated: {', '.join(s.name for s in SHAPES)}")
    parser.add_argument("--eager", action="store_true", help="time eager calls (host launch overhead included)")
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention + PagedAttention")
    parser.add_argument("--flex-budget-s", type=float, default=150.0, help="seconds of flex (compiling), then skip it")
    args = parser.parse_args()
    shapes = common.select(parser, args.shapes, args.quick, {s.name: s for s in SHAPES}, QUICK, "shapes", parse_shape)
    common.require_cuda("bench/decode.py")
    layout_shapes = () if args.no_layout else QUICK_LAYOUT_SHAPES if args.quick else LAYOUT_SHAPES
    start, log = time.perf_counter(), common.progress()
    torch.manual_seed(args.seed)
    timer = common.gpu_timer(args.warmup, args.rep, graph=not args.eager)
    copy = common.copy_tbps(common.gpu_timer(args.warmup, args.rep))  # eager: a 2 GiB copy dwarfs launch overhead
    log(f"{torch.cuda.get_device_name()}: device-to-device copy (2 GiB) {copy:.2f} TB/s (read + write)")
    pool = PagePool("cuda", budget_bytes=args.budget_gib << 30)
    bench = Bench(torch.device("cuda"), pool, timer, num_layers=args.layers, seed=args.seed, copy_tbps=copy,
                  flex=not args.no_flex, flex_budget_s=args.flex_budget_s)  # fmt: skip
    config = {
        "cache": f"vkv KVCache, backend cuda, token-major unless noted, {args.layers} layers x 8 KV heads x "
        "head_dim 128 (Llama-3-8B-like; --layers)",
        "shapes": [s.name for s in shapes], "warmup_ms": args.warmup, "rep_ms": args.rep,
        "timer": "triton.testing.do_bench, median" if args.eager else "CUDA-graph replay "
        "(triton.testing.do_bench_cudagraph, median); eager do_bench where capture fails (each row's 'timer')",
    }  # fmt: skip
    common.collect_and_report(lambda: collect(bench, shapes, layout_shapes, log, config), pool, log, report, start)


if __name__ == "__main__":
    main()
