# SPDX-License-Identifier: Apache-2.0
"""Engines from `vkv serve`'s model arguments: ``[NAME=]SOURCE``, SOURCE a model directory, ``random:PRESET``
(vkv.engine.presets) or ``random:DIR`` (the directory's config, random weights). All share one PagePool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vkv.allocator import InvalidRequestError, PagePool
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
    **engine_args: Any,
) -> list[Engine]:
    """One Engine per spec over one PagePool (``budget_bytes``: default 90% of free device memory)."""
    parsed = [parse_model(s) for s in specs]
    if len({n for n, _ in parsed}) != len(parsed):
        raise InvalidRequestError(f"two models have one name: {[n for n, _ in parsed]} (give NAME=SOURCE)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pool = PagePool(backend or ("cuda" if device.startswith("cuda") else "host"), budget_bytes)
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
            engines.append(Engine(model, name=name, tokenizer=tokenizer, pool=pool, device=device, dtype=dtype,
                                  **engine_args))  # fmt: skip
    except BaseException:
        for engine in engines:
            engine.close()
        pool.close()
        raise
    return engines
