# SPDX-License-Identifier: Apache-2.0
"""The serving engine on a Llama-3-8B-shaped model: offline throughput, decode steps against their bound,
transformers' generate_batch on the same requests, and the same load through `vkv serve`.

    python bench/serve.py [--requests 512] [--prompt 1024] [--output 256] [--steps 1,8,32,128]
                          [--baseline-requests 32] [--streams 64] [--only offline,steps,baseline,server]
                          [--max-num-seqs 128] [--compile] [--prefill-with-decode N] [--graph-tokens N]
                          [--engine-process]
                          [--both-servers] [--tiny] [--out PATH]

A random-init model (vkv.engine.presets llama-3-8b, bf16; --tiny: tiny-llama, float32 on the CPU) in one Engine
(grouped layout, CUDA-graph decode on a GPU), warmed up first (every graph captured). Prompts are random tokens,
lengths uniform in [prompt/2, 3 prompt/2], seeded; every request generates exactly --output tokens (ignore_eos).
  offline   all --requests at once through Engine.generate: output tokens/s, total tokens/s
  steps     B requests of 2048-token prompts (--steps B,...), 64 new tokens: decode step = (t(64) - t(1)) / 63,
            against its bandwidth bound (weights + the KV the step reads, at the copy bandwidth measured here)
  baseline  the first --baseline-requests requests through transformers' generate_batch (sdpa, its paged cache)
            and through the engine (compiled with --compile; transformers runs the layers eagerly): end-to-end output
            tokens/s of each (one call each, after warm-up)
  server    the --requests through `vkv serve` (uvicorn on 127.0.0.1, in this process; --engine-process: the engine
            built again in a process of its own, `vkv serve --engine-process`; --both-servers: in this process, then
            from an engine process, each against its own offline run) by --streams concurrent streaming clients
            (httpx, in a process of their own: they take no GIL from the server), against the engine offline at
            the same concurrency (max_num_seqs = --streams): the server's cost, the inter-token latency the clients
            see (p10, p50, p99) beside the offline run's (as the engine hands tokens out: a tail in both comes from
            the steps), and per run its steps, their mean time and tokens, and within a step the stepping thread's
            wall (in_step_ms) and CPU time and the forward's span on the GPU (Engine.stats()'s clock). A step that
            prefills 8192 prompt tokens stalls every stream for it: --prefill-with-decode caps a decoding step's
            prompt tokens (both runs). Each in-process run's "tail": its steps by kind (wall, CPU, the GPU's span,
            quantiles), the slow ones (over 1.4x the median step) and the garbage collections within them, and
            offline the share of token gaps longer than one step (StepTrace)
Writes bench/results/serve.json (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import json
import multiprocessing
import os
import random
import socket
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import RESULTS, StepTrace, copy_tbps, environment, gpu_timer, print_table, quantiles_ms  # noqa: E402

from vkv.engine import Engine, SamplingParams  # noqa: E402
from vkv.engine.clock import KINDS  # noqa: E402
from vkv.engine.presets import preset  # noqa: E402
from vkv.server.launch import freeze_heap  # noqa: E402

GIB = 1 << 30


def prompts(n: int, mean: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(max(1, mean // 2), max(1, 3 * mean // 2)))]
            for _ in range(n)]  # fmt: skip


def timed_generate(engine: Engine, batch: list[list[int]], new: int, on_output=None) -> float:
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    sync()
    start = time.perf_counter()
    outs = engine.generate(batch, params, on_output=on_output)
    sync()
    took = time.perf_counter() - start
    bad = [o for o in outs if o.num_output_tokens != new or o.finish_reason != "length"]
    if bad:
        raise RuntimeError(f"{len(bad)} requests did not generate {new} tokens: {bad[0]}")
    return took


def offline_gaps(engine: Engine, batch: list[list[int]], new: int) -> tuple[float, list[float], list[int]]:
    """timed_generate, timing each request's tokens as the engine hands them out: (seconds, the gaps between a
    request's tokens, the same gaps in steps). The server rows' offline twin: a tail the clients see that is here
    too comes from the steps, not from the server."""
    last, gaps, steps = {}, [], []

    def heard(output) -> None:
        now = time.perf_counter(), engine.steps
        if output.new_token_ids and output.request_id in last:
            gaps.append(now[0] - last[output.request_id][0])
            steps.append(now[1] - last[output.request_id][1])
        last[output.request_id] = now

    return timed_generate(engine, batch, new, heard), gaps, steps


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_offline(engine: Engine, reqs: list[list[int]], new: int) -> dict:
    took = timed_generate(engine, reqs, new)
    out_tokens, in_tokens = len(reqs) * new, sum(map(len, reqs))
    return {"what": "offline", "requests": len(reqs), "seconds": took, "output_tok_s": out_tokens / took,
            "total_tok_s": (out_tokens + in_tokens) / took, "preemptions": engine.scheduler.preemptions}  # fmt: skip


def run_steps(
    engine: Engine, batches: list[int], weights: int, tbps: float | None, vocab: int, context: int = 2048, new: int = 64
) -> list[dict]:
    """Decode steps at each batch size: B prompts of ``context`` tokens, a step's time from two generate calls
    ((T(new) - T(1)) / (new - 1)), against the bound of the bytes it reads (``weights``, and the KV this engine's
    cache holds for B requests at their mean length) at ``tbps``."""
    rows = []
    token_bytes = engine.kv.config.token_bytes
    for b in batches:
        if b > engine.scheduler.max_num_seqs:
            rows.append({"what": f"step B={b}", "error": f"above max_num_seqs {engine.scheduler.max_num_seqs}"})
            continue
        batch = prompts(b, context, vocab, seed=b)
        batch = [p[:context] + [1] * (context - len(p)) for p in batch]  # exactly `context` tokens each
        timed_generate(engine, batch, new)  # untimed: whatever this batch size compiles on first use
        t1 = timed_generate(engine, batch, 1)
        tn = timed_generate(engine, batch, new)
        step = (tn - t1) / (new - 1)
        kv = b * (context + new / 2) * token_bytes
        bound = (weights + kv) / (tbps * 1e12) if tbps else None
        row = {"what": f"step B={b}", "step_ms": step * 1e3, "decode_tok_s": b / step}
        rows.append(row | ({"bound_ms": bound * 1e3, "of_bound": bound / step} if bound else {}))
    return rows


def run_baseline(engine: Engine, reqs: list[list[int]], new: int, log) -> list[dict]:
    """The engine on ``reqs`` (its layers compiled where it compiles them), then transformers' generate_batch on the
    same requests and model with the layers eager (runner.eager(): compiled, they reach only the engine's cache)."""
    import transformers
    from transformers import GenerationConfig

    vkv_s = timed_generate(engine, reqs, new)
    model = engine.model
    fields = {f.name for f in dataclasses.fields(transformers.ContinuousBatchingConfig)}
    attn = "sdpa" if "auto_switch_to_flash" in fields else "paged|sdpa"
    options = {k: v for k, v in {"auto_switch_to_flash": False}.items() if k in fields}
    model.set_attn_implementation(attn)
    try:
        log(f"generate_batch: {len(reqs)} requests x {new} tokens (one call)")
        sync()
        start = time.perf_counter()
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False)
        batching = transformers.ContinuousBatchingConfig(**options)
        with engine.runner.eager():
            out = model.generate_batch(inputs=reqs, generation_config=config, continuous_batching_config=batching)
        sync()
        hf_s = time.perf_counter() - start
        got = sum(len(r.generated_tokens) for r in out.values())
    finally:
        model.set_attn_implementation("vkv")
        getattr(model, "destroy_cached_continuous_batching_manager", lambda: None)()
    tokens = len(reqs) * new
    what = "baseline: vkv engine" + (" (compiled)" if engine.runner.compiled else "")
    ours = {"what": what, "requests": len(reqs), "seconds": vkv_s, "output_tok_s": tokens / vkv_s}
    if got < tokens:  # its requests failed (it logs why)
        return [ours, {"what": "baseline: generate_batch", "error": f"generated {got} of {tokens} tokens"}]
    return [
        ours, {"what": "baseline: generate_batch", "requests": len(reqs), "seconds": hf_s, "output_tok_s": got / hf_s},
        {"what": "vkv / generate_batch", "x": (tokens / vkv_s) / (got / hf_s)},
    ]  # fmt: skip


def client_load(url: str, model: str, reqs: list[list[int]], new: int, streams: int) -> tuple[float, list[float], int]:
    """--streams streaming clients (httpx) share the requests; (seconds, inter-token gaps, tokens). Run in a process
    of its own: the clients' Python does not compete with the server's and the engine's for the GIL."""
    import httpx

    from vkv.demo import stream_tokens

    gaps: list[float] = []
    counted = [0]

    async def client(queue: asyncio.Queue, http: httpx.AsyncClient) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True}
            last = None
            async for n in stream_tokens(http, url, body):
                now = time.perf_counter()
                if n and last is not None:
                    gaps.append(now - last)
                last = now if n else last
                counted[0] += n

    async def load() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for p in reqs:
            queue.put_nowait(p)
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 8)) as http:
            start = time.perf_counter()
            await asyncio.gather(*(client(queue, http) for _ in range(streams)))
            return time.perf_counter() - start

    return asyncio.run(load()), gaps, counted[0]


def clock_delta(before: dict, after: dict) -> dict:
    """What an engine's stats() counted between two reads: its steps and its StepClock's sums."""
    keys = ("steps", "step_calls", "step_wall_s", "step_cpu_s", "forward_gpu_s", "forward_timed")
    kinds = tuple(f"{kind}_{name}" for kind in KINDS for name in ("steps", "wall_s"))
    return {k: after[k] - before[k] for k in keys + kinds}


def run_server(
    engine: Engine, reqs: list[list[int]], new: int, streams: int, cap: int | None, log, remote: dict | None = None
) -> list[dict]:
    """The server rows. ``remote``: {"spec", "args"} of the same engine built again in an engine process for the
    server run (RemoteGroup; this one is closed first, to give the GPU memory back)."""
    import uvicorn

    from vkv.server import create_app
    from vkv.server.remote import RemoteGroup

    seqs = engine.scheduler.max_num_seqs
    engine.scheduler.max_num_seqs = min(seqs, streams)
    engine.scheduler.prefill_with_decode = cap  # (the steps rows time pure decode: their prefill is not capped)
    target, group = engine, None
    try:
        before = engine.stats()
        with StepTrace(engine) as offline_trace:
            offline, offline_gaps_s, gap_steps = offline_gaps(engine, reqs, new)
        offline_clock = clock_delta(before, engine.stats())
        if remote is not None:
            engine.close()
            log("server: the engine built again in a process of its own")
            args = remote["args"] | {"max_num_seqs": min(seqs, streams), "prefill_with_decode": cap}
            group = RemoteGroup([remote["spec"]], args)
            target = group.engines[0]
        before = target.stats()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        uv = uvicorn.Server(uvicorn.Config(create_app(group or engine), log_level="warning"))
        thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not uv.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
        log(f"server: {len(reqs)} requests by {streams} streaming clients (a process of their own)")
        with (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients,
              StepTrace(engine) if group is None else contextlib.nullcontext() as served_trace):  # fmt: skip
            served, gaps, counted = clients.submit(client_load, url, engine.name, reqs, new, streams).result()
        served_clock = clock_delta(before, target.stats())
        uv.should_exit = True
        thread.join(30)
    finally:
        engine.scheduler.max_num_seqs, engine.scheduler.prefill_with_decode = seqs, None
        if group is not None:
            group.close()
    tokens = len(reqs) * new
    if counted != tokens:
        raise RuntimeError(f"the clients got {counted} tokens, expected {tokens}")
    # p10 next to p50 and p99: tokens that arrive bunched (a gap of two steps, then one of ~0) show as a low p10
    p10, p50, p99 = quantiles_ms(gaps, 10, 50, 99)
    o10, o50, o99 = quantiles_ms(offline_gaps_s, 10, 50, 99)

    # where a cost comes from: more steps (fewer requests in each: the gaps between a client's requests) or longer
    # steps (the server's Python delaying the engine's thread); and within a step (the engine's StepClock): the
    # stepping thread's wall and CPU time in step() and the forward's span on the GPU, each a step
    # (in_step_ms and step_cpu_ms: a step() call, a batch or not; forward_gpu_ms: a forward read in the run)
    def phase(seconds: float, clock: dict) -> dict:
        steps, calls, timed = (max(clock[k], 1) for k in ("steps", "step_calls", "forward_timed"))
        return {"steps": clock["steps"], "step_ms": seconds / steps * 1e3, "tokens_per_step": tokens / steps,
                "in_step_ms": clock["step_wall_s"] / calls * 1e3, "step_cpu_ms": clock["step_cpu_s"] / calls * 1e3,
                "forward_gpu_ms": clock["forward_gpu_s"] / timed * 1e3 if clock["forward_timed"] else None,
                "mixed_steps": clock["mixed_steps"],  # steps that also prefill, and each kind's mean wall
                **{f"{kind}_step_ms": clock[f"{kind}_wall_s"] / clock[f"{kind}_steps"] * 1e3 if clock[f"{kind}_steps"]
                   else None for kind in KINDS}}  # fmt: skip

    return [
        {"what": f"offline at {streams} concurrent{' (for the engine process)' if remote else ''}", "seconds": offline,
         "output_tok_s": tokens / offline, "itl_p10_ms": o10, "itl_p50_ms": o50, "itl_p99_ms": o99,
         "p99_over_p50": o99 / o50 if o50 else None, **phase(offline, offline_clock),
         "tail": offline_trace.summary(gap_steps)},
        {"what": f"server, {streams} streams{' (engine process)' if remote else ''}", "seconds": served,
         "output_tok_s": tokens / served, "server_cost": 1 - offline / served, "itl_p10_ms": p10, "itl_p50_ms": p50,
         "itl_p99_ms": p99, "p99_over_p50": p99 / p50 if p50 else None, **phase(served, served_clock),
         **({"tail": served_trace.summary()} if served_trace is not None else {})},
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=1024, help="mean prompt tokens")
    parser.add_argument("--output", type=int, default=256, help="tokens each request generates")
    parser.add_argument("--steps", default="1,8,32,128", help="batch sizes of the decode-step rows")
    parser.add_argument("--baseline-requests", type=int, default=32)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--only", default="offline,steps,baseline,server")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="tiny-llama (the CPU: float32 in the interpreter)")
    parser.add_argument("--compile", action="store_true", help="Engine(compile=True): torch.compile the layers")
    parser.add_argument("--prefill-with-decode", type=int, default=None, help="the server rows' prefill_with_decode")
    parser.add_argument(
        "--graph-tokens", type=int, default=None, help="Engine(graph_tokens=N): prefill steps as graphs (0: eager)"
    )
    parser.add_argument("--engine-process", action="store_true", help="the server rows: vkv serve --engine-process")
    parser.add_argument(
        "--both-servers",
        action="store_true",
        help="the server rows twice: in this process, then from an engine process (one run)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    only = set(args.only.split(","))
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("the 8B-shaped model needs a CUDA GPU; --tiny runs on the CPU")
    config = preset("tiny-llama" if args.tiny else "llama-3-8b")
    config.max_position_embeddings = 4096
    engine = Engine(copy.deepcopy(config), name="llama-3-8b" if not args.tiny else "tiny-llama",
                    max_num_seqs=args.max_num_seqs, max_seq_len=max(2048 + 64, 2 * args.prompt + args.output) + 8,
                    max_num_batched_tokens=8192, compile=args.compile, graph_tokens=args.graph_tokens)  # fmt: skip
    weights = sum(t.numel() * t.element_size() for t in engine.model.parameters())
    tbps = copy_tbps(gpu_timer()) if cuda else None
    log(f"model {weights / GIB:.2f} GiB; copy {tbps or 0:.2f} TB/s; warm-up {engine.warm_up():.1f} s "
        f"({engine.runner.captures} graphs)")  # fmt: skip
    freeze_heap()  # as `vkv serve` does after its warm-up
    vocab = config.vocab_size
    reqs = prompts(args.requests, args.prompt, vocab)
    rows: list[dict] = []
    try:
        if "offline" in only:
            rows.append(run_offline(engine, reqs, args.output))
            log(f"offline: {rows[-1]}")
        if "steps" in only:
            rows += run_steps(engine, [int(b) for b in args.steps.split(",")], weights, tbps, vocab)
            log(f"steps: {rows[-4:]}")
        if "baseline" in only:
            rows += run_baseline(engine, reqs[: args.baseline_requests], args.output, log)
            log(f"baseline: {rows[-3:]}")
        if "server" in only:
            remote = {"spec": f"{engine.name}=random:{engine.name}", "args": {
                "max_seq_len": engine.max_seq_len, "max_num_batched_tokens": 8192, "compile": args.compile,
                "graph_tokens": args.graph_tokens,
                "device": "cuda" if cuda else "cpu"}} if args.engine_process or args.both_servers else None  # fmt: skip
            for where in [None, remote] if args.both_servers else [remote]:
                rows += run_server(engine, reqs, args.output, args.streams, args.prefill_with_decode, log, where)
                log(f"server: {rows[-2:]}")
    finally:
        out = args.out or RESULTS / ("serve-tiny.json" if args.tiny else "serve.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        config = vars(args) | {"weights_gib": weights / GIB, "copy_tbps": tbps, "out": str(out)}
        payload = {"environment": environment(), "config": config, "rows": rows}
        payload["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(payload, indent=2, default=str))
        log(f"wrote {out}")
        engine.close()
    cols = ["what", "requests", "seconds", "output_tok_s", "total_tok_s", "step_ms", "bound_ms", "of_bound", "x",
            "steps", "tokens_per_step", "in_step_ms", "step_cpu_ms", "forward_gpu_ms", "mixed_steps", "decode_step_ms",
            "mixed_step_ms", "server_cost", "itl_p10_ms",
            "itl_p50_ms", "itl_p99_ms", "p99_over_p50", "error"]  # fmt: skip
    print_table(rows, [c for c in cols if any(c in r for r in rows)])


if __name__ == "__main__":
    sys.exit(main())
