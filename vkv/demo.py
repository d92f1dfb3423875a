# SPDX-License-Identifier: Apache-2.0
"""Several models on one device under bursty load, through the real server: static KV split against elastic.

The scenario of `vkv demo` and bench/multimodel.py. Each policy starts its own `vkv serve` process(es):
  static   each model a fixed, equal share of the KV budget (`--partition`; in "processes" mode, one process a
           model with a third of the budget), nothing borrowed
  elastic  one budget for all: one pool (mode "one-process") or one ledger (mode "processes"); a model grows
           into the pages the others released
A load generator in this process (asyncio + httpx, streaming, timed at the client) sends each model random
token prompts at a rate that ramps from 0 up to the model's peak and back down to ``floor`` requests/s at
``ramp`` requests/s per second, the models' ramps staggered; arrivals are Poisson at that rate (seeded). After
the load, a request to a model that has gone idle (its pages given back) is timed against one to a warm model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vkv.allocator import InvalidRequestError
from vkv.allocator.ledger_file import format_bytes
from vkv.environment import environment

POLICIES = ("static", "elastic")
MODES = ("one-process", "processes")
SAMPLE_S = 0.25  # how often /metrics is read for the memory plot
GPU_SAMPLE_EVERY = 4  # every 4th sample also reads the GPU's memory in use (nvidia-smi, a process each time)
PROBE_ROUNDS, PROBE_TOKENS = 3, 2  # the idle probe: rounds (idle, then warm), tokens a probe request asks for


@dataclass
class Scenario:
    """What runs: models, load, memory. Sizes in tokens and bytes; rates in requests/s."""

    model: str = "random:tiny-llama"  # every model's source (the models are copies with their own weights)
    num_models: int = 3
    peaks: tuple[float, ...] = (2.5, 2.5, 2.5)  # each model's peak rate
    ramp: float = 1.0  # rate change per second, up and down
    floor: float = 1.0  # the rate the ramp comes down to (then the model's load ends)
    stagger_s: float = 2.5  # model i's ramp starts at i * stagger_s
    prompt_tokens: int = 32
    output_tokens: int = 12
    kv_budget_bytes: int = 384 << 10  # all models together (static: an equal share each)
    page_size: int | None = 4096  # None: the device's (2 MiB)
    max_num_seqs: int = 32
    max_seq_len: int = 256
    max_num_batched_tokens: int = 1024
    mode: str = "one-process"
    idle_release_s: float = 1.0
    device: str | None = None  # default cuda if there is one
    seed: int = 0
    timeout_s: float = 600.0  # the whole run of a policy, at most
    serve_args: tuple[str, ...] = ()  # more `vkv serve` options, e.g. ("--graph-tokens", "0", "--compile")
    policies: tuple[str, ...] = POLICIES
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {MODES}, got {self.mode!r}")
        if unknown := set(self.policies) - set(POLICIES):
            raise InvalidRequestError(f"unknown policies {sorted(unknown)}; expected some of {POLICIES}")
        if len(self.peaks) != self.num_models or min(self.peaks) <= 0 or self.ramp <= 0 or self.floor <= 0:
            raise InvalidRequestError(
                f"peaks must give {self.num_models} positive rates, ramp and floor must be positive; got "
                f"{self.peaks}, {self.ramp}, {self.floor}"
            )
        self.names = [f"m{i}" for i in range(self.num_models)]

    def rate(self, model: int, t: float) -> float:
        """Requests/s of ``model`` at ``t`` seconds: up from 0 at ``ramp``, down to ``floor``, then 0 (done)."""
        t -= model * self.stagger_s
        peak = self.peaks[model]
        up = peak / self.ramp
        if t < 0:
            return 0.0
        if t < up:
            return self.ramp * t
        down = t - up
        return peak - self.ramp * down if down < (peak - self.floor) / self.ramp else 0.0

    def end(self, model: int) -> float:
        peak = self.peaks[model]
        return model * self.stagger_s + peak / self.ramp + (peak - self.floor) / self.ramp

    def arrivals(self) -> list[tuple[float, int]]:
        """(time, model) of every request: Poisson with the model's rate (thinning), seeded."""
        rng, out = random.Random(self.seed), []
        for m in range(self.num_models):
            top, t = self.peaks[m], m * self.stagger_s
            while True:
                t += rng.expovariate(top)
                if t >= self.end(m):
                    break
                if rng.random() * top < self.rate(m, t):
                    out.append((t, m))
        return sorted(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    names: list[str]


def start_servers(sc: Scenario, policy: str, workdir: Path) -> tuple[list[Server], float]:
    """The policy's `vkv serve` process(es), ready; returns them and the seconds from spawn to ready."""
    base = [
        sys.executable, "-m", "vkv.cli", "serve", "--max-num-seqs", str(sc.max_num_seqs), "--max-seq-len",
        str(sc.max_seq_len), "--max-num-batched-tokens", str(sc.max_num_batched_tokens), "--idle-release",
        str(sc.idle_release_s),
    ]  # fmt: skip
    base += ["--page-size", str(sc.page_size)] if sc.page_size else []
    base += ["--device", sc.device] if sc.device else []
    base += list(sc.serve_args)
    models = [f"{name}={sc.model}" for name in sc.names]
    groups: list[tuple[list[str], list[str]]] = []  # (models, extra args) a process
    if sc.mode == "one-process":
        split = ["--partition"] if policy == "static" else []
        groups.append((models, ["--budget", str(sc.kv_budget_bytes), *split]))
    else:
        ledger = str(workdir / f"ledger-{policy}")
        for spec in models:
            own = ["--budget", str(sc.kv_budget_bytes // sc.num_models)] if policy == "static" else []
            shared = ["--budget", str(sc.kv_budget_bytes), "--ledger", ledger] if policy == "elastic" else []
            groups.append(([spec], own + shared))
    servers, start = [], time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" or v}
    try:
        for i, (specs, extra) in enumerate(groups):
            port, log = _free_port(), workdir / f"{policy}-{i}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen([*base, *specs, *extra, "--port", str(port)], stdout=out,
                                        stderr=subprocess.STDOUT, cwd=workdir, env=env)  # fmt: skip
            servers.append(Server(proc, f"http://127.0.0.1:{port}", log, [s.split("=", 1)[0] for s in specs]))
        _wait_ready(servers, sc.timeout_s)
    except BaseException:
        stop_servers(servers)
        raise
    return servers, time.monotonic() - start


def _wait_ready(servers: list[Server], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    for server in servers:
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"vkv serve exited with {server.proc.returncode}: {server.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vkv serve not ready within {timeout_s} s: {server.log.read_text()[-2000:]}")
            time.sleep(0.1)


def _mapped_at_rest(servers: list[Server]) -> dict[str, float]:
    """Each model's mapped KV bytes when ready and holding no request (a CUDA-graph engine's padding slot)."""
    import httpx

    rest: dict[str, float] = {}
    for server in servers:
        rest |= read_metrics(httpx.get(f"{server.url}/metrics", timeout=30).text).get("vkv_kv_mapped_bytes", {})
    return rest


def stop_servers(servers: list[Server]) -> None:
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
    for server in servers:
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


_SAMPLE = re.compile(r'^(vkv_\w+)\{(?:model|budget)="([^"]+)"\} (\S+)$', re.M)
HELD = "vkv_kv_budget_held_bytes"  # {budget: bytes}: one consistent reading per budget (a ledger, or a pool)


def read_metrics(text: str) -> dict[str, dict[str, float]]:
    """{metric: {model: value}} of the per-model gauges in a /metrics page (``{budget: bytes}`` for HELD)."""
    out: dict[str, dict[str, float]] = {}
    for name, model, value in _SAMPLE.findall(text):
        out.setdefault(name, {})[model] = float(value)
    return out


@dataclass
class Result:
    model: int
    sent: float
    ttft: float | None = None
    done: float | None = None
    tokens: int = 0
    error: str | None = None


async def stream_tokens(http, url: str, body: dict) -> AsyncIterator[int]:
    """POST a streaming completion (``body``, stream on) to ``url`` (…/v1/completions) and yield the number of
    tokens each server-sent event carries, as it arrives. Raises RuntimeError on a status other than 200."""
    async with http.stream("POST", url, json={**body, "stream": True}) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield len(json.loads(line[6:])["choices"][0].get("token_ids", []))


async def _request(
    http, url: str, name: str, prompt: list[int], sc: Scenario, result: Result, start: float | None = None
) -> None:
    """One streaming request; TTFT and completion are timed from ``start`` (its scheduled arrival: a client that
    falls behind its schedule counts its delay) or from now."""
    body = {"model": name, "prompt": prompt, "max_tokens": sc.output_tokens, "temperature": 0, "ignore_eos": True}
    start = time.monotonic() if start is None else start
    try:
        async for n in stream_tokens(http, f"{url}/v1/completions", body):
            if n and result.ttft is None:
                result.ttft = time.monotonic() - start
            result.tokens += n
        result.done = time.monotonic() - start
        if result.tokens != sc.output_tokens:
            result.error = f"got {result.tokens} tokens, expected {sc.output_tokens}"
    except Exception as exc:  # noqa: BLE001 - recorded: a lost request
        result.error = f"{type(exc).__name__}: {exc}"


async def gpu_used_bytes() -> float | None:
    """Bytes in use on the servers' GPU, every process's (nvidia-smi's memory.used: contexts, torch's memory, the KV
    pages), read without a CUDA context of our own; None where nvidia-smi is missing, fails or takes over 5 s (it is
    killed), or CUDA_VISIBLE_DEVICES hides every GPU. The GPU is the first of CUDA_VISIBLE_DEVICES (an index or a
    UUID), as the servers see it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = "0" if visible is None else visible.split(",")[0].strip()
    if first in ("", "-1"):
        return None
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", first]
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 5.0)
        return float(out.split()[0]) * 2**20 if proc.returncode == 0 else None  # MiB
    except (asyncio.TimeoutError, ValueError, IndexError):
        return None
    finally:
        if proc.returncode is None:  # timed out (or cancelled): leave no nvidia-smi behind
            proc.kill()
            await proc.wait()


async def _load(sc: Scenario, servers: list[Server], progress) -> tuple[list[Result], list[dict], float]:
    import httpx

    url_of = {name: s.url for s in servers for name in s.names}
    rng = random.Random(sc.seed + 1)
    schedule = sc.arrivals()
    results: list[Result] = []
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=sc.timeout_s, limits=limits) as http:
        start = time.monotonic()
        stop = asyncio.Event()

        gpu_run = on_gpu(sc.device)

        async def sample() -> None:
            while not stop.is_set():
                t = time.monotonic() - start
                row: dict[str, Any] = {"t": t}
                # read beside the servers' metrics, not before them (nvidia-smi takes tens of milliseconds)
                gpu = (
                    asyncio.create_task(gpu_used_bytes()) if gpu_run and len(samples) % GPU_SAMPLE_EVERY == 0 else None
                )
                row["asked"], row["answered"] = len(servers), 0  # a reading counts only if every server answered
                for server in servers:
                    with contextlib.suppress(httpx.HTTPError):
                        metrics = read_metrics((await http.get(f"{server.url}/metrics")).text)
                        row["answered"] += 1
                        for key, per in metrics.items():
                            for model, value in per.items():  # servers sharing a ledger each read its total
                                seen = row.setdefault(key, {})
                                seen[model] = max(value, seen.get(model, 0.0)) if key == HELD else value
                if gpu is not None:
                    row["gpu_used_bytes"] = await gpu
                samples.append(row)
                progress(t, sum(r.done is not None or r.error is not None for r in results), len(schedule))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_S)

        sampler = asyncio.create_task(sample())
        tasks = []
        for at, m in schedule:
            delay = at - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = [rng.randrange(1, 100) for _ in range(sc.prompt_tokens)]
            result = Result(m, at)
            results.append(result)
            url = url_of[sc.names[m]]
            tasks.append(asyncio.create_task(_request(http, url, sc.names[m], prompt, sc, result, start + at)))
        await asyncio.gather(*tasks)
        took = time.monotonic() - start
        stop.set()
        await sampler
    return results, samples, took


async def _idle_probe(sc: Scenario, servers: list[Server], rest: dict[str, float]) -> dict:
    """First-token latency of a request to model 0 once it holds no request's page (idle: back to ``rest``, its
    mapped bytes when the server became ready), then of one to it warm; PROBE_ROUNDS times (the medians count:
    one first token is tens of milliseconds, within a single sample's noise). The probes ask for PROBE_TOKENS
    tokens: only the first is timed."""
    import httpx

    name, url = sc.names[0], next(s.url for s in servers if sc.names[0] in s.names)
    probe = replace(sc, output_tokens=min(PROBE_TOKENS, sc.output_tokens))
    prompt = list(range(1, sc.prompt_tokens + 1))
    idle_s, warm_s, before, errors = [], [], [], []
    async with httpx.AsyncClient(timeout=sc.timeout_s) as http:
        for _ in range(PROBE_ROUNDS):
            deadline, mapped = time.monotonic() + sc.idle_release_s + 30, None
            while time.monotonic() < deadline:
                mapped = read_metrics((await http.get(f"{url}/metrics")).text)["vkv_kv_mapped_bytes"].get(name)
                if mapped is not None and mapped <= rest[name]:
                    break
                await asyncio.sleep(0.1)
            idle, warm = Result(0, 0.0), Result(0, 0.0)
            await _request(http, url, name, prompt, probe, idle)
            await _request(http, url, name, prompt, probe, warm)
            before.append(mapped)
            idle_s += [idle.ttft] if idle.ttft else []
            warm_s += [warm.ttft] if warm.ttft else []
            errors += [r.error for r in (idle, warm) if r.error]
    idle_ttft = statistics.median(idle_s) if idle_s else None
    warm_ttft = statistics.median(warm_s) if warm_s else None
    return {"idle_mapped_bytes_before": max((b for b in before if b is not None), default=None),
            "mapped_bytes_at_rest": rest[name], "idle_ttft_s": idle_ttft, "warm_ttft_s": warm_ttft,
            "idle_over_warm": idle_ttft / warm_ttft if idle_ttft and warm_ttft else None,
            "idle_ttfts_s": idle_s, "warm_ttfts_s": warm_s, "errors": errors}  # fmt: skip


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _whole(samples: list[dict]) -> list[dict]:
    """The samples every server answered: only their budget readings add up to the whole."""
    return [s for s in samples if s.get("answered") == s.get("asked")]


def summarize(sc: Scenario, results: list[Result], samples: list[dict], took: float) -> dict:
    ok = [r for r in results if r.error is None and r.ttft is not None]
    ttft = [r.ttft for r in ok]
    tpot = [(r.done - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    budget = sc.kv_budget_bytes
    # What the budget bounds: per sample, the sum over budgets of each one's consistent reading. (Summing the
    # per-model mapped gauges instead would add up readings of several processes taken at different moments.)
    held = [sum(s.get(HELD, {}).values()) for s in _whole(samples)]
    last = samples[-1] if samples else {}
    return {
        "requests": len(results), "completed": len(ok), "lost": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None, "ttft_p50_s": _quantile(ttft, 0.5),
        "ttft_p99_s": _quantile(ttft, 0.99), "tpot_mean_s": statistics.fmean(tpot) if tpot else None,
        "throughput_tok_s": sum(r.tokens for r in ok) / took if took else None, "load_s": took,
        "preemptions": sum(last.get("vkv_preemptions", {}).values()),
        "device_full": sum(last.get("vkv_kv_device_full", {}).values()),  # growths the GPU had no memory for
        "forward_out_of_memory": sum(last.get("vkv_forward_out_of_memory", {}).values()),  # forwards it had none for
        "max_held_bytes": max(held, default=0), "budget_bytes": budget,
        "within_budget": max(held, default=0) <= budget,
        # the whole GPU's peak (every process, contexts included; None on the CPU), and each model's process's torch
        # peak: what the emulated GPU size must hold beside the KV
        "max_gpu_used_bytes": max((s["gpu_used_bytes"] for s in samples if s.get("gpu_used_bytes")), default=None),
        "torch_peak_reserved_bytes": last.get("vkv_torch_peak_reserved_bytes", {}),
        # each model's peaks over the samples: the KV its requests held (against a static share), the requests it
        # ran at once (against max_num_seqs) and those left waiting
        **{f"max_{key}": _peaks(samples, f"vkv_{metric}") for key, metric in _PEAKS},
    }  # fmt: skip


_PEAKS = (("in_use_bytes", "kv_in_use_bytes"), ("running", "requests_running"), ("waiting", "requests_waiting"))


def _peaks(samples: list[dict], metric: str) -> dict[str, float]:
    """Each model's largest reading of a per-model gauge over the samples."""
    out: dict[str, float] = {}
    for s in samples:
        for name, value in s.get(metric, {}).items():
            out[name] = max(out.get(name, value), value)
    return out


def run_policy(sc: Scenario, policy: str, workdir: Path, progress=lambda t, done, total: None) -> dict:
    servers, ready_s = start_servers(sc, policy, workdir)
    try:
        rest = _mapped_at_rest(servers)
        results, samples, took = asyncio.run(_load(sc, servers, progress))
        idle = asyncio.run(_idle_probe(sc, servers, rest))
    except Exception:  # a server that died takes its log with the temporary folder: say how it ended first
        stop_servers(servers)
        _say_logs(_server_logs(servers), f"{policy}: the run failed")
        raise
    finally:
        stop_servers(servers)
    summary = summarize(sc, results, samples, took)
    timings = [[r.model, round(r.sent, 3), r.ttft, r.done] for r in results]  # where the TTFT tail falls in the load
    out = {"policy": policy, "ready_s": ready_s, **summary, "idle_probe": idle, "samples": samples,
           "requests_timed": timings}  # fmt: skip
    if summary["lost"] or any(server.proc.returncode not in (0, -signal.SIGINT) for server in servers):
        out["server_logs"] = _server_logs(servers)  # why, for the reader
        _say_logs(out["server_logs"], f"{policy}: {summary['lost']} requests lost")
    return out


def _server_logs(servers: list[Server]) -> dict[str, str]:
    return {", ".join(s.names): _log_tail(s.log) for s in servers}


def _say_logs(logs: dict[str, str], lead: str) -> None:
    for names, tail in logs.items():
        print(f"{lead}; the log of `vkv serve` ({names}) ends:\n{tail}", file=sys.stderr)


def _log_tail(log: Path, lines: int = 30) -> str:
    """The end of a server's log: its warnings and errors first (those the engine logs), then its last lines."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    said = [line for line in text if any(word in line for word in ("WARNING", "ERROR", "Error", "Traceback"))]
    return "\n".join(dict.fromkeys(said[-lines:] + text[-lines:]))


def plot(runs: list[dict], sc: Scenario, path: Path) -> str:
    """Each model's mapped KV over time under each policy (and the budget) and, below, each request's TTFT at
    its arrival, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not installed ({exc})"
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 7), squeeze=False, sharey="row", sharex=True)
    for ax, run in zip(axes[1], runs, strict=True):
        for m, name in enumerate(sc.names):
            timed = [(sent, ttft) for model, sent, ttft, _ in run.get("requests_timed", []) if model == m and ttft]
            ax.scatter([t for t, _ in timed], [ttft for _, ttft in timed], s=4, label=name)
        if run.get("ttft_p99_s"):
            ax.axhline(run["ttft_p99_s"], color="k", ls="--", lw=1, label="p99")
        ax.set_yscale("log")
        ax.set_xlabel("arrival, s")
        ax.legend(fontsize=7)
    axes[1][0].set_ylabel("TTFT, s")
    for ax, run in zip(axes[0], runs, strict=True):
        for name in sc.names:
            t = [s["t"] for s in run["samples"]]
            ax.plot(t, [s.get("vkv_kv_mapped_bytes", {}).get(name, 0) / 2**20 for s in run["samples"]], label=name)
        whole = _whole(run["samples"])
        ax.plot([s["t"] for s in whole], [sum(s.get(HELD, {}).values()) / 2**20 for s in whole], color="k", lw=1,
                label="all, as the budget counts (mapped + pooled)")  # fmt: skip
        ax.axhline(sc.kv_budget_bytes / 2**20, color="k", ls="--", lw=1, label="budget (all)")
        if run["policy"] == "static":
            ax.axhline(sc.kv_budget_bytes / sc.num_models / 2**20, color="gray", ls=":", lw=1, label="a share")
        ax.set_title(f"{run['policy']}: TTFT p99 {run['ttft_p99_s'] or 0:.2f} s")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("KV mapped, MiB")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run(sc: Scenario, out: Path, show_progress: bool = True) -> dict:
    """Every policy of ``sc``, one after the other; writes ``out`` (JSON) and a PNG beside it."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="vkv-demo-") as tmp:
        for policy in sc.policies:
            bar = _progress(policy, sc) if show_progress else None
            try:
                runs.append(run_policy(sc, policy, Path(tmp), bar.update if bar else lambda *a: None))
            finally:
                if bar:
                    bar.close()
    payload = {"environment": run_environment(sc.device), "scenario": asdict(sc), "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    payload["png"] = plot(runs, sc, out.with_suffix(".png"))
    return payload


class _progress:
    """A progress bar (tqdm, on a terminal) of the requests done of those scheduled, with the seconds elapsed;
    elsewhere a line every ten seconds."""

    def __init__(self, policy: str, sc: Scenario):
        self.policy, self.total, self.bar, self.said = policy, len(sc.arrivals()), None, -10.0
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc=f"{policy:8s}", unit="req", leave=True)

    def update(self, t: float, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"{t:.0f} s", refresh=True)
        elif t - self.said >= 10:
            self.said = t
            print(f"{self.policy}: {done}/{self.total} requests done, {t:.0f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def table(payload: dict) -> str:
    cols = [
        ("policy", "policy", "{}", 1),
        ("ready s", "ready_s", "{:.1f}", 1),
        ("requests", "requests", "{}", 1),
        ("lost", "lost", "{}", 1),
        ("TTFT mean s", "ttft_mean_s", "{:.3f}", 1),
        ("TTFT p50 s", "ttft_p50_s", "{:.3f}", 1),
        ("TTFT p99 s", "ttft_p99_s", "{:.3f}", 1),
        ("TPOT ms", "tpot_mean_s", "{:.1f}", 1e3),
        ("tok/s", "throughput_tok_s", "{:.1f}", 1),
        ("preempted", "preemptions", "{:.0f}", 1),
        ("max KV MiB", "max_held_bytes", "{:.1f}", 2**-20),
        ("max GPU GiB", "max_gpu_used_bytes", "{:.1f}", 2**-30),
        ("idle/warm TTFT", "idle_over_warm", "{:.2f}", 1),
    ]  # (header, key, format, scale); fmt: skip
    rows = [[h for h, _, _, _ in cols]]
    for run in payload["runs"]:
        row = []
        for _, key, fmt, scale in cols:
            value = run["idle_probe"].get(key) if key == "idle_over_warm" else run.get(key)
            if value is not None and scale != 1:
                value *= scale
            row.append("n/a" if value is None else fmt.format(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def whole_pages(budget: int, models: int = 3, page: int = 2 << 20) -> int:
    """``budget`` rounded down to whole 2 MiB pages (the device's page) for each of ``models`` equal shares: a
    budget must be whole pages, the whole (elastic) and each static share (one server a model, "processes")."""
    return budget - budget % (page * models)


WEIGHTS_8B = 16_060_000_000  # bytes of a Llama-3-8B's weights in bf16
WORK_BYTES = 8 << 30  # a server process's working memory beside weights and KV (the GPU scenario's)


def on_gpu(device: str | None) -> bool:
    """Whether the servers run on a CUDA device: ``device`` names one, or is None (the default) and there is one."""
    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def run_environment(device: str) -> dict:
    """vkv.environment's record, and the device the run used (its name from its properties: no context)."""
    gpu = device == "cuda" and torch.cuda.is_available()
    name = torch.cuda.get_device_properties(torch.cuda.current_device()).name if gpu else platform.processor() or "cpu"
    return environment() | {"device": name}


def device_memory_bytes() -> int | None:
    """The current CUDA device's memory, None without one. Read from its properties (cudaGetDeviceProperties), not
    cudaMemGetInfo, which makes a context: the demo's own process (in mode "processes" only the servers use the
    GPU) should hold no device memory for asking."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def gpu_kv_budget(gpu_bytes: int = 80 << 30, work_bytes: int = WORK_BYTES, models: int = 3) -> int:
    """The KV budget of ``models`` Llama-3-8B-shaped models on a GPU of ``gpu_bytes`` (at most the device's own):
    what their weights and ``work_bytes`` of working memory leave, in whole pages for each static share."""
    if (total := device_memory_bytes()) is not None:
        gpu_bytes = min(gpu_bytes, total)
    kv = gpu_bytes - models * WEIGHTS_8B - work_bytes
    if kv <= 0:
        raise InvalidRequestError(
            f"a GPU of {format_bytes(gpu_bytes)} leaves no KV memory beside {models} x 16 GB of weights and "
            f"{format_bytes(work_bytes)} of working memory"
        )
    return whole_pages(kv, models)


def apart_stagger_s(peak: float, ramp: float = 1.0) -> float:
    """The stagger that keeps the models' humps apart at any peak: a hump rises for ``peak / ramp`` seconds and
    falls to the floor in less, so the next model's ramp starts as the last one's load ends. A fixed stagger
    overlaps the humps as the peak grows (24 s at a peak of 16: humps of 31 s); kvcached's staggered sweep scales
    its delay with the peak the same way (its rise x 2.25,
    https://github.com/ovg-project/kvcached/blob/main/benchmarks/bench_latency_benefit/run_sweep_staggered_7b.sh)."""
    return 2.0 * peak / ramp


def gpu_scenario(mode: str = "one-process", work_bytes: int = WORK_BYTES, gpu_bytes: int = 80 << 30) -> Scenario:
    """One load point of the real benchmark (bench/multimodel.py, its `multimodel_768` step): three
    Llama-3-8B-shaped models, prompts of 256 tokens and 768 out, peaks of 12 requests/s whose humps do not overlap
    (24 s apart, :func:`apart_stagger_s`), the KV budget what an 80 GB GPU (``gpu_bytes``, or the device, if
    smaller) leaves beside three models' weights (16 GB each) less 8 GB of working memory. A static third of that
    budget (9 GiB, 128 KiB a token) holds about 72 such requests; a model at its peak held up to 18.5 GiB under
    elastic on an H100, twice a share, which the whole budget holds, and compute had room (short prompts): memory
    binds a static share and nothing binds the elastic one. With outputs of 512 no share ran out and the policies
    were even; with prompts of 2,048 compute queued both (bench/results/multimodel-512.json, multimodel-long.json).
    In ``mode`` "processes" each of the three servers keeps ``work_bytes`` of working memory (a CUDA context,
    activations, graph pools of its own), so the KV budget is smaller: with one process's 8 GB among three, the
    forwards ran out of memory (docs/serving.md)."""
    processes = 3 if mode == "processes" else 1
    return Scenario(
        model="random:llama-3-8b", peaks=(12.0,) * 3, stagger_s=apart_stagger_s(12.0), prompt_tokens=256,
        output_tokens=768, kv_budget_bytes=gpu_kv_budget(gpu_bytes, processes * work_bytes), mode=mode, page_size=None,
        max_num_seqs=256, max_seq_len=256 + 768 + 16, max_num_batched_tokens=4096, idle_release_s=2.0, device="cuda",
    )  # fmt: skip
