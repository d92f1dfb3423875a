# SPDX-License-Identifier: Apache-2.0
"""Tuning sweep for vkv's extend (prefill) kernel: ExtendConfig tiles x cases, against torch SDPA causal.

    python tools/tune_extend.py [--quick] [--cases 1x0+8192,4x8192+2048] [--rep 50]

Cases are (batch, cached prefix, new tokens) per request; 32 query / 8 KV heads, head_dim 128, bf16. Each
case lives in a token-major KVCache on the cuda backend (--layers layers) with the new tokens' K/V stored, as
in bench/prefill.py. Every ExtendConfig of GRID (tiles x TMA on/off) is checked once (against torch
SDPA causal on no-prefix cases, against a float32 reference on some rows of the first and last request
otherwise), then timed (triton.testing.do_bench medians, eager). A config that cannot launch (e.g. out of
shared memory) is recorded with its error and not retried on later cases. Per case: the default config, the
best config and SDPA in TFLOP/s; per config: its worst fraction of each case's best, to pick one default.
FLOPs = 4 * Hq * D * sum(new * prefix + new * (new + 1) / 2). Writes tools/results/tune_extend.json (after
every case, so a cut-short run keeps what it measured) and prints a table last.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py, the benchmarks
from common import (  # noqa: E402
    environment,
    error_text,
    free_device_memory,
    gpu_timer,
    print_table,
    require_cuda,
    select,
    write_json,
)
from prefill import Case, causal_reference  # noqa: E402

from vkv import CacheConfig, KVCache, PagePool  # noqa: E402
from vkv.kernels import ExtendConfig, extend_attention  # noqa: E402
from vkv.kernels.extend import extend_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CASES = (Case(1, 0, 8192), Case(4, 0, 4096), Case(16, 0, 1024), Case(4, 8192, 2048), Case(8, 4096, 512))
QUICK = ("16x0+1024", "8x4096+512")
# Tiles at D=128 (bf16 shared memory <= 208 KiB), each with and without TMA. The H200 sweeps of 2026-11-29
# (tools/results/tune_extend.json) kept these three: bm64 bn64 w4 st4, bm64 bn32 w4 st3, bm64 bn128 w8 st3, bm128
# bn64 w8 st2, bm128 bn128 w8 st2 and bm128 bn32 w4 st3 reached 0.52-0.85 of each case's best. Static sm_90
# (Triton 3.9, TMA): bm64 bn64 w4 st3 112 KiB fits 2 programs per SM.
TILES = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3))
# Query heads of one KV head packed in a program's rows (block_m = positions x heads), TMA on: bm128 rows of 64
# positions x 2 heads keep bm64's causal diagonal with bm128's tiles.
PACKED = (
    (128, 64, 8, 3, 2), (128, 128, 8, 3, 2), (128, 64, 8, 3, 4), (64, 64, 4, 3, 2), (64, 64, 4, 3, 4),
    (64, 32, 4, 3, 2), (64, 64, 4, 4, 2), (128, 128, 8, 3, 4), (128, 128, 8, 2, 2),
)  # fmt: skip
GRID = tuple(ExtendConfig(m, n, w, s, tma=t) for (m, n, w, s), t in itertools.product(TILES, (True, False))) + tuple(
    ExtendConfig(m, n, w, s, pack_heads=h) for m, n, w, s, h in PACKED
)
TOLERANCE = 2e-2  # max |out - ref| / max |ref| (bf16 output)
CHECKED_ROWS = 64  # float32 reference rows per checked request


def name_of(cfg: ExtendConfig) -> str:
    pack = f" pack{cfg.pack_heads}" if cfg.pack_heads > 1 else ""
    return f"bm{cfg.block_m} bn{cfg.block_n} w{cfg.num_warps} st{cfg.num_stages}{' tma' if cfg.tma else ''}{pack}"


def tflops(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def num_slots_for(batch: int) -> int:
    # A multiple of 16 for every case: Triton specialises int arguments (1, divisible by 16), so equal
    # specialisations let all cases share one compiled kernel per config.
    return max(16, -(-batch // 16) * 16)


@dataclass
class Problem:
    """One case in a KVCache: request b's new queries are q[b * new:(b + 1) * new], its K/V slot slots[b]."""

    case: Case
    cache: KVCache
    slots: list[int]
    q: torch.Tensor  # [B * new, Hq, D]
    k: torch.Tensor  # layer 0's views [num_slots, prefix + new, Hkv, D]
    v: torch.Tensor
    slot_ids: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    out: torch.Tensor
    rows: torch.Tensor  # indices into q of the float32 reference rows
    ref_rows: torch.Tensor  # float32 [len(rows), Hq, D]
    ref: torch.Tensor | None = None  # SDPA's output [B * new, Hq, D] (no-prefix cases), set by time_sdpa

    def kv_of(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.case.seq_len
        return self.k[self.slots[b], :n], self.v[self.slots[b], :n]

    def extend(self, cfg: ExtendConfig) -> Callable[[], torch.Tensor]:
        return lambda: extend_attention(
            self.q, self.k, self.v, self.slot_ids, self.cu_seqlens_q, self.seq_lens,
            out=self.out, max_new_tokens=self.case.new, config=cfg,
        )  # fmt: skip


def make_problem(case: Case, pool: PagePool, dtype: torch.dtype, num_layers: int, seed: int) -> Problem:
    dev = pool.driver.device
    cfg = CacheConfig(
        num_layers=num_layers,
        num_kv_heads=case.num_kv_heads,
        head_dim=case.head_dim,
        dtype=dtype,
        max_slots=num_slots_for(case.batch),
        max_seq_len=case.seq_len,
    )
    cache = KVCache(cfg, pool)
    try:
        for _ in range(case.batch):
            cache.allocate()
        gen = torch.Generator(device=dev).manual_seed(seed)
        slots = torch.randperm(case.batch, generator=torch.Generator().manual_seed(seed)).tolist()
        k, v = cache.key_view(0), cache.value_view(0)
        shape = (case.seq_len, case.num_kv_heads, case.head_dim)
        for slot in slots:
            cache.grow(slot, case.seq_len)  # the prefix and the new tokens: the new tokens' K/V are stored too
            for view in (k, v):
                view[slot, : case.seq_len].copy_(torch.randn(shape, generator=gen, device=dev))
        q = torch.randn(case.batch * case.new, case.num_q_heads, case.head_dim, generator=gen, device=dev).to(dtype)
        index = dict(dtype=torch.int32, device=dev)
        picked = torch.linspace(0, case.new - 1, min(CHECKED_ROWS, case.new), device=dev).round().long().unique()
        checked = sorted({0, case.batch - 1})
        p = Problem(
            case, cache, slots, q, k, v,
            torch.tensor(slots, **index),
            torch.arange(case.batch + 1, **index) * case.new,
            torch.full((case.batch,), case.seq_len, **index),
            torch.empty_like(q),
            torch.cat([b * case.new + picked for b in checked]),
            torch.empty(0),
        )  # fmt: skip
        p.ref_rows = torch.cat(
            [causal_reference(q[b * case.new + picked], case.prefix + picked, *p.kv_of(b)) for b in checked]
        )
        return p
    except BaseException:
        cache.close()
        raise


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref.float()).abs().max().item()
    return diff / max(ref.float().abs().max().item(), 1e-30)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sdpa(p: Problem, timer: Callable[[Callable[[], object]], float]) -> dict:
    """torch SDPA causal on dense [B, H, N, D] copies; its output becomes p.ref. No-prefix cases only (SDPA's
    causal mask is top-left aligned)."""
    c = p.case
    if c.prefix:
        return {"skipped": "SDPA's is_causal is top-left aligned; no-prefix cases only"}
    k, v = (torch.stack([p.kv_of(b)[i] for b in range(c.batch)]).transpose(1, 2).contiguous() for i in (0, 1))
    q = p.q.view(c.batch, c.new, c.num_q_heads, c.head_dim).transpose(1, 2).contiguous()

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    ref = run().transpose(1, 2).reshape(c.batch * c.new, c.num_q_heads, c.head_dim)
    err = rel_err(ref[p.rows], p.ref_rows)
    us = timer(run)
    if err <= TOLERANCE:
        p.ref = ref
    return {"us": us, "tflops": c.flops / us / 1e6, "rel_err": err, "ok": err <= TOLERANCE}


def time_config(p: Problem, cfg: ExtendConfig, timer: Callable[[Callable[[], object]], float]) -> dict:
    """Check one config's output (SDPA's on every row, else the float32 rows), then time it if it passed."""
    run = p.extend(cfg)
    p.out.fill_(float("nan"))  # poisoned: every element must be written
    start = time.perf_counter()
    out = run()
    synchronize(out.device)
    first_s = time.perf_counter() - start  # includes compiling on the first case
    finite = bool(torch.isfinite(out).all())
    err = rel_err(out, p.ref) if p.ref is not None else rel_err(out[p.rows], p.ref_rows)
    m = {"rel_err": err, "checked_against": "sdpa" if p.ref is not None else "float32 rows", "first_call_s": first_s}
    if not (finite and err <= TOLERANCE):
        return m | {"ok": False, "finite": finite}
    us = timer(run)
    return m | {"ok": True, "us": us, "tflops": p.case.flops / us / 1e6}


def run_case(
    case: Case,
    configs: list[ExtendConfig],
    failed: dict[ExtendConfig, str],
    *,
    pool: PagePool,
    timer: Callable[[Callable[[], object]], float],
    dtype: torch.dtype,
    num_layers: int,
    seed: int,
    log: Callable[[str], None],
) -> tuple[dict, list[dict]]:
    """One case: SDPA, then every config (skipping those in ``failed``; adds the ones that raise)."""
    row: dict = {"case": case.name, "batch": case.batch, "prefix": case.prefix, "new": case.new, "flops": case.flops}
    try:
        p = make_problem(case, pool, dtype, num_layers, seed)
    except Exception as exc:  # noqa: BLE001 - recorded; the other cases still run
        row["error"] = error_text(exc)
        log(f"{case.name}: could not build the cache: {row['error']}")
        free_device_memory()
        return row, []
    sweep = []
    try:
        try:
            row["sdpa"] = time_sdpa(p, timer)
        except Exception as exc:  # noqa: BLE001 - the kernel is then checked against the float32 rows only
            row["sdpa"] = {"error": error_text(exc)}
        free_device_memory()
        sdpa = row["sdpa"]
        if "tflops" in sdpa:
            log(f"{case.name}: sdpa {sdpa['tflops']:.1f} TFLOP/s (rel err {sdpa['rel_err']:.2g}, ok {sdpa['ok']})")
        else:
            log(f"{case.name}: sdpa n/a: {sdpa.get('error') or sdpa.get('skipped')}")
        for cfg in configs:
            entry = {
                "case": case.name,
                "config": name_of(cfg),  # the key: tiles and TMA on/off
                "block_m": cfg.block_m,
                "block_n": cfg.block_n,
                "warps": cfg.num_warps,
                "stages": cfg.num_stages,
                "tma": cfg.tma,
            }
            if cfg in failed:
                entry |= {"error": failed[cfg], "skipped": True}
            else:
                try:
                    entry |= time_config(p, cfg, timer)
                except Exception as exc:  # noqa: BLE001 - an unfit config (shared memory) is recorded, not fatal
                    failed[cfg] = f"{case.name}: {error_text(exc)}"
                    entry["error"] = failed[cfg]
            sweep.append(entry)
            if "tflops" in entry:
                log(f"{case.name} {name_of(cfg)}: {entry['tflops']:.1f} TFLOP/s (rel err {entry['rel_err']:.2g})")
            elif "error" in entry and not entry.get("skipped"):
                log(f"{case.name} {name_of(cfg)}: {entry['error']}")
            elif "error" not in entry:
                log(f"{case.name} {name_of(cfg)}: WRONG, rel err {entry['rel_err']:.3g} (finite: {entry['finite']})")
    finally:
        try:
            p.cache.close()
        except Exception as exc:  # noqa: BLE001 - after a sticky CUDA error; recorded
            row["close_error"] = error_text(exc)
        free_device_memory()
    return row, sweep


def summarize(row: dict, sweep: list[dict], default: ExtendConfig) -> dict:
    """The case's table row: default, best and SDPA TFLOP/s and their ratios."""
    ok = [s for s in sweep if s.get("ok")]
    dflt = next((s for s in sweep if s["config"] == name_of(default)), {})
    best = max(ok, key=lambda s: s["tflops"], default=None)
    sdpa = row.get("sdpa", {}).get("tflops") if row.get("sdpa", {}).get("ok") else None
    row |= {
        "default config": name_of(default),
        "default": dflt.get("tflops"),
        "best config": best["config"] if best else None,
        "best": best["tflops"] if best else None,
        "sdpa TFLOP/s": sdpa,
        "configs ok": len(ok),
        "wrong": sum(1 for s in sweep if s.get("ok") is False),
        "failed": sum(1 for s in sweep if "error" in s),
    }
    row["best/default"] = row["best"] / row["default"] if best and row["default"] else None
    row["best/sdpa"] = row["best"] / sdpa if best and sdpa else None
    row["default/sdpa"] = row["default"] / sdpa if row["default"] and sdpa else None
    return row


def rank(rows: list[dict], sweep: list[dict], configs: list[ExtendConfig]) -> list[dict]:
    """Per config: TFLOP/s over the case's best, per case (0 if it failed or was wrong); sorted by the minimum."""
    best = {r["case"]: r["best"] for r in rows if r.get("best")}
    score = {(s["case"], s["config"]): s.get("tflops") for s in sweep}
    ranking = []
    for cfg in configs:
        fractions = {}
        for case, top in best.items():
            tflops = score.get((case, name_of(cfg)))
            fractions[case] = tflops / top if tflops else 0.0
        if fractions:
            ranking.append(
                {
                    "config": name_of(cfg),
                    "min": min(fractions.values()),
                    "mean": sum(fractions.values()) / len(fractions),
                    **fractions,
                }
            )
    return sorted(ranking, key=lambda r: (r["min"], r["mean"]), reverse=True)


def collect(
    cases: list[Case],
    configs: list[ExtendConfig],
    *,
    pool: PagePool,
    timer: Callable[[Callable[[], object]], float],
    dtype: torch.dtype = torch.bfloat16,
    num_layers: int = 8,
    seed: int = 0,
    log: Callable[[str], None] = print,
    save: Callable[[dict], object] | None = None,
) -> dict:
    """The whole sweep: rows (one per case), sweep (one per case x config) and the ranking of configs."""
    dev = pool.driver.device
    defaults = [extend_config(c.head_dim, dev, c.prefix + c.new) for c in cases]
    configs = list(dict.fromkeys([*configs, *defaults]))  # the default configs are always timed
    rows, sweep, failed = [], [], {}
    for i, (case, default) in enumerate(zip(cases, defaults, strict=True)):
        row, measured = run_case(
            case, configs, failed, pool=pool, timer=timer, dtype=dtype, num_layers=num_layers, seed=seed, log=log
        )
        rows.append(summarize(row, measured, default))
        sweep += measured
        log(
            f"{case.name}: TFLOP/s default ({row['default config']}) {tflops(row['default'])}, best "
            f"({row['best config']}) {tflops(row['best'])}, sdpa {tflops(row['sdpa TFLOP/s'])}"
        )
        payload = {"rows": rows, "sweep": sweep, "ranking": rank(rows, sweep, configs)}
        if save is not None:
            save(payload | {"complete": i == len(cases) - 1})
    return {"rows": rows, "sweep": sweep, "ranking": rank(rows, sweep, configs)}


def report(payload: dict, cases: list[str]) -> None:
    print("\nconfigs by their worst fraction of a case's best TFLOP/s (0: failed or wrong)")
    if payload["ranking"]:
        print_table(payload["ranking"], ["config", "min", "mean", *cases])
    else:
        print("none: no config passed the check on any case")
    print("\nextend kernel sweep, TFLOP/s (default, best config, torch SDPA causal)")
    columns = ["case", "default config", "default", "best config", "best", "sdpa TFLOP/s", "best/sdpa"]
    columns += ["default/sdpa", "best/default", "configs ok", "wrong", "failed"]
    print_table([{c: "" if r.get(c) is None else r.get(c) for c in columns} for r in payload["rows"]], columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", help=f"case names (B x prefix + new), from: {', '.join(c.name for c in CASES)}")
    parser.add_argument("--layers", type=int, default=8, help="layers of the cache (default 8)")
    parser.add_argument("--warmup", type=int, default=100, help="do_bench warm-up per timing, ms")
    parser.add_argument("--rep", type=int, default=50, help="do_bench repetition time per timing, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-gib", type=int, default=32, help="page pool budget for the caches, GiB")
    parser.add_argument("--tma-only", action="store_true", help="leave out the configs without TMA")
    args = parser.parse_args()
    grid = [c for c in GRID if c.tma or not args.tma_only]
    cases = select(parser, args.cases, args.quick, {c.name: c for c in CASES}, QUICK, "cases")
    require_cuda("tools/tune_extend.py")

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    env = environment()
    config = {
        "cache": f"vkv KVCache, backend cuda, token-major, {args.layers} layers x 8 KV heads x head_dim 128",
        "cases": [c.name for c in cases],
        "grid": [name_of(c) for c in grid],
        "dtype": "bfloat16",
        "warmup_ms": args.warmup,
        "rep_ms": args.rep,
        "timer": "triton.testing.do_bench, median, eager",
        "tolerance_rel": TOLERANCE,
        "flops": "4 * Hq * D * sum(new * prefix + new * (new + 1) / 2)",
    }

    def save(payload: dict) -> None:
        payload = {"env": env, "config": config, **payload, "wall_s": time.perf_counter() - start}
        write_json("tune_extend", payload, RESULTS)

    log(f"{torch.cuda.get_device_name()}, {len(cases)} cases x {len(grid)} configs")
    pool = PagePool("cuda", budget_bytes=args.budget_gib << 30)
    try:
        payload = collect(
            cases,
            grid,
            pool=pool,
            timer=gpu_timer(args.warmup, args.rep),
            num_layers=args.layers,
            seed=args.seed,
            log=log,
            save=save,
        )
    finally:
        try:
            pool.close()
        except Exception as exc:  # noqa: BLE001 - the results are written already
            log(f"closing the page pool failed: {error_text(exc)}")
    log("wrote tools/results/tune_extend.json")
    report(payload, [c.name for c in cases])


if __name__ == "__main__":
    main()
