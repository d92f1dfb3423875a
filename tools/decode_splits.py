# SPDX-License-Identifier: Apache-2.0
"""Does choose_num_splits pick the best split count? vkv's decode at every power-of-two split count, per shape.

    python tools/decode_splits.py [--shapes 1x8192,8x512,1x2048,4x4096,1x65536] [--layers 8]

The shapes, caches, correctness check and timer (CUDA-graph replays) of bench/decode.py; for each shape, vkv's
decode at 1, 2, 4, ... splits up to one split per 128 tokens of the longest request (at most 256) and at the
heuristic's count. Writes tools/results/decode_splits.json and prints, per shape, the heuristic's count and time
against the best.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py, the benchmarks
import common  # noqa: E402
from decode import SHAPES, Bench, Shape, heuristic_splits, make_problem, parse_shape, run_vkv  # noqa: E402

from vkv import PagePool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def candidates(max_len: int, heuristic: int) -> list[int]:
    """Powers of two from 1 up to one split per 128 tokens of the longest request (at most 256), and the heuristic."""
    bound = max(1, min(256, max_len // 128))
    return sorted({1 << i for i in range(bound.bit_length()) if 1 << i <= bound} | {heuristic})


def sweep(bench: Bench, shape: Shape, log) -> dict:
    p = make_problem(bench, shape)
    try:
        chosen = heuristic_splits(p)
        splits = candidates(p.max_len, chosen)
        points = [{"num_splits": n, **common.attempt(lambda n=n: run_vkv(bench, p, n))} for n in splits]
    finally:
        p.close()
    timed = [m for m in points if m.get("ok")]
    best = min(timed, key=lambda m: m["us"]) if timed else None
    at = next((m for m in points if m["num_splits"] == chosen), {})
    row = {"shape": shape.name, "heuristic": chosen, "heuristic_us": at.get("us"), "best": best and best["num_splits"],
           "best_us": best and best["us"], "best_tbps": best and best["tbps"], "sweep": points}  # fmt: skip
    row["heuristic_vs_best"] = row["heuristic_us"] / row["best_us"] if row["heuristic_us"] and row["best_us"] else None
    log(f"{shape.name}: heuristic {chosen} splits ({row['heuristic_us'] or float('nan'):.1f} us), best {row['best']} "
        f"({row['best_us'] or float('nan'):.1f} us)")  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1x8192,8x512,1x2048,4x4096,1x65536", help="BATCHxLENGTH or names")
    parser.add_argument("--layers", type=int, default=8, help="layers of the cache (default 8)")
    parser.add_argument("--warmup", type=int, default=150, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-gib", type=int, default=48, help="page pool budget for the caches, GiB")
    args = parser.parse_args()
    known = {s.name: s for s in SHAPES}
    shapes = common.select(parser, args.shapes, False, known, (), "shapes", parse_shape)
    common.require_cuda("tools/decode_splits.py")
    start, log = time.perf_counter(), common.progress()
    pool = PagePool("cuda", budget_bytes=args.budget_gib << 30)
    timer = common.gpu_timer(args.warmup, args.rep, graph=True)
    bench = Bench(torch.device("cuda"), pool, timer, num_layers=args.layers, seed=args.seed)
    try:
        rows = [sweep(bench, shape, log) for shape in shapes]
    finally:
        pool.close()
    payload = {"env": common.environment(), "rows": rows, "wall_s": time.perf_counter() - start}
    print(f"wrote {common.write_json('decode_splits', payload, RESULTS)}")
    columns = ["shape", "heuristic", "heuristic_us", "best", "best_us", "best_tbps", "heuristic_vs_best"]
    common.print_table(rows, columns)


if __name__ == "__main__":
    main()
