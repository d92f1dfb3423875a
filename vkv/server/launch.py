# SPDX-License-Identifier: Apache-2.0
"""Engines from `vkv serve`'s model arguments: ``[NAME=]SOURCE``, SOURCE a model directory, ``random:PRESET``
(vkv.engine.presets) or ``random:DIR`` (the directory's config, random weights). All share one PagePool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vkv.allocator import InvalidRequestError, Ledger, PagePool, get_driver
from vkv.allocator.pool import default_budget_bytes
from vkv.engine import Engine
from vkv.engine.presets import PRESETS, TINY_VOCAB, preset, word_tokenizer


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
    **engine_args: Any,
) -> list[Engine]:
    """One Engine per spec. Pools: one for all (``budget_bytes``: default 90% of free device memory), or with
    ``partition`` one per model of an equal share (a static split: no model borrows another's pages). ``ledger``:
    the pool counts its pages in that cross-process ledger file too (created with ``budget_bytes`` if new), so
    models served by other processes on the same ledger share the budget. ``engines[i].pool`` is model i's."""
    parsed = [parse_model(s) for s in specs]
    if len({n for n, _ in parsed}) != len(parsed):
        raise InvalidRequestError(f"two models have one name: {[n for n, _ in parsed]} (give NAME=SOURCE)")
    if partition and ledger is not None:
        raise InvalidRequestError("partition (a static split in this process) and ledger (sharing across processes) "
                                  "do not go together")  # fmt: skip
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    driver = get_driver(backend or ("cuda" if device.startswith("cuda") else "host"), page_size=page_size)
    shared = None
    if ledger is not None:
        book = Ledger.open(path=ledger, budget_bytes=budget_bytes, page_size=driver.page_size)
        budget_bytes = book.budget_pages * driver.page_size
        shared = PagePool(driver, budget_bytes, ledger=book, name="+".join(n for n, _ in parsed))
    elif partition:
        if budget_bytes is None:
            budget_bytes = default_budget_bytes(driver)
        share = budget_bytes // len(parsed) // driver.page_size * driver.page_size
        if share == 0:
            raise InvalidRequestError(f"a budget of {budget_bytes} bytes split {len(parsed)} ways is under a page")
    else:
        shared = PagePool(driver, budget_bytes)
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
                                  dtype=dtype, **engine_args))  # fmt: skip
    except BaseException:
        for engine in engines:
            engine.close()
        for pool in set(pools):
            pool.close()
        raise
    return engines
