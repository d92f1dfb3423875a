# SPDX-License-Identifier: Apache-2.0
"""Where a compiled generate() decode step goes: torch.profiler over VkvCache(compile_decode=True) on a GPU.

    python tools/generate_profile.py [--batch 1] [--prompt 8192] [--new-tokens 33] [--out DIR]

A Llama-3-8B-shaped random model (bf16), greedy; generate() runs twice for 1 and N new tokens (compiles, warms
up), the step time is taken as in bench/hf_generate.py, then one generate(N) runs under the profiler. Prints the
GPU's busy time against its span (the gaps are host time), the largest gaps and the kernels' time a step (prefill
included: divide with care); writes the profiler's tables to DIR/prof_tables.txt.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py, the benchmarks

import transformers  # noqa: E402
from hf_generate import greedy, llama_config  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from vkv.integrations import hf  # noqa: E402


def busy_and_gaps(prof) -> tuple[float, float, list[tuple[float, str]]]:
    """(span, busy) of the GPU's kernels and copies in us, and the idle gaps before each (us, next kernel)."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, gaps, start, end = 0.0, [], None, None
    for s, e, name in kernels:
        if end is None or s > end:
            if end is not None:
                busy += end - start
                gaps.append((s - end, name))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return kernels[-1][1] - kernels[0][0], busy, sorted(gaps, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    b, p, n = args.batch, args.prompt, args.new_tokens
    transformers.logging.set_verbosity_error()
    hf.register()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(
            copy.deepcopy(llama_config(False, p + n)), attn_implementation="vkv", dtype=torch.bfloat16
        ).eval()
    ids = torch.randint(2, 128000, (b, p), device="cuda")
    mask = torch.ones_like(ids)
    cache = hf.VkvCache(
        model, max_batch_size=b, max_seq_len=p + n, compile_decode=True, layout="grouped", group_layers=8
    )

    def generate(tokens: int) -> float:
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, **hf.cache_kwargs(cache), **greedy(tokens))
        torch.cuda.synchronize()
        cache.reset()
        return time.perf_counter() - t0

    for tokens in (1, n, 1, n):  # compiles, warms up
        generate(tokens)
    step = (generate(n) - generate(1)) / (n - 1)
    print(f"step {step * 1e3:.3f} ms (the second calls)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(n)
    averages = prof.key_averages()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prof_tables.txt").write_text(
        averages.table(sort_by="cuda_time_total", row_limit=40)
        + "\n\n"
        + averages.table(sort_by="self_cpu_time_total", row_limit=60)
    )
    span, busy, gaps = busy_and_gaps(prof)
    long = [g for g, _ in gaps if g > 100]
    print(f"GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms over {n} tokens (prefill included); ")
    print(f"gaps over 100 us: {sum(long) / 1e3:.1f} ms in {len(long)}")
    print("largest gaps (us, next kernel):", [(round(g), name[:40]) for g, name in gaps[:12]])
    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            key = event.name[:60]
            per_kernel[key] = per_kernel.get(key, 0.0) + event.time_range.end - event.time_range.start
    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{us / 1e3 / (n - 1):8.3f} ms a step  {name}")


if __name__ == "__main__":
    main()
