# SPDX-License-Identifier: Apache-2.0
"""Where an engine decode step's time goes: host phases against the GPU's own time, per batch size.

    python tools/engine_steps.py [--batches 1,8,32,128] [--context 2048] [--steps 64] [--profile-batch 32]
        [--mixed CHUNK [--graph-tokens N]]

A random Llama-3-8B-shaped model (bf16) in one Engine as bench/serve.py builds it (CUDA-graph decode, warmed up).
Per batch size B: B requests of --context prompt tokens are prefilled, then --steps steady decode steps are timed
whole (Engine.step) and by phase (the scheduler, the plan, the model runner's forward without the sampling, the
sampling with its device-to-host read); the captured graph of the step's bucket is then replayed alone (the GPU's
time a step). host overhead = step - GPU. For --profile-batch, torch.profiler's kernel table of 8 steps (where the
GPU time goes: GEMMs, vkv's attention, the small element-wise kernels). Writes tools/results/engine_steps.json
(engine_steps-compiled.json with --compile). With --mixed CHUNK the steps timed and profiled are steps that
prefill: beside the B decoding requests, one long prompt comes in chunks of CHUNK tokens a step (the served load's
steps with --prefill-with-decode CHUNK); --graph-tokens N captures those steps per token bucket (Engine's
graph_tokens), and the GPU's time a step is then the bucket's graph replayed (engine_steps-mixed*.json).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import environment, print_table  # noqa: E402

import vkv.engine.engine as engine_module  # noqa: E402
from vkv.engine import Engine, SamplingParams  # noqa: E402
from vkv.engine.presets import preset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(spent: dict[str, float], name: str, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    return run


def admit(engine: Engine, batch: int, context: int, tokens: int, mixed: int, seed: int = 7) -> None:
    """``batch`` requests of ``context`` prompt tokens, prefilled to their first token; with ``mixed``, enough
    prompts more (of ``context`` tokens) to prefill ``mixed`` tokens in each of the next ``tokens`` steps."""
    params = SamplingParams(max_tokens=tokens + 16, temperature=0, ignore_eos=True)
    requests = [engine.add_request([(seed * i + j) % 100 + 1 for j in range(context)], params) for i in range(batch)]
    while any(not r.output_ids for r in requests):  # prefill (and the first token) of every request
        engine.step()
        if failed := [r.error for r in requests if r.error]:
            raise RuntimeError(f"a request failed: {failed[0]}")
    if mixed:  # prompts of ``context`` tokens, one output token each: they prefill in turn, ``mixed`` a step
        once = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for i in range(-(-(tokens + 2) * mixed // context)):
            engine.add_request([(3 * i + j) % 100 + 1 for j in range(context)], once)
        engine.step()  # the first chunk: the steps timed below each prefill ``mixed`` prompt tokens
    torch.cuda.synchronize()


def measure(engine: Engine, batch: int, context: int, steps: int, spent: dict[str, float], mixed: int = 0) -> dict:
    admit(engine, batch, context, steps, mixed)
    spent.clear()
    counted = engine.clock.kinds["mixed"][0]
    began = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step = (time.perf_counter() - began) / steps
    row = {"batch": batch, "step_ms": step * 1e3} | {f"{k}_ms": v / steps * 1e3 for k, v in spent.items()}
    runner = engine.runner
    if mixed:
        row["tokens"] = batch + mixed
        row["mixed_steps"] = engine.clock.kinds["mixed"][0] - counted  # of the steps timed: all of them
        graph = runner.mixed_graphs.get(runner.token_bucket(batch + mixed))
    else:
        graph = runner.graphs.get(runner.bucket(batch))
    if graph is not None and graph.graph is not None:
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            graph.graph.replay()
        torch.cuda.synchronize()
        row["gpu_ms"] = (time.perf_counter() - began) / steps * 1e3
        row["host_overhead_ms"] = row["step_ms"] - row["gpu_ms"]
    while engine.has_work():
        engine.step()
    return row


def profile(engine: Engine, batch: int, context: int, mixed: int = 0) -> list[dict]:
    admit(engine, batch, context, 24, mixed, seed=5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_work():
        engine.step()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[event.name[:70]]
            entry[0] += getattr(event, "device_time_total", event.cuda_time_total) / 8 / 1e3  # ms a step
            entry[1] += 1
    rows = [{"kernel": k, "ms_a_step": v[0], "launches_a_step": v[1] / 8} for k, v in kernels.items()]
    return sorted(rows, key=lambda r: -r["ms_a_step"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--profile-batch", type=int, default=32, help="0: no profile")
    p.add_argument("--compile", action="store_true", help="Engine(compile=True): torch.compile the layers")
    p.add_argument("--mixed", type=int, default=0, help="steps that also prefill CHUNK prompt tokens (0: decode)")
    p.add_argument("--graph-tokens", type=int, default=0, help="Engine(graph_tokens=N), with --mixed")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    config = preset("llama-3-8b")
    config.max_position_embeddings = 4096
    engine = Engine(copy.deepcopy(config), name="llama-3-8b", max_num_seqs=128, compile=args.compile,
                    max_seq_len=args.context + args.steps + 64, max_num_batched_tokens=8192,
                    prefill_with_decode=args.mixed or None, graph_tokens=args.graph_tokens)  # fmt: skip
    print(f"warm-up {engine.warm_up():.1f} s ({engine.runner.captures} graphs)", flush=True)
    spent: dict[str, float] = defaultdict(float)
    engine.scheduler.schedule = timed(spent, "schedule", engine.scheduler.schedule)
    engine.runner.wrapper.plan = timed(spent, "plan", engine.runner.wrapper.plan)
    engine.runner.forward = timed(spent, "forward", engine.runner.forward)
    engine_module.sample = timed(spent, "sample", engine_module.sample)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        measure(engine, batch, args.context, 8, spent, args.mixed)  # first: anything compiled on first use
        rows.append(measure(engine, batch, args.context, args.steps, spent, args.mixed))
        print(rows[-1], flush=True)
    try:
        kernels = profile(engine, args.profile_batch, args.context, args.mixed) if args.profile_batch else []
    except Exception as exc:  # noqa: BLE001 - the phases above still count
        print(f"profile failed: {type(exc).__name__}: {exc}", flush=True)
        kernels = []
    engine.close()
    print_table(rows, list(rows[0]))
    print_table(kernels[:25], ["kernel", "ms_a_step", "launches_a_step"])
    if kernels:
        print(f"kernels' time a step: {sum(k['ms_a_step'] for k in kernels):.2f} ms (batch {args.profile_batch})")
    RESULTS.mkdir(exist_ok=True)
    name = "engine_steps" + (f"-mixed{args.mixed}" if args.mixed else "") + ("-graphs" if args.graph_tokens else "")
    out = RESULTS / (name + ("-compiled" if args.compile else "") + ".json")
    out.write_text(json.dumps({"environment": environment(), "config": vars(args), "rows": rows,
                               "kernels": kernels}, indent=2, default=str))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
