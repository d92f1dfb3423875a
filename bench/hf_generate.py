# SPDX-License-Identifier: Apache-2.0
"""What a transformers user gets: generate() over vkv against transformers' own caches, one model, one run.

    python bench/hf_generate.py [--cases 1x8192,8x512,32x2048] [--new-tokens 128] [--only vkv,default,static,batch]
                                [--layout grouped] [--group-layers 8] [--batch-memory F] [--tiny] [--out PATH]

A Llama-3-8B-shaped random-init model (bf16 on the GPU), built once; the methods switch its attention
implementation. --tiny: 2 layers, float32 on the CPU (Triton's interpreter), bf16 on a GPU. Greedy, exactly N
new tokens (no EOS token), prompts of random tokens, no padding. Methods, in this order for each (batch, prompt):
  vkv         attn_implementation "vkv" + vkv.integrations.hf.VkvCache (--layout, --group-layers)
  vkv-graphs  the same with VkvCache(compile_decode=True): generate() compiles the decode step (CUDA graphs, vkv's
              store + attention as the custom op vkv::decode_step; on a GPU only)
  default     sdpa + transformers' default (dynamic) cache
  static      sdpa + cache_implementation="static" (transformers compiles the decode step on a GPU)
  batch       sdpa + generate_batch (continuous batching over its paged cache, sized from free memory unless
              --batch-memory; its manager persists from the first call to the second)
Each time is the second of two identical calls (the first compiles and warms up), synchronised:
  prefill_ms t(1), generate with one new token; decode_tok_s B * (N - 1) / (t(N) - t(1)); step_ms the same as ms a
  step; e2e_tok_s B * N / t(N); of_bound the step's bandwidth bound ((weights + the rows' KV at the mean length) /
  the copy bandwidth measured in this run) over step_ms; vkv_host_us_a_step vkv's host time of its per-step plan
  (mask read, growth, upload); vkv_x the best vkv method's decode_tok_s over this row's (in a vkv row: its own over
  the best baseline's, named); agree the fraction of generated tokens equal to the default method's (bf16
  near-ties diverge: a sanity check); peak_alloc torch.cuda.max_memory_allocated over the timed t(N) call; used
  the device memory in use (total - free; vkv's pages and the weights included), the larger of before and after
  the timed t(N) call; kv_mapped vkv's mapped bytes after it, kv_bound the tokens held plus one page per plane per
  sequence, within: mapped <= bound.
A method that fails is an error row; the run goes on. Writes bench/results/hf_generate[-tiny].json (--out; after
each case) and a PNG beside it, prints a table last. A case takes minutes on a GPU: under a time limit, run the
cases in separate calls (--cases, --out).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run in Triton's interpreter; set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    copy_tbps,
    environment,
    error_text,
    free_device_memory,
    gpu_timer,
    na,
    plot_bars,
    print_table,
    progress,
)
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from vkv.integrations import hf  # noqa: E402

METHODS = ("vkv", "vkv-graphs", "default", "static", "batch")
VKV, BASELINES = METHODS[:2], METHODS[2:]
CASES, TINY_CASES = "1x8192,8x512,32x2048", "1x40,2x16,3x24"
GIB, MIB = 1 << 30, 1 << 20
SHAPE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
         "vocab_size")  # fmt: skip


def llama_config(tiny: bool, max_len: int) -> LlamaConfig:
    """Llama-3-8B's shape (32 layers, 32/8 heads of 128, 14336 MLP, 128256 tokens), or a 2-layer one; no EOS
    token, so every row generates exactly N tokens."""
    sizes = (2, 256, 512, 4, 2, 512) if tiny else (32, 4096, 14336, 32, 8, 128256)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    return LlamaConfig(
        **dict(zip(SHAPE, sizes, strict=True)), head_dim=64 if tiny else 128, rope_parameters=rope,
        max_position_embeddings=max(8192, max_len), pad_token_id=0, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip


def settle() -> int | None:
    """Wait for the GPU; returns the device memory in use (total - free), None without a GPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def greedy(n: int) -> dict:
    return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}


def kv_record(cache: hf.VkvCache) -> dict:
    """The vkv cache's mapped bytes beside what its tokens need: held + one page per plane per sequence."""
    kv, lens = cache.kv, cache.batch.lens
    held, mapped = sum(lens) * kv.config.token_bytes, kv.stats().mapped_bytes
    bound = held + len(lens) * kv.layout.planes * kv.layout.page_size
    return {"kv_tokens": sum(lens), "kv_held_mib": held / MIB, "kv_mapped_mib": mapped / MIB,
            "kv_bound_mib": bound / MIB, "within": mapped <= bound, "planes": kv.layout.planes}  # fmt: skip


def measure(generate, b: int, new: int, after=lambda: {}, finish=lambda: None, log=print) -> dict:
    """Time generate(n) for n = 1 and n = new, each the second of two identical calls; ``after()`` runs after
    every call (reads the cache, resets it), ``finish()`` after each pair. Memory is that of the timed t(new)."""
    times, out = {}, {}
    for n in (1, new):
        try:
            log(f"    {n} new token(s): first call (compiles, warms up)")
            generate(n)
            after()
            if (before := settle()) is not None:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            tokens = generate(n)
            after_used = settle()  # synchronises (a few us of cudaMemGetInfo besides)
            times[n] = time.perf_counter() - t0
            out = {"tokens": tokens, **after()}
            if before is not None:
                peak = torch.cuda.max_memory_allocated()
                out |= {"peak_alloc_gib": peak / GIB, "used_gib": max(before, after_used) / GIB}
        finally:
            finish()
    got = {len(row) for row in out["tokens"]}
    if got != {new}:
        raise RuntimeError(f"generated {sorted(got)} tokens a row, expected {new}")
    decode = times[new] - times[1]  # <= 0 only in noise (CPU smoke runs): no rate then
    out |= {"t1_s": times[1], "t_new_s": times[new], "prefill_ms": times[1] * 1e3, "e2e_tok_s": b * new / times[new]}
    if decode > 0:
        out |= {"decode_tok_s": b * (new - 1) / decode, "step_ms": decode / (new - 1) * 1e3}
    return out


def forget_compiled(model) -> None:
    """Drop transformers' compiled forward (and the CUDA-graph pools): the next method or case compiles afresh."""
    for name in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length"):
        model.__dict__.pop(name, None)
    torch._dynamo.reset()


def run_vkv(model, ids, mask, new, args, log, graphs: bool = False) -> dict:
    model.set_attn_implementation("vkv")
    b, p = ids.shape
    layers = model.config.num_hidden_layers
    group = args.group_layers if args.group_layers is not None else (8 if layers % 8 == 0 else 1)
    shape = {"layout": args.layout, "group_layers": group if args.layout == "grouped" else None}
    cache = hf.VkvCache(model, max_batch_size=b, max_seq_len=p + new, compile_decode=graphs, **shape)
    record: dict = {}
    begin, host = cache.batch.begin, []

    def timed_begin(*a, **k):  # the host work vkv adds to a step: plan (mask read, growth, upload)
        t0 = time.perf_counter()
        try:
            return begin(*a, **k)
        finally:
            host.append(time.perf_counter() - t0)

    cache.batch.begin = timed_begin

    def generate(n: int) -> list[list[int]]:
        return model.generate(ids, attention_mask=mask, **hf.cache_kwargs(cache), **greedy(n))[:, p:].tolist()

    def after() -> dict:
        record.update(kv_record(cache))
        if len(host) > 1:  # the decode steps' begin (the first step is the prefill's)
            record["vkv_host_us_a_step"] = 1e6 * sum(host[1:]) / (len(host) - 1)
        host.clear()
        cache.reset()
        return record

    try:
        return measure(generate, b, new, after, log=log) | shape | {"compile_decode": graphs}
    finally:
        cache.close()
        if graphs:
            forget_compiled(model)


def run_vkv_graphs(model, ids, mask, new, args, log) -> dict:
    if not ids.is_cuda:
        raise RuntimeError("skipped on the CPU: transformers compiles the decode step on accelerators only")
    return run_vkv(model, ids, mask, new, args, log, graphs=True)


def run_default(model, ids, mask, new, args, log) -> dict:
    model.set_attn_implementation("sdpa")

    def generate(n: int) -> list[list[int]]:
        return model.generate(ids, attention_mask=mask, **greedy(n))[:, ids.shape[1] :].tolist()

    return measure(generate, len(ids), new, log=log)


def run_static(model, ids, mask, new, args, log) -> dict:
    model.set_attn_implementation("sdpa")
    p = ids.shape[1]

    def generate(n: int) -> list[list[int]]:
        return model.generate(ids, attention_mask=mask, cache_implementation="static", **greedy(n))[:, p:].tolist()

    try:
        return measure(generate, len(ids), new, log=log) | {"compiled": ids.is_cuda}
    finally:  # the next case compiles afresh, with a cache of its own length (and no CUDA-graph pool held)
        forget_compiled(model)


def run_batch(model, ids, mask, new, args, log) -> dict:
    b, p = ids.shape
    inputs = ids.tolist()
    fields = {f.name for f in dataclasses.fields(transformers.ContinuousBatchingConfig)}
    # sdpa: transformers >= 5.2x switches sdpa to flash unless told not to; 5.17 keeps "paged|sdpa" as it is
    attn = "sdpa" if "auto_switch_to_flash" in fields else "paged|sdpa"
    model.set_attn_implementation(attn)
    options = {"auto_switch_to_flash": False, "max_memory_percent": args.batch_memory}
    if not ids.is_cuda:  # no GPU memory to size from: give the sizes (enough pages for every row)
        defaults = transformers.ContinuousBatchingConfig()
        page = getattr(defaults, "page_size", None) or getattr(defaults, "block_size", 256)
        options |= {"num_blocks": b * (-(-(p + new) // page) + 1), "max_batch_tokens": max(256, p)}
    options = {k: v for k, v in options.items() if k in fields and v is not None}

    def generate(n: int) -> list[list[int]]:
        out = model.generate_batch(
            inputs=inputs,
            generation_config=GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0),
            continuous_batching_config=transformers.ContinuousBatchingConfig(**options),
            persistent_manager=True,  # the second call reuses the first's manager, warmed up
        )
        if len(out) != b:
            raise RuntimeError(f"generate_batch returned {len(out)} results for {b} prompts (see its log)")
        return [list(r.generated_tokens) for r in out.values()]

    try:
        row = measure(generate, b, new, finish=model.destroy_cached_continuous_batching_manager, log=log)
    except MemoryError as exc:
        if ids.is_cuda:
            raise
        raise RuntimeError(f"skipped on the CPU: it sees no host memory there (psutil?): {exc}") from exc
    finally:
        model.set_attn_implementation("sdpa")
    return row | {"attn": attn, "batch_options": options}


RUNNERS = {"vkv": run_vkv, "vkv-graphs": run_vkv_graphs, "default": run_default, "static": run_static,
           "batch": run_batch}  # fmt: skip


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def bound_ms(model, b: int, p: int, new: int, tbps: float | None) -> float | None:
    """A decode step's bandwidth bound: the weights and the KV of the rows' tokens (mean over the steps) read
    once, at the copy bandwidth measured in this run."""
    if not tbps:
        return None
    cfg = model.config
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    return (weights + b * (p + new / 2) * kv_token) / (tbps * 1e12) * 1e3


def run_case(model, case: tuple[int, int], methods: list[str], args, log, tbps: float | None = None) -> list[dict]:
    b, p = case
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (b, p), generator=torch.Generator().manual_seed(b * 100003 + p)).to(model.device)
    mask = torch.ones_like(ids)
    rows = []
    for method in methods:
        log(f"{b}x{p} {method}")
        try:
            row = RUNNERS[method](model, ids, mask, args.new_tokens, args, log)
        except Exception as exc:  # noqa: BLE001 - a failing method is an error row
            traceback.print_exc(file=sys.stderr)
            row = {"error": error_text(exc)}
        free_device_memory()
        row = {"case": f"{b}x{p}", "batch": b, "prompt": p, "method": method} | row
        rows.append(row)
        if "error" in row:
            log(f"  {method}: {na(row['error'], 200)}")
        else:
            mem = f", used {row['used_gib']:.1f} GiB" if "used_gib" in row else ""
            kv = f", KV {row['kv_mapped_mib']:.0f} MiB (bound {row['kv_bound_mib']:.0f})" if "within" in row else ""
            rate = row.get("decode_tok_s", float("nan"))
            log(f"  {method}: prefill {row['prefill_ms']:.1f} ms, decode {rate:.1f} tok/s{mem}{kv}")
    by = {r["method"]: r for r in rows if "error" not in r}
    reference = by["default"]["tokens"] if "default" in by else None
    for r in by.values():
        tokens = r.pop("tokens")
        if reference is not None:
            r["agree"] = agreement(tokens, reference)
    bound = bound_ms(model, b, p, args.new_tokens, tbps)
    for r in by.values():
        if bound and r.get("step_ms"):
            r |= {"bound_ms": bound, "of_bound": bound / r["step_ms"]}
    ours = {m: by[m]["decode_tok_s"] for m in VKV if by.get(m, {}).get("decode_tok_s")}
    base = {m: by[m]["decode_tok_s"] for m in BASELINES if by.get(m, {}).get("decode_tok_s")}
    if ours:
        for m, rate in base.items():
            by[m]["vkv_x"] = max(ours.values()) / rate
    if base:
        best = max(base, key=base.get)
        for m, rate in ours.items():
            by[m] |= {"vkv_x": rate / base[best], "best_baseline": best}
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        t = {"case": r["case"], "method": r["method"]}
        if "error" in r:
            out.append(t | {"prefill_ms": na(r["error"], 60)})
            continue
        keys = ("prefill_ms", "decode_tok_s", "step_ms", "of_bound", "vkv_host_us_a_step", "e2e_tok_s", "agree")
        t |= {k: r[k] for k in keys if r.get(k) is not None}
        if "vkv_x" in r:
            t["vkv_x"] = f"{r['vkv_x']:.2f}" + (f" ({r['best_baseline']})" if "best_baseline" in r else "")
        t |= {k: r[k] for k in ("peak_alloc_gib", "used_gib", "kv_mapped_mib", "kv_bound_mib", "within") if k in r}
        out.append(t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help=f"BATCHxPROMPT,... (default {CASES}; --tiny {TINY_CASES})")
    parser.add_argument("--new-tokens", type=int, default=128, help="N, the new tokens of each row (>= 2)")
    parser.add_argument("--only", default=",".join(METHODS), help=f"methods to run, from {','.join(METHODS)}")
    parser.add_argument("--layout", default="grouped", choices=("token", "grouped", "layer"), help="vkv's KV layout")
    parser.add_argument("--group-layers", type=int, default=None, help="layers a plane, grouped (default 8, tiny 1)")
    parser.add_argument("--batch-memory", type=float, default=None, help="generate_batch's max_memory_percent")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU: float32 in the interpreter)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default results/hf_generate[-tiny].json)")
    args = parser.parse_args()
    names = (args.cases or (TINY_CASES if args.tiny else CASES)).split(",")
    cases = [tuple(int(x) for x in c.split("x")) if re.fullmatch(r"[1-9]\d*x[1-9]\d*", c) else None for c in names]
    if None in cases:
        parser.error(f"--cases must be BATCHxPROMPT,... of positive ints, got {args.cases!r}")
    methods = [m for m in METHODS if m in args.only.split(",")]
    if unknown := set(args.only.split(",")) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; expected some of {list(METHODS)}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (decode is timed as t(N) - t(1)), got {args.new_tokens}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("the Llama-3-8B-shaped model needs a CUDA GPU; --tiny runs on the CPU")
    out_path = args.out or RESULTS / ("hf_generate-tiny.json" if args.tiny else "hf_generate.json")

    start, log = time.perf_counter(), progress()
    transformers.logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # generate_batch's notes on its sizing
    hf.register()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    config = llama_config(args.tiny, max(p for _, p in cases) + args.new_tokens)
    torch.manual_seed(0)
    with device:  # one set of weights, random, built on the device; the methods switch the attention
        model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).eval()
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    free_device_memory()
    idle = settle()
    tbps = copy_tbps(gpu_timer()) if cuda else None
    where = f", {idle / GIB:.1f} GiB of the GPU in use, copy {tbps:.2f} TB/s" if idle else ""
    log(f"model: {weights / GIB:.2f} GiB of {dtype} weights on {device}{where}")
    env = environment() | {"transformers": transformers.__version__}
    payload: dict = {"environment": env, "rows": [], "config": {
        "model": "Llama-3-8B-shaped random init" if not args.tiny else "tiny 2-layer Llama, random init",
        "model_config": {k: getattr(config, k) for k in SHAPE}, "dtype": str(dtype), "weights_gib": weights / GIB,
        "device_used_with_model_gib": idle / GIB if idle else None, "copy_tbps": tbps,
        "cases": [f"{b}x{p}" for b, p in cases], "new_tokens": args.new_tokens, "methods": methods,
        "timing": "each time the second of two identical calls, synchronised; prefill = t(1); decode tok/s = "
        "B * (N - 1) / (t(N) - t(1)); e2e tok/s = B * N / t(N)",
    }}  # fmt: skip
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:  # the JSON is written after each case: a run cut short keeps the cases it finished
        payload["rows"] += run_case(model, case, methods, args, log, tbps)
        out_path.write_text(json.dumps(payload | {"wall_s": time.perf_counter() - start}, indent=2))
        log(f"wrote {out_path}")
    rows = payload["rows"]
    groups = [f"{b}x{p}" for b, p in cases]
    rate = {(r["method"], r["case"]): r.get("decode_tok_s") for r in rows}
    series = {m: [rate.get((m, g)) for g in groups] for m in methods}
    title = f"generate() decode, {env.get('gpu') or 'CPU'}, transformers {transformers.__version__}"
    log(plot_bars(out_path.with_suffix(".png"), title, "decode tokens/s", groups, series))
    print()
    memory = ["peak_alloc_gib", "used_gib"] * cuda
    cols = ["case", "method", "prefill_ms", "decode_tok_s", "step_ms", "of_bound", "vkv_host_us_a_step", "e2e_tok_s",
            "vkv_x", "agree", *memory, "kv_mapped_mib", "kv_bound_mib", "within"]  # fmt: skip
    print_table(table_rows(rows), cols)


if __name__ == "__main__":
    main()
