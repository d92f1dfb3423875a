# SPDX-License-Identifier: Apache-2.0
"""Decode attention: vkv's kernel over a KVCache's strided views against paged and torch baselines (KV TB/s).

    python bench/decode.py [--quick] [--shapes 1x65536,varied] [--layers 8] [--no-flex] [--no-sweep]

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
Each output is checked against a float32 torch reference (a subset of the requests) before it is timed
(triton.testing.do_bench medians). A method that fails is recorded as "n/a: <reason>"; the run goes on.
Also: vkv's split count swept against the heuristic's, and token-major vs layer-major caches.
Writes bench/results/decode.json and decode.png, prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import common
import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    copy_tbps,
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
from vkv.kernels import DecodeConfig, choose_num_splits, decode_attention, decode_config, paged_decode_attention

PAGED_BLOCK = 16
FLEX_PAGE = 128
FLEX_RESERVE_ROUNDS = 4  # PagedAttention.reserve in rounds, requests in random order: interleaved pages

# The shared helpers of bench/common.py, bound to this script's rate (TB/s).
attempt, target = common.attempt, common.target
ratio = functools.partial(common.ratio, key="tbps")
fmt = functools.partial(common.fmt, key="tbps", unit="TB/s", digits=2)
cell = functools.partial(common.cell, key="tbps", digits=2)

TOLERANCE = 2e-2  # max |out - ref| / max |ref| on the checked requests (bf16 output)
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
LAYOUT_SHAPES = (Shape(64, 4096), Shape(1, 65536))
QUICK_LAYOUT_SHAPES = (Shape(8, 8192),)


@dataclass
class Bench:
    """What every measurement shares: device, page pool, timer, options."""

    device: torch.device
    pool: PagePool
    timer: Callable[[Callable[[], object]], float]
    copy_tbps: float
    num_layers: int = 8
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    sweep: bool = True
    flex: bool = True
    flex_compile: bool = True
    flex_budget_s: float = 150.0
    flex_spent_s: float = 0.0
    _flex_fn: Callable | None = field(default=None, repr=False)

    def flex_attention(self) -> Callable:
        if self._flex_fn is None:
            from torch.nn.attention.flex_attention import flex_attention

            for knob in ("recompile_limit", "cache_size_limit"):  # one compile per shape
                with contextlib.suppress(AttributeError):
                    setattr(torch._dynamo.config, knob, 64)
            self._flex_fn = (
                torch.compile(flex_attention, dynamic=False, fullgraph=True) if self.flex_compile else flex_attention
            )
        return self._flex_fn


@dataclass
class Problem:
    """One shape's batch in a KVCache: request b reads slots[b], tokens [0, lengths[b]) of layer 0."""

    shape: Shape
    lengths: list[int]
    slots: list[int]
    cache: KVCache
    k: torch.Tensor  # layer 0's views [B, max_len, Hkv, D]
    v: torch.Tensor
    q: torch.Tensor  # [B, Hq, D]
    slot_ids: torch.Tensor  # int32 [B]
    seq_lens: torch.Tensor  # int32 [B]
    checked: list[int]  # requests compared with the reference
    ref: torch.Tensor  # float32 [len(checked), Hq, D]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def kv_bytes(self) -> int:
        s = self.shape
        return 2 * sum(self.lengths) * s.num_kv_heads * s.head_dim * self.k.element_size()

    def kv_of(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request b's K and V, [n, Hkv, D] views of the cache."""
        n = self.lengths[b]
        return self.k[self.slots[b], :n], self.v[self.slots[b], :n]

    def close(self) -> None:
        self.cache.close()


def attend_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float32 attention of one request: q [Hq, D] over k, v [n, Hkv, D] -> [Hq, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    qf = q.float().view(num_kv_heads, -1, head_dim)
    scores = torch.einsum("hgd,nhd->hgn", qf, k.float()) / math.sqrt(head_dim)
    return torch.einsum("hgn,nhd->hgd", torch.softmax(scores, dim=-1), v.float()).reshape(-1, head_dim)


def make_problem(bench: Bench, shape: Shape, layout: str = "token") -> Problem:
    """A cache holding the shape's batch of fresh random K/V, a query, and the reference on a subset."""
    dev, dtype = bench.device, bench.dtype
    lengths = shape.lengths(bench.seed)
    cfg = CacheConfig(
        num_layers=bench.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=dtype,
        max_slots=shape.batch,
        max_seq_len=max(lengths),
        **common.layout_options(layout, bench.num_layers),
    )
    cache = KVCache(cfg, bench.pool)
    try:
        for _ in range(shape.batch):
            cache.allocate()
        gen = torch.Generator(device=dev).manual_seed(bench.seed)
        slots = torch.randperm(shape.batch, generator=torch.Generator().manual_seed(bench.seed)).tolist()
        k, v = cache.key_view(0), cache.value_view(0)
        for slot, n in zip(slots, lengths, strict=True):
            cache.grow(slot, n)  # maps the pages of tokens [0, n): the only bytes any kernel may read
            for view in (k, v):
                view[slot, :n].copy_(
                    torch.randn(n, shape.num_kv_heads, shape.head_dim, generator=gen, device=dev, dtype=torch.float32)
                )
        q = torch.randn(
            shape.batch, shape.num_q_heads, shape.head_dim, generator=gen, device=dev, dtype=torch.float32
        ).to(dtype)
        longest = max(range(shape.batch), key=lengths.__getitem__)
        checked = sorted({0, shape.batch // 2, shape.batch - 1, longest})
        as_index = dict(dtype=torch.int32, device=dev)
        p = Problem(
            shape,
            lengths,
            slots,
            cache,
            k,
            v,
            q,
            torch.tensor(slots, **as_index),
            torch.tensor(lengths, **as_index),
            checked,
            torch.empty(0),
        )
        p.ref = torch.stack([attend_reference(q[b], *p.kv_of(b)) for b in checked])
        return p
    except BaseException:
        cache.close()
        raise


def measure(bench: Bench, p: Problem, run: Callable[[], torch.Tensor]) -> dict:
    """Check run()'s output [B, Hq, (1,) D] against the reference, then time it."""
    out = run().reshape(p.shape.batch, p.shape.num_q_heads, p.shape.head_dim)
    finite = bool(torch.isfinite(out).all())
    diff = (out[p.checked].float() - p.ref).abs().max().item()
    rel = diff / max(p.ref.abs().max().item(), 1e-30)
    result = {"max_abs_err": diff, "rel_err": rel, "finite": finite, "ok": finite and rel <= TOLERANCE}
    us = bench.timer(run)
    tbps = p.kv_bytes / us / 1e6
    return {
        "us": us,
        "tbps": tbps,
        "timer": getattr(bench.timer, "last_mode", None),
        "frac_copy": tbps / bench.copy_tbps if bench.copy_tbps else None,
        **result,
    }


# -- methods: each returns a measurement dict -----------------------------------------------------------


def heuristic_splits(p: Problem) -> int:
    """The split count vkv's attention plan uses (choose_num_splits with the batch's total tokens)."""
    s = p.shape
    return choose_num_splits(
        s.batch, s.num_kv_heads, p.max_len, head_dim=s.head_dim, device=p.q.device, total_tokens=sum(p.lengths)
    )


def split_candidates(p: Problem, heuristic: int) -> list[int]:
    """Powers of two from 1 up to one split per 128 tokens of the longest request (at most 256) + the heuristic."""
    bound = max(1, min(256, p.max_len // 128))
    return sorted({1 << i for i in range(bound.bit_length()) if 1 << i <= bound} | {heuristic})


def vkv_decode(p: Problem, splits: int, config: DecodeConfig | None = None) -> Callable[[], torch.Tensor]:
    """vkv's decode over p at ``splits`` splits, into a poisoned output of its own (every element must be
    written)."""
    out = torch.full_like(p.q, float("nan"))
    return lambda: decode_attention(
        p.q, p.k, p.v, p.slot_ids, p.seq_lens, out=out, num_splits=splits, max_seq_len=p.max_len, config=config
    )


def run_vkv(bench: Bench, p: Problem, chosen: int) -> tuple[dict, dict | None]:
    """vkv at the heuristic's split count, then (with bench.sweep) at each candidate split count."""

    def with_splits(splits: int) -> dict:
        return measure(bench, p, vkv_decode(p, splits))

    result = {"num_splits": chosen, **with_splits(chosen)}
    if not bench.sweep:
        return result, None
    sweep = []
    for splits in split_candidates(p, chosen):
        m = result if splits == chosen else attempt(lambda s=splits: with_splits(s))
        sweep.append({"num_splits": splits, **{k: m.get(k) for k in ("us", "tbps", "ok", "rel_err", "error")}})
    timed = [s for s in sweep if s.get("us") is not None and s.get("ok")]
    best = min(timed, key=lambda s: s["us"]) if timed else None
    return result, {
        "heuristic": chosen, "heuristic_us": result["us"],
        "best": best["num_splits"] if best else None, "best_us": best["us"] if best else None,
        "best_tbps": best["tbps"] if best else None,
        "heuristic_vs_best": result["us"] / best["us"] if best else None, "sweep": sweep,
    }  # fmt: skip


def run_vkv_pointers(bench: Bench, p: Problem, splits: int) -> dict:
    """vkv with every K/V tile loaded through pointers (no TMA descriptors): what TMA adds."""
    config = dataclasses.replace(decode_config(p.shape.head_dim, p.q.device), tma=False)
    return measure(bench, p, vkv_decode(p, splits, config))


def run_vkv_no_pdl(bench: Bench, p: Problem, splits: int) -> dict:
    """vkv with a plain launch of the reduce kernel (no programmatic dependent launch): what PDL adds."""
    config = dataclasses.replace(decode_config(p.shape.head_dim, p.q.device), pdl=False)
    return measure(bench, p, vkv_decode(p, splits, config))


def run_paged(bench: Bench, p: Problem, splits: int) -> dict:
    """vkv's paged baseline kernel over its own pool of 16-token blocks, shuffled across requests."""
    s, dev = p.shape, p.q.device
    blocks = [-(-n // PAGED_BLOCK) for n in p.lengths]
    gen = torch.Generator(device=dev).manual_seed(bench.seed + 1)
    pages = [
        torch.randn(
            sum(blocks), PAGED_BLOCK, s.num_kv_heads, s.head_dim, generator=gen, device=dev, dtype=torch.float32
        ).to(p.q.dtype)
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
    table = table.to(dev)
    out = torch.full_like(p.q, float("nan"))
    k_pages, v_pages = pages
    return {
        "num_splits": splits,
        **measure(
            bench,
            p,
            lambda: paged_decode_attention(
                p.q, k_pages, v_pages, table, p.seq_lens, out=out, num_splits=splits, max_seq_len=p.max_len
            ),
        ),
    }


def run_sdpa(bench: Bench, p: Problem) -> dict:
    """torch SDPA over dense [B, Hkv, L, D] copies (equal lengths only)."""
    if len(set(p.lengths)) != 1:
        return {"error": "dense SDPA needs equal lengths", "skipped": True}
    k, v = (torch.stack([p.kv_of(b)[i] for b in range(p.shape.batch)]).transpose(1, 2).contiguous() for i in (0, 1))
    q = p.q.unsqueeze(2)  # [B, Hq, 1, D]
    return measure(bench, p, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def run_fa2(bench: Bench, p: Problem) -> dict:
    """FlashAttention-2 varlen over fixed slots [B, Lmax, Hkv, D]; seqused_k = the lengths."""
    s, dev, lmax = p.shape, p.q.device, p.max_len
    gen = torch.Generator(device=dev).manual_seed(bench.seed + 2)
    kv = [
        torch.randn(s.batch, lmax, s.num_kv_heads, s.head_dim, generator=gen, device=dev, dtype=torch.float32).to(
            p.q.dtype
        )
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
        paged.assign(
            torch.tensor([b], device=dev),
            torch.arange(p.lengths[b], device=dev)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            k_cache,
            v_cache,
        )
    lens = p.seq_lens
    if len(set(p.lengths)) == 1:
        mask_mod = noop_mask
    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

    logical = create_block_mask(mask_mod, s.batch, None, 1, p.max_len, device=dev, BLOCK_SIZE=FLEX_PAGE)
    convert = paged.convert_logical_block_mask
    extra = {"kv_len": lens} if "kv_len" in inspect.signature(convert).parameters else {}
    block_mask = convert(logical, **extra)
    flex = bench.flex_attention()
    q = p.q.unsqueeze(2)
    t0 = time.perf_counter()
    flex(q, k_cache, v_cache, block_mask=block_mask, enable_gqa=True)
    compile_s = time.perf_counter() - t0
    result = measure(bench, p, lambda: flex(q, k_cache, v_cache, block_mask=block_mask, enable_gqa=True))
    return {**result, "first_call_s": compile_s}


# -- one shape, layouts, targets ---------------------------------------------------------------------------


def close(p: Problem, row: dict) -> None:
    """Give the cache back; after a sticky CUDA error of some method this fails too: record it, go on."""
    try:
        p.close()
    except Exception as exc:  # noqa: BLE001
        row["close_error"] = error_text(exc)
    free_device_memory()


def run_shape(bench: Bench, shape: Shape, log: Callable[[str], None]) -> dict:
    row: dict = {
        "shape": shape.name,
        "batch": shape.batch,
        "num_q_heads": shape.num_q_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "varied": shape.varied is not None,
    }
    try:
        p = make_problem(bench, shape)
    except Exception as exc:  # noqa: BLE001
        row["error"] = error_text(exc)
        log(f"{shape.name}: could not build the cache: {row['error']}")
        free_device_memory()
        return row
    try:
        row |= {
            "max_len": p.max_len,
            "total_tokens": sum(p.lengths),
            "kv_bytes": p.kv_bytes,
            "checked_requests": p.checked,
        }
        if shape.varied is not None:
            row["lengths"] = p.lengths
        methods: dict[str, dict] = {}
        chosen, splits = None, None
        try:
            chosen = heuristic_splits(p)
            vkv, splits = run_vkv(bench, p, chosen)
        except Exception as exc:  # noqa: BLE001 - recorded; the baselines still run
            vkv = {"error": error_text(exc)}
            free_device_memory()
        methods["vkv"] = vkv
        log(f"{shape.name}: vkv {fmt(vkv)} (splits {chosen})")
        runners = {
            "vkv_pointers": lambda: run_vkv_pointers(bench, p, chosen),
            "vkv_no_pdl": lambda: run_vkv_no_pdl(bench, p, chosen),
            "paged": lambda: run_paged(bench, p, chosen),
            "sdpa": lambda: run_sdpa(bench, p),
            "flex_paged": lambda: run_flex_paged(bench, p),
            "fa2": lambda: run_fa2(bench, p),
        }
        for name, runner in runners.items():
            methods[name] = attempt(runner)
            log(f"{shape.name}: {name} {fmt(methods[name])}")
        row["methods"] = methods
        row["ratios"] = {name: ratio(vkv, methods[name]) for name in BASELINES}
        if splits is not None:
            row["splits"] = splits
            log(
                f"{shape.name}: splits heuristic {splits['heuristic']} ({splits['heuristic_us']:.1f} us), "
                f"best {splits['best']} ({splits['best_us'] or float('nan'):.1f} us)"
            )
    finally:
        close(p, row)
    return row


def run_layouts(bench: Bench, shapes: tuple[Shape, ...], log: Callable[[str], None]) -> list[dict]:
    """vkv decode over token-major, grouped (4 planes where num_layers allows) and layer-major caches."""
    rows = []
    for shape in shapes:
        row: dict = {
            "shape": shape.name,
            "group_layers": common.layout_options("grouped", bench.num_layers)["group_layers"],
        }
        for layout in common.LAYOUTS:

            def one(shape=shape, layout=layout) -> dict:
                p = make_problem(bench, shape, layout)
                try:
                    splits = heuristic_splits(p)
                    return {"num_splits": splits, **measure(bench, p, vkv_decode(p, splits))}
                finally:
                    p.close()

            row[layout] = attempt(one)
            log(f"layout {shape.name} {common.layout_label(layout)}: {fmt(row[layout])}")
        row["token_vs_layer"] = ratio(row["token"], row["layer"])
        row["grouped_vs_token"] = ratio(row["grouped"], row["token"])
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with per-shape values and met (None when nothing was measured)."""
    measured = [r for r in rows if "methods" in r]

    def tbps(shape_name: str) -> dict[str, float | None]:
        return {r["shape"]: r["methods"]["vkv"].get("tbps") for r in measured if r["shape"] == shape_name}

    correct = {r["shape"]: float(bool(r["methods"]["vkv"].get("ok"))) for r in measured}
    return [
        target("vkv output matches the float32 reference, every shape", 1.0, correct),
        target(
            "vkv >= 1.0x torch SDPA (equal-length shapes)",
            1.0,
            {r["shape"]: r["ratios"]["sdpa"] for r in measured if not r["varied"]},
        ),
        target(
            "vkv >= 1.15x paged baseline (block 16), every shape",
            1.15,
            {r["shape"]: r["ratios"]["paged"] for r in measured},
        ),
        target(
            "vkv >= 1.15x flex + PagedAttention, every shape",
            1.15,
            {r["shape"]: r["ratios"]["flex_paged"] for r in measured},
        ),
        target("varied-length batch >= 3.9 TB/s", 3.9, tbps("varied")),
        target("B1 L65536 >= 3.3 TB/s", 3.3, tbps("1x65536")),
    ]


# -- output -----------------------------------------------------------------------------------------------


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if "methods" not in r:
            out.append({"shape": r["shape"], "vkv TB/s": na(r.get("error", "?"), 40)})
            continue
        m, sp = r["methods"], r.get("splits") or {}
        vkv = m["vkv"]
        row = {
            "shape": r["shape"],
            "vkv TB/s": cell(vkv),
            "% copy": 100 * vkv["frac_copy"] if vkv.get("frac_copy") else "",
            "splits h/best": f"{vkv.get('num_splits')}/{sp.get('best', '-')}",
            "best TB/s": sp.get("best_tbps") or "",
            "no-TMA TB/s": cell(m["vkv_pointers"]),
            "no-PDL TB/s": cell(m["vkv_no_pdl"]) if "vkv_no_pdl" in m else "",
        }
        for name in BASELINES:
            row[name] = cell(m[name])
        for name in BASELINES:
            row[f"x {name}"] = r["ratios"][name] if r["ratios"][name] is not None else ""
        out.append(row)
    return out


def report(payload: dict) -> None:
    """Write decode.json and decode.png; print the layout and target tables, then the main table last."""
    rows, layouts, goals, copy = payload["rows"], payload["layout"], payload["targets"], payload["config"]["copy_tbps"]
    path = write_json("decode", payload)
    measured = [r for r in rows if "methods" in r]
    series = {name: [r["methods"][name].get("tbps") for r in measured] for name in METHODS}
    print(
        plot_bars(
            RESULTS / "decode.png",
            f"decode attention, bf16, D128 ({payload['env'].get('gpu')})",
            "KV TB/s",
            [r["shape"] for r in measured],
            series,
            hline=(copy, f"d2d copy {copy:.2f} TB/s"),
        )
    )
    print(f"wrote {path} ({payload['wall_s']:.0f} s)")
    if layouts:
        print("\nlayout: vkv decode over token-major, grouped and layer-major caches")
        print_table(
            [
                {
                    "shape": r["shape"],
                    "token TB/s": cell(r["token"]),
                    f"grouped ({r.get('group_layers')} layers) TB/s": cell(r.get("grouped")),
                    "layer TB/s": cell(r["layer"]),
                    "token/layer": r["token_vs_layer"] or "",
                    "grouped/token": r.get("grouped_vs_token") or "",
                }
                for r in layouts
            ],
            [
                "shape",
                "token TB/s",
                f"grouped ({layouts[0].get('group_layers')} layers) TB/s",
                "layer TB/s",
                "token/layer",
                "grouped/token",
            ],  # fmt: skip
        )
    common.print_targets(goals)
    print("\ndecode attention, KV TB/s (x = vkv TB/s / baseline TB/s; only outputs that passed the check)")
    cols = ["shape", "vkv TB/s", "% copy", "splits h/best", "best TB/s", *BASELINES, *(f"x {b}" for b in BASELINES)]
    print_table(table_rows(rows), cols)


def collect(
    bench: Bench, shapes: list[Shape], layout_shapes: tuple[Shape, ...], log: Callable[[str], None], config: dict
) -> dict:
    """Run every shape (and the layout rows) and build the result payload."""
    start = time.perf_counter()
    rows = [run_shape(bench, shape, log) for shape in shapes]
    layouts = run_layouts(bench, layout_shapes, log) if layout_shapes else []
    config = {
        **config,
        "dtype": str(bench.dtype).removeprefix("torch."),
        "num_layers": bench.num_layers,
        "seed": bench.seed,
        "paged_block_size": PAGED_BLOCK,
        "flex_page_size": FLEX_PAGE,
        "flex_mode": "torch.compile(flex_attention, dynamic=False, fullgraph=True) over PagedAttention's "
        "converted block mask (its mask_mod maps physical to logical positions), no score_mod",
        "tolerance_rel": TOLERANCE,
        "kv_bytes": "2 * sum(lengths) * Hkv * D * 2",
        "copy_tbps": bench.copy_tbps,
        "flex_seconds": bench.flex_spent_s,
    }
    return {
        "env": environment(),
        "config": config,
        "rows": rows,
        "layout": layouts,
        "targets": targets(rows),
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (and a small layout row)")
    parser.add_argument(
        "--shapes", default=None, help=f"BATCHxLENGTH or names, comma-separated:: {', '.join(s.name for s in SHAPES)}"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=8,
        help="layers of the cache (memory and mapping time grow with it; 32 is Llama-3-8B; default 8)",
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="time eager calls (host launch overhead included) instead of CUDA-graph replays",
    )
    parser.add_argument("--warmup", type=int, default=150, help="do_bench warm-up, ms (long enough for clocks to ramp)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention + PagedAttention")
    parser.add_argument(
        "--flex-budget-s",
        type=float,
        default=150.0,
        help="stop running flex (it compiles per shape) once it has taken this many seconds",
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the num_splits sweep")
    parser.add_argument("--no-layout", action="store_true", help="skip token-major vs grouped vs layer-major")
    parser.add_argument("--budget-gib", type=int, default=48, help="page pool budget for the caches, GiB")
    args = parser.parse_args()
    names = QUICK if args.quick and not args.shapes else (args.shapes.split(",") if args.shapes else None)
    known = {s.name: s for s in SHAPES}
    for name in names or []:  # any BATCHxLENGTH besides the named shapes (equal lengths, 32/8 heads)
        if name not in known and re.fullmatch(r"[1-9]\d*x[1-9]\d*", name):
            known[name] = Shape(*(int(x) for x in name.split("x")))
    if names is not None and (unknown := [n for n in names if n not in known]):
        parser.error(f"unknown shapes {unknown}; expected BATCHxLENGTH or names from {list(known)}")
    require_cuda("bench/decode.py")
    shapes = [known[n] for n in names] if names is not None else list(SHAPES)
    layout_shapes = () if args.no_layout else QUICK_LAYOUT_SHAPES if args.quick else LAYOUT_SHAPES

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    torch.manual_seed(args.seed)
    timer = gpu_timer(args.warmup, args.rep, graph=not args.eager)
    copy = copy_tbps(gpu_timer(args.warmup, args.rep))  # eager: a 2 GiB copy dwarfs launch overhead
    log(f"{torch.cuda.get_device_name()}: device-to-device copy (2 GiB) {copy:.2f} TB/s (read + write)")
    pool = PagePool("cuda", budget_bytes=args.budget_gib << 30)
    bench = Bench(
        torch.device("cuda"),
        pool,
        timer,
        copy,
        num_layers=args.layers,
        seed=args.seed,
        sweep=not args.no_sweep,
        flex=not args.no_flex,
        flex_budget_s=args.flex_budget_s,
    )
    config = {
        "cache": f"vkv KVCache, backend cuda, token-major unless noted, {args.layers} layers x 8 KV heads x "
        "head_dim 128 (Llama-3-8B-like; --layers)",
        "shapes": [s.name for s in shapes],
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "timer": "triton.testing.do_bench, median"
        if args.eager
        else "CUDA-graph replay (triton.testing.do_bench_cudagraph, median); eager do_bench where capture fails "
        "(each row's 'timer' says which)",
    }
    common.collect_and_report(lambda: collect(bench, shapes, layout_shapes, log, config), pool, log, report, start)


if __name__ == "__main__":
    main()
