# SPDX-License-Identifier: Apache-2.0
"""Several models on one GPU through `vkv serve`: time to first token under bursty load, static KV split against
vkv elastic, over a sweep of peak rates (kvcached's setting). The scenario and its runner are vkv.demo's.

    python bench/multimodel.py [--peaks 12,16,20] [--skew] [--mode one-process|processes] [--gpu-gib 80]
                               [--prompt 256] [--output 256] [--max-num-seqs 256] [--ramp 1] [--stagger S]
                               [--tiny] [--serve-args="..."] [--out PATH] [--keep]

Three Llama-3.1-8B-shaped random models (bf16; --tiny: tiny-llama on the CPU). Memory emulates a --gpu-gib GPU: the
KV budget of all models is what is left beside their weights and --work-gib of working memory (each process's, with
--mode processes), split equally under "static". Each model's rate ramps 0 -> peak -> 1 request/s at +-1 request/s
per second (--ramp), the models' ramps --stagger seconds apart (default: 2 x peak / ramp, the next ramp starting as
the last model's load ends, at every peak: vkv.demo.apart_stagger_s; --tiny: the CPU scenario's 2.5 s); --skew
scales the peaks by 1, 1/2, 1/4 (popularity). Per peak and policy: TTFT mean / P50 / P99, time per output token,
throughput, preemptions, requests lost, time to ready, and the first-token latency of a request to an idle model (its
pages given back) against a warm one. Writes bench/results/multimodel.json, a PNG of TTFT against load, and each
run's memory-over-time PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from common import RESULTS, environment, print_table

from vkv.allocator import InvalidRequestError
from vkv.demo import WORK_BYTES, Scenario, apart_stagger_s, device_memory_bytes, gpu_scenario, run

PER_REQUEST = ("samples", "idle_probe", "requests_timed", "server_logs")  # in the per-peak JSON, not in the rows


def plot_ttft(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, style in (("static", "--"), ("elastic", "-")):
        mine = [r for r in rows if r["policy"] == policy]
        for key, marker in (("ttft_p99_s", "o"), ("ttft_mean_s", "s")):
            ax.plot([r["peak"] for r in mine], [r[key] for r in mine], style, marker=marker,
                    label=f"{policy} {key.split('_')[1]}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("peak rate a model, requests/s")
    ax.set_ylabel("time to first token, s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peaks", default="12,16,20", help="peak rates a model, requests/s (one run each)")
    parser.add_argument("--skew", action="store_true", help="popularity 1, 1/2, 1/4 of the peak")
    parser.add_argument("--mode", choices=("one-process", "processes"), default="one-process")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="the GPU emulated: weights + KV + work")
    parser.add_argument(
        "--work-gib", type=float, default=WORK_BYTES / 2**30,
        help="working memory beside weights and KV, a process's (three of them with --mode processes)",
    )  # fmt: skip
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256, help="requests a model runs at once (not --tiny)")
    parser.add_argument("--ramp", type=float, default=1.0)
    parser.add_argument(
        "--stagger",
        type=float,
        default=None,
        help="seconds between the models' ramps (default: humps apart, 2 x peak / ramp; --tiny: 2.5)",
    )
    parser.add_argument("--tiny", action="store_true", help="vkv demo's CPU scenario, at these peaks")
    parser.add_argument(
        "--serve-args", default="", help='more `vkv serve` options for every server: --serve-args="--engine-process"'
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the rows of other peaks already in --out (same scenario, same --skew): a sweep over calls",
    )
    args = parser.parse_args()
    peaks = [float(p) for p in args.peaks.split(",")]
    weights = (1.0, 0.5, 0.25) if args.skew else (1.0, 1.0, 1.0)
    if args.tiny:
        base = Scenario(device="cpu")
    else:
        if (total := (device_memory_bytes() or 0) / 2**30) and total < args.gpu_gib:
            print(f"--gpu-gib {args.gpu_gib:g} is more than this GPU's {total:.1f} GiB: emulating {total:.1f}")
            args.gpu_gib = total
        try:  # with --mode processes, --work-gib for each process (gpu_scenario says why)
            gpu = gpu_scenario(args.mode, int(args.work_gib * 2**30), int(args.gpu_gib * 2**30))
        except InvalidRequestError as e:
            parser.error(str(e))
        base = replace(gpu, prompt_tokens=args.prompt, output_tokens=args.output,
                       max_seq_len=args.prompt + args.output + 16, max_num_seqs=args.max_num_seqs)  # fmt: skip
    base = replace(base, mode=args.mode, ramp=args.ramp, serve_args=tuple(args.serve_args.split()))
    out = args.out or RESULTS / ("multimodel-tiny.json" if args.tiny else "multimodel.json")
    scenario = json.loads(json.dumps({k: v for k, v in vars(base).items() if k != "names"}, default=str))
    if args.stagger is not None and args.stagger < 0:
        parser.error(f"--stagger must be >= 0 seconds, got {args.stagger}")
    if args.stagger is None and args.tiny:
        args.stagger = base.stagger_s  # the CPU scenario's own
    scenario["stagger_s"] = args.stagger  # None: the humps apart at each peak
    kept = []
    if args.keep and out.exists():  # a sweep split over calls: the other peaks' rows of the same scenario stay
        earlier = json.loads(out.read_text())
        same = earlier.get("scenario") == scenario and earlier.get("args", {}).get("skew") == args.skew
        kept = [r for r in earlier["rows"] if r["peak"] not in peaks] if same else []
        print(f"--keep: {len(kept)} rows of other peaks kept from {out}" if kept else f"--keep: none kept from {out}")
    env, rows, runs = environment(), [], []
    for peak in peaks:
        stagger = apart_stagger_s(peak, args.ramp) if args.stagger is None else args.stagger
        sc = replace(base, peaks=tuple(peak * w for w in weights), stagger_s=stagger)
        payload = run(sc, out.with_name(f"{out.stem}-peak{peak:g}.json"))
        print(f"peak {peak:g}: memory over time in {payload['png']}", flush=True)
        for r in payload["runs"]:
            if not args.tiny and (used := r["max_gpu_used_bytes"]) and used > args.gpu_gib * 2**30:
                print(f"peak {peak:g}, {r['policy']}: the GPU held {used / 2**30:.1f} GiB at most, more than the "
                      f"{args.gpu_gib:g} GiB emulated: the emulation did not hold (raise --work-gib)")  # fmt: skip
            probe = r["idle_probe"]
            rows.append({"peak": peak, "date": env["date"], "stagger_s": stagger,
                         **{k: v for k, v in r.items() if k not in PER_REQUEST},
                         "idle_ttft_s": probe["idle_ttft_s"], "warm_ttft_s": probe["warm_ttft_s"],
                         "idle_over_warm": probe["idle_over_warm"],
                         "max_gpu_gib": r["max_gpu_used_bytes"] and r["max_gpu_used_bytes"] / 2**30})  # fmt: skip
        runs.append(payload)
    lost = any(r["lost"] for r in rows)
    rows = sorted(kept + rows, key=lambda r: (r["peak"], r["policy"] != "static"))
    for peak in sorted({r["peak"] for r in rows}):
        s, e = (next(r for r in rows if r["peak"] == peak and r["policy"] == p) for p in ("static", "elastic"))
        if s["ttft_p99_s"] and e["ttft_p99_s"]:
            e["p99_static_over_elastic"] = s["ttft_p99_s"] / e["ttft_p99_s"]
            e["throughput_over_static"] = e["throughput_tok_s"] / s["throughput_tok_s"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "args": vars(args) | {"out": str(out)},
                               "scenario": scenario, "rows": rows}, indent=2, default=str))  # fmt: skip
    print(plot_ttft(rows, out.with_suffix(".png")))
    cols = ["peak", "policy", "requests", "lost", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s",
            "throughput_tok_s", "preemptions", "device_full", "forward_out_of_memory", "ready_s", "max_gpu_gib",
            "idle_over_warm", "p99_static_over_elastic", "throughput_over_static"]  # fmt: skip
    print_table(rows, cols)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
