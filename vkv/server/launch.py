# SPDX-License-Identifier: Apache-2.0
"""Engines from `vkv serve`'s model arguments: ``[NAME=]SOURCE``, SOURCE a model directory, ``random:PRESET``
(vkv.engine.presets) or ``random:DIR`` (the directory's config, random weights). All share one PagePool.

With tensor parallelism (``vkv serve --tensor-parallel N``) every rank builds the same engines over its own device
(cuda:r, or the CPU with host device r): rank 0 in the serving process, ranks 1..N-1 spawned
(:func:`follow_engines`), which follow rank 0's steps until it closes its engines."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch

from vkv.allocator import InvalidRequestError, Ledger, PagePool, get_driver
from vkv.allocator.checks import is_int
from vkv.allocator.pool import default_budget_bytes
from vkv.engine import Engine
from vkv.engine.presets import PRESETS, TINY_VOCAB, preset, word_tokenizer
from vkv.parallel import (
    SINGLE,
    TensorParallel,
    agree_min,
    init_tensor_parallel,
    join_ranks,
    local_init_method,
    pool_device_index,
    rank_device,
    start_ranks,
)


def log_to_stderr() -> None:
    """The engines' warnings and errors (the logger "vkv.engine": a failed step, a full device) on stderr, with their
    time and level; a no-op where logging is configured already."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def parse_model(spec: str) -> tuple[str, str]:
    """(name, source) of ``[NAME=]SOURCE``; the name defaults to the preset's or the directory's."""
    name, sep, source = spec.partition("=")
    if not sep or "/" in name or name.startswith("random:"):
        name, source = "", spec
    if not source:
        raise InvalidRequestError(f"model {spec!r}: expected [NAME=]SOURCE")
    default = source.removeprefix("random:").rstrip("/").rsplit("/", 1)[-1]
    return name or default, source


def build_engines(
    specs: list[str],
    *,
    budget_bytes: int | None = None,
    backend: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    page_size: int | None = None,
    partition: bool = False,
    ledger: str | None = None,
    tensor_parallel: TensorParallel | None = None,
    **engine_args: Any,
) -> list[Engine]:
    """One Engine per spec. Pools: one for all (``budget_bytes``: default 90% of free device memory), or with
    ``partition`` one per model of an equal share (a static split: no model borrows another's pages). ``ledger``:
    the pool counts its pages in that cross-process ledger file too (created with ``budget_bytes`` if new), so
    models served by other processes on the same ledger share the budget. ``engines[i].pool`` is model i's.
    ``tensor_parallel``: this rank's engines, on its device; the ledger file of device d is ``<ledger>-<d>``, and
    the budget is the least any rank's device allows (one all-reduce), so that rank 0's growth fits every rank."""
    tp = SINGLE if tensor_parallel is None else tensor_parallel
    parsed = [parse_model(s) for s in specs]
    if len({n for n, _ in parsed}) != len(parsed):
        raise InvalidRequestError(f"two models have one name: {[n for n, _ in parsed]} (give NAME=SOURCE)")
    if partition and ledger is not None:
        raise InvalidRequestError("partition (a static split in this process) and ledger (sharing across processes) "
                                  "do not go together")  # fmt: skip
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        index = torch.device(device).index
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"device {device!r}: expected cuda, cuda:N or cpu") from None
    backend = backend or ("cuda" if device.startswith("cuda") else "host")
    driver = get_driver(backend, page_size=page_size, device=pool_device_index(backend, index, tp))
    shared = None
    if ledger is not None:
        path = f"{ledger}-{driver.index}" if tp.world > 1 else ledger
        book = Ledger.open(path=path, budget_bytes=budget_bytes, page_size=driver.page_size)
        budget_bytes = agree_min(book.budget_pages, tp, _box_device(driver)) * driver.page_size
        # A follower's pool does not answer the ledger's requests itself: what its caches release must be rank 0's
        # decision (replayed from the step's plan), or rank 0 would plan steps over pages a follower gave away.
        answer = {} if tp.leader else {"answer_interval_s": None}
        shared = PagePool(driver, budget_bytes, ledger=book, name="+".join(n for n, _ in parsed), **answer)
    elif partition:
        if budget_bytes is None:
            budget_bytes = _agreed(default_budget_bytes(driver), driver, tp)
        share = budget_bytes // len(parsed) // driver.page_size * driver.page_size
        if share == 0:
            raise InvalidRequestError(f"a budget of {budget_bytes} bytes split {len(parsed)} ways is under a page")
    else:
        shared = PagePool(driver, budget_bytes if budget_bytes is not None else _agreed(None, driver, tp))
    pools = [shared] * len(parsed) if shared is not None else [PagePool(driver, share) for _ in parsed]
    engines: list[Engine] = []
    try:
        for name, source in parsed:
            tokenizer, model = None, source
            if source.startswith("random:"):
                what = source.removeprefix("random:")
                if what in PRESETS:
                    model = preset(what)
                    tokenizer = word_tokenizer() if model.vocab_size == TINY_VOCAB else None
                elif (Path(what) / "config.json").is_file():
                    from transformers import AutoConfig

                    model = AutoConfig.from_pretrained(what)
                else:
                    raise InvalidRequestError(
                        f"{source!r}: random:PRESET ({', '.join(PRESETS)}) or random:DIR (a directory with config.json)"
                    )
            engines.append(Engine(model, name=name, tokenizer=tokenizer, pool=pools[len(engines)], device=device,
                                  dtype=dtype, tensor_parallel=tensor_parallel, **engine_args))  # fmt: skip
    except BaseException:
        close_engines(engines, pools)
        raise
    return engines


def close_engines(engines: list[Engine], pools: list[PagePool] | None = None) -> None:
    """Close ``engines`` (their requests end with "abort"), then their pools (or ``pools``), each once."""
    for engine in engines:
        engine.close()
    for pool in dict.fromkeys(pools if pools is not None else [e.pool for e in engines]):
        pool.close()


def freeze_heap() -> None:
    """After start-up (models, tokenizers, compiled graphs: millions of objects that live as long as the server):
    collect once, then leave those objects out of the garbage collector's later passes (gc.freeze), whose full
    passes over them would otherwise stall a step for tens of milliseconds now and then."""
    gc.collect()
    gc.freeze()


def _box_device(driver: Any) -> torch.device | None:
    """Where an all-reduce's tensor lives: the GPU for NCCL, the CPU for gloo."""
    return driver.device if driver.name == "cuda" else None


def _agreed(budget_bytes: int | None, driver: Any, tp: TensorParallel) -> int | None:
    """The default budget (90% of free device memory), the least of every rank's, in whole pages; None alone."""
    if tp.world == 1:
        return budget_bytes
    pages = (budget_bytes if budget_bytes is not None else default_budget_bytes(driver)) // driver.page_size
    return agree_min(pages, tp, _box_device(driver)) * driver.page_size


def follow_engines(tp: TensorParallel, specs: list[str], build_args: dict[str, Any]) -> None:
    """A rank other than 0 of `vkv serve --tensor-parallel N` (a target of :func:`vkv.parallel.start_ranks`):
    the same engines as rank 0, following its steps until it closes them."""
    device = rank_device(tp.rank, build_args.pop("device_type"))
    engines = build_engines(specs, device=str(device), tensor_parallel=tp, **build_args)
    try:
        engines[0].follow()
    finally:
        close_engines(engines)


def start_tensor_parallel(
    world: Any, specs: list[str], build_args: dict[str, Any], device: str | None
) -> tuple[TensorParallel | None, list, str | None]:
    """For `vkv serve --tensor-parallel N`: spawn ranks 1..N-1 (:func:`follow_engines`) and join the group as rank 0.
    Returns (rank 0's TensorParallel, the processes, rank 0's device); (None, [], device) for N = 1."""
    if not is_int(world) or world < 1:
        raise InvalidRequestError(f"--tensor-parallel must be a positive number of ranks, got {world!r}")
    if world == 1:
        return None, [], device
    if device not in (None, "cuda", "cpu"):
        raise InvalidRequestError(f"--device {device!r} with --tensor-parallel: cuda or cpu (rank r runs on cuda:r)")
    gpu = torch.cuda.is_available() if device is None else device == "cuda"
    if gpu and torch.cuda.device_count() < world:
        raise InvalidRequestError(
            f"{world} tensor-parallel ranks need {world} GPUs; torch sees {torch.cuda.device_count()}"
        )
    device_type, init = ("cuda" if gpu else "cpu"), local_init_method()
    args = (specs, {**build_args, "device_type": device_type})
    processes = start_ranks(
        world, follow_engines, args, ranks=range(1, world), init_method=init, device_type=device_type
    )
    try:
        tp = init_tensor_parallel(0, world, init_method=init, device=rank_device(0, device_type))
    except BaseException:
        join_ranks(processes, timeout_s=0)
        raise
    return tp, processes, str(rank_device(0, device_type))


def stop_tensor_parallel(processes: list, timeout_s: float = 30.0) -> None:
    """After rank 0 closed its engines (the followers' cue to stop): wait for them, leave the group."""
    if processes:
        join_ranks(processes, timeout_s)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
