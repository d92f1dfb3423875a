# SPDX-License-Identifier: Apache-2.0
"""The vkv command line: ``vkv info``, ``vkv serve``, ``vkv demo``, and ``vkv top`` / ``vkv limit MODEL SIZE``
(their work is in vkv/top.py).

Exit status: 0 done; 1 a vkv error at run time, printed as ``vkv: <message>``; 2 bad arguments, with the
command's usage. No input gives a traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib import metadata
from pathlib import Path

import torch

from vkv.allocator import BACKENDS, InvalidRequestError, PagePool, VirtualRange, VkvError, get_driver
from vkv.allocator.ledger import format_bytes
from vkv.allocator.ledger_file import DIRECTORY_ENV
from vkv.top import limit, top


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def info(backend: str | None) -> dict:
    """Open the backend, map and check two pages through a pool, and report what was seen."""
    driver = get_driver(backend)
    free, total = driver.memory_info()
    pool = PagePool(driver, budget_bytes=4 * driver.page_size)
    with VirtualRange(pool, num_pages=4) as probe:
        probe.map([1, 3])
        view = probe.tensor()
        pattern = torch.arange(driver.page_size, device=driver.device, dtype=torch.int64).remainder_(251)
        view[driver.page_size : 2 * driver.page_size] = pattern.to(torch.uint8)
        ok = bool(view[driver.page_size : 2 * driver.page_size].eq(pattern.to(torch.uint8)).all())
        probe.unmap([1, 3])
        probe.map([0])  # served from the pool's free list, not created
        stats = pool.stats()
    pool.close()
    return {
        "vkv": _version("vkv"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda-python": _version("cuda-python"),
        "backend": driver.name,
        "device": torch.cuda.get_device_name(driver.device) if driver.name == "cuda" else "cpu (host mmap)",
        "page_size": driver.page_size,
        "memory_free": free,
        "memory_total": total,
        "probe_pages_ok": ok,
        "pool": {
            k: getattr(stats, k) for k in ("page_size", "budget_pages", "live", "in_use", "free", "created", "reused")
        },
    }


def _print_info(report: dict) -> None:
    gib = 1 << 30
    pool = report["pool"]
    rows = [
        (
            "vkv",
            f"{report['vkv']} (torch {report['torch']}, triton {report['triton']}, "
            f"cuda-python {report['cuda-python']})",
        ),
        ("backend", report["backend"]),
        ("device", report["device"]),
        ("page size", f"{report['page_size'] >> 10} KiB"),
        ("memory", f"{report['memory_free'] / gib:.1f} GiB free of {report['memory_total'] / gib:.1f} GiB"),
        ("probe", "mapped, written and read back 2 pages: " + ("ok" if report["probe_pages_ok"] else "MISMATCH")),
        (
            "pool",
            f"budget {pool['budget_pages']} pages, live {pool['live']}, in use {pool['in_use']}, free {pool['free']}, "
            f"created {pool['created']}, reused {pool['reused']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """Bytes in ``8GiB``, ``512MiB``, ``1.5G`` (K/M/G/T and KiB/.. are binary, KB/MB/.. decimal), ``4096``;
    None for ``none`` (no limit). Raises ValueError."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)b?|b?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"bad size {text!r}: expected a number of bytes or a size like 8GiB, 512MiB, 1.5G, or none")
    number, unit, binary = match.groups()
    unit = (unit or "").lower()
    decimal = unit and not binary and text.strip().lower().endswith("b")  # KB, MB, GB, TB: powers of 1000
    scale = 1000 ** ("kmgt".index(unit) + 1) if decimal else _UNITS[unit]
    return int(float(number) * scale) if "." in number else int(number) * scale


MAX_SIZE = (1 << 63) - 1  # the ledger counts in signed 64-bit integers


def _size(text: str) -> int | None:
    """parse_size for argparse: a bad or too large size is a usage error (exit 2)."""
    try:
        nbytes = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if nbytes is not None and nbytes > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is too large: expected at most {MAX_SIZE} bytes (8 EiB)")
    return nbytes


MAX_INTERVAL_S = 86400.0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_INTERVAL_S:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be > 0 and at most {MAX_INTERVAL_S:.0f} seconds, got {text}")
    return value


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`vkv serve`: build the engines (one pool), serve until interrupted, close them. With --tensor-parallel N,
    ranks 1..N-1 are spawned first and follow this process's (rank 0's) engines."""
    if not torch.cuda.is_available() or (args.device or "").startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run in Triton's interpreter: before they load
    try:
        from vkv.server import serve as run_server
        from vkv.server.launch import (
            build_engines,
            close_engines,
            freeze_heap,
            log_to_stderr,
            start_tensor_parallel,
            stop_tensor_parallel,
        )
        from vkv.server.remote import EngineProcessError, RemoteGroup
    except ImportError as e:
        print(f'vkv serve needs the serving extras: pip install "vkv[serve]" ({e})', file=sys.stderr)
        return 1
    log_to_stderr()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    build_args = {
        "budget_bytes": args.budget, "dtype": dtype, "page_size": args.page_size, "partition": args.partition,
        "ledger": args.ledger, "max_num_seqs": args.max_num_seqs, "max_seq_len": args.max_seq_len,
        "max_num_batched_tokens": args.max_num_batched_tokens, "idle_release_s": args.idle_release,
        "prefill_with_decode": args.prefill_with_decode, **({"compile": True} if args.compile else {}),
        **({"graph_tokens": args.graph_tokens} if args.graph_tokens is not None else {}),
    }  # fmt: skip
    if args.engine_process and args.tensor_parallel != 1:
        parser.error("--engine-process and --tensor-parallel do not go together yet")
    engines, followers, group = [], [], None
    try:
        if args.engine_process:  # built, warmed up and stepped in a process of their own
            group = served = RemoteGroup(args.models, {**build_args, "device": args.device})
            for engine in group.engines:
                print(f"vkv serve: {engine.name} warmed up in {engine.warm_up_s:.1f} s (engine process)", flush=True)
            shares = [e.budget_bytes for e in group.engines] if args.partition else [group.engines[0].budget_bytes]
            names = [e.name for e in group.engines]
        else:
            tp, followers, device = start_tensor_parallel(args.tensor_parallel, args.models, build_args, args.device)
            engines = served = build_engines(args.models, device=device, tensor_parallel=tp, **build_args)
            for engine in engines:  # kernels compiled and decode graphs captured now, not in the first requests
                print(f"vkv serve: {engine.name} warmed up in {engine.warm_up():.1f} s", flush=True)
            freeze_heap()
            shares = [p.stats().budget_bytes for p in dict.fromkeys(e.pool for e in engines)]
            names = [e.name for e in engines]
        budget = " + ".join(format_bytes(b) for b in shares)
        ranks = f", {args.tensor_parallel} tensor-parallel ranks" if args.tensor_parallel > 1 else ""
        print(f"vkv serve: {', '.join(names)} on http://{args.host}:{args.port}/v1 (KV budget {budget}{ranks})",
              flush=True)  # fmt: skip
        run_server(served, args.host, args.port)
    except KeyboardInterrupt:  # Ctrl-C, the way to stop it: uvicorn has shut down gracefully, then re-raised it
        print("vkv serve: stopped", flush=True)
    except InvalidRequestError as e:
        parser.error(str(e))
    except (VkvError, OSError, EngineProcessError) as e:
        print(f"vkv: {e}", file=sys.stderr)
        return 1
    finally:
        if group is not None:
            group.close()
        close_engines(engines)
        stop_tensor_parallel(followers)
    return 0


def demo(args: argparse.Namespace) -> int:
    """`vkv demo`: the multi-model scenario at a size that fits the machine (vkv.demo); prints a table."""
    try:
        from vkv import demo as scenario
    except ImportError as e:
        print(f'vkv demo needs the demo extras: pip install "vkv[demo]" ({e})', file=sys.stderr)
        return 1
    gpu = scenario.on_gpu(args.device)
    try:
        sc = scenario.gpu_scenario(args.mode) if gpu else scenario.Scenario(device="cpu", mode=args.mode)
    except VkvError as e:  # a GPU too small for three 8B models
        print(f"vkv: {e}; `vkv demo --device cpu` runs the tiny scenario instead", file=sys.stderr)
        return 1
    where = "GPU: 3 Llama-3-8B-shaped random models" if gpu else "CPU: 3 tiny random models (Triton's interpreter)"
    print(f"vkv demo on the {where}, {args.mode}; KV budget {format_bytes(sc.kv_budget_bytes)} for all", flush=True)
    try:
        payload = scenario.run(sc, Path(args.out))
    except (VkvError, OSError, RuntimeError) as e:
        print(f"vkv: {e}", file=sys.stderr)
        return 1
    print(scenario.table(payload))
    print(f"wrote {args.out} and {payload['png']}")
    lost = sum(run["lost"] for run in payload["runs"])
    over = [run["policy"] for run in payload["runs"] if not run["within_budget"]]
    if lost or over:
        print(f"vkv demo: {lost} requests lost; over budget: {over or 'none'}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 a vkv error at run time ("vkv: <message>"), 2 bad arguments (usage and message)."""
    parser = argparse.ArgumentParser(prog="vkv", description="vkv: an elastic, virtualized KV cache for LLM serving")
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="backend, device, page size and pool statistics")
    p_info.add_argument("--backend", choices=(*BACKENDS, "auto"), default="auto", help="default: cuda if usable")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_top = commands.add_parser("top", help="every model sharing a GPU's budget, live: mapped, in use, limit, rates")
    p_limit = commands.add_parser("limit", help="change a running model's page limit")
    p_limit.add_argument("model", help="the model's name in the ledger (see vkv top)")
    p_limit.add_argument("size", type=_size, help="8GiB, 512MiB, 1.5G (binary), 2GB (decimal), bytes, or none")
    for p in (p_top, p_limit):
        p.add_argument("--device", default=None, help="the ledger's device (default every device's ledger found)")
        where = p.add_mutually_exclusive_group()
        where.add_argument("--path", default=None, help="the ledger file (default LEDGER_DIR/ledger-DEVICE)")
        where.add_argument(
            "--ledger-dir",
            default=None,
            help=f"the ledger's directory (default ${DIRECTORY_ENV}, else /dev/shm/vkv-UID)",
        )
    p_top.add_argument(
        "--interval", type=_seconds, default=1.0, help=f"seconds between refreshes, at most {MAX_INTERVAL_S:.0f} (1)"
    )
    p_top.add_argument("--once", action="store_true", help="print one table (rates over one interval) and exit")
    p_serve = commands.add_parser("serve", help="an OpenAI-compatible server over one or several models")
    p_serve.add_argument(
        "models", nargs="+", metavar="[NAME=]SOURCE",
        help="a model directory (config.json, *.safetensors, tokenizer), random:PRESET (tiny-llama, tiny-qwen3, "
        "llama-3-8b, qwen3-8b: random weights) or random:DIR (a directory's config, random weights)",
    )  # fmt: skip
    p_serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p_serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p_serve.add_argument("--budget", type=_size, default=None, help="KV budget of all models (default 90%% of free)")
    p_serve.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once, a model (32)")
    p_serve.add_argument("--max-seq-len", type=int, default=None, help="tokens a request, prompt + output")
    p_serve.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens a step (2048)")
    p_serve.add_argument(
        "--prefill-with-decode", type=int, default=None, metavar="N",
        help="prompt tokens a step that decodes may carry: smaller keeps inter-token latency (default no cap)",
    )  # fmt: skip
    p_serve.add_argument(
        "--graph-tokens", type=int, default=None, metavar="N",
        help="steps that prefill, of up to N tokens, as CUDA graphs per token bucket (0: eager; default 512 on a "
        "GPU with one rank, else 0)",
    )  # fmt: skip
    p_serve.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default cuda if there is one)")
    p_serve.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p_serve.add_argument(
        "--tensor-parallel", type=int, default=1, metavar="N",
        help="shard each model's heads over N ranks: cuda:0..N-1, or N CPU processes (default 1)",
    )  # fmt: skip
    p_serve.add_argument("--page-size", type=_size, default=None, help="KV page size (default the device's, 2 MiB)")
    p_serve.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder layers (fused norms; slower start)"
    )
    p_serve.add_argument(
        "--engine-process", action="store_true",
        help="step the models in a process of their own, so the HTTP server's Python takes no GIL from them",
    )  # fmt: skip
    share = p_serve.add_mutually_exclusive_group()
    share.add_argument("--partition", action="store_true", help="a static equal split of the budget: no borrowing")
    share.add_argument(
        "--ledger", default=None, help="a ledger file shared with other vkv processes (created with --budget if new)"
    )
    p_serve.add_argument(
        "--idle-release", type=float, default=2.0, help="seconds idle before a model gives its kept pages back (2)"
    )
    p_demo = commands.add_parser("demo", help="several models under bursty load: static KV split against elastic")
    p_demo.add_argument(
        "--mode", choices=("one-process", "processes"), default="one-process",
        help="the models in one server process on one pool, or one process each on a ledger",
    )  # fmt: skip
    p_demo.add_argument("--out", default="vkv-demo.json", help="the JSON (a PNG is written beside it)")
    p_demo.add_argument("--device", default=None, help="cuda or cpu (default cuda if there is one)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args, p_serve)
    if args.command == "demo":
        return demo(args)
    try:
        if args.command == "top":
            return top(args.device, args.path, args.ledger_dir, args.interval, args.once)
        if args.command == "limit":
            return limit(args.model, args.size, args.device, args.path, args.ledger_dir)
        report = info(args.backend)
    except InvalidRequestError as e:  # an argument the checks behind the parser refused: a usage error
        {"top": p_top, "limit": p_limit, "info": p_info}[args.command].error(str(e))
    except (VkvError, OSError) as e:
        print(f"vkv: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0 if report["probe_pages_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
