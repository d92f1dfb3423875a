# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism: an engine's decode step at TP=1 against TP=2 (8B-shaped), and a 70B-shaped model's decode
at TP=2 against its bandwidth bound.

    python bench/tp.py [--cases llama-3-8b@1,llama-3-8b@2,llama-3-70b@2] [--batches 1,8,32] [--tiny] [--out PATH]

A case is PRESET@RANKS: one process a rank (one GPU each, NCCL; --tiny: tiny-llama on CPU ranks over gloo, float32
in Triton's interpreter), each holding its share of a random model drawn where it runs
(vkv.engine.weights.random_rank_share: a 70B-shaped model never exists whole) and an Engine over it. Rank 0 times
decode steps as bench/serve.py does (B prompts of 2,048 tokens; (T(64) - T(1)) / 63 over two generate calls) while
the other ranks follow its plans. Bound of a step: the bytes one rank reads (its share of the weights, the
replicated embedding and LM head counted whole, as bench/serve.py counts them, though a step reads B rows of the
embedding: ~1 GB too many for an 8B shape, a larger part of a rank's bytes at TP=2; and its share of the KV of B
requests at their mean length) at the copy bandwidth rank 0 measures in the same run; the step's all-reduces (two
a layer) come on top of it. A batch whose KV would not fit beside a rank's weights and 8 GiB is a row that says so
(llama-3-70b@2 at B=32 on 80 GB cards). Writes
bench/results/tp.json: per case and batch, the step's ms, decode tokens/s, the bound and the fraction of it
reached, and each batch's TP=2 speed-up over TP=1 where both ran. A case that fails (a rank's error, out of
memory, a hang past --timeout) is a row with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import RESULTS, copy_tbps, environment, gpu_timer, print_table, write_json  # noqa: E402
from serve import run_steps  # noqa: E402

from vkv.engine import Engine  # noqa: E402
from vkv.engine.presets import PRESETS, preset  # noqa: E402
from vkv.engine.weights import random_rank_share  # noqa: E402
from vkv.parallel import TensorParallel, join_ranks, local_init_method, rank_device, start_ranks  # noqa: E402

GIB = 1 << 30
WORK_BYTES = 8 * GIB  # a rank's GPU memory beside weights and KV: CUDA context, NCCL, activations, graph pools


def kv_budget(config, tp: TensorParallel, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of KV a rank needs for ``batch`` requests of ``seq_len`` tokens (its share of the KV heads), with a
    quarter more for the pages slots keep and 256 MiB of slack, in whole 2 MiB pages; the same on every rank."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * (text.num_key_value_heads // tp.world) * head_dim * dtype.itemsize
    page = 2 << 20  # the default page: a budget is whole pages
    return -(-(int(1.25 * batch * seq_len * per_token) + (256 << 20)) // page) * page


def rank_main(tp: TensorParallel, name: str, batches: list[int], context: int, new: int, cpu: bool, out: str) -> None:
    """One rank of a case (a target for vkv.parallel.start_ranks): rank 0 times the steps and writes its rows to
    ``out`` (JSON); the others follow. Batches whose KV would not fit beside the rank's weights and WORK_BYTES on
    its GPU are left out (a row that says so), the same on every rank: the cards of one host are alike."""
    device, dtype = rank_device(tp.rank, "cpu" if cpu else "cuda"), torch.float32 if cpu else torch.bfloat16
    config = preset(name)
    seq_len = context + new + 16
    model = random_rank_share(config, tp, dtype=dtype, device=device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    room = None if cpu else torch.cuda.get_device_properties(device).total_memory - weights - WORK_BYTES
    fit = [b for b in batches if room is None or kv_budget(config, tp, b, seq_len, dtype) <= room]
    rows = [{"what": f"step B={b}", "error": f"does not fit: weights {weights / GIB:.1f} GiB + KV "
             f"{kv_budget(config, tp, b, seq_len, dtype) / GIB:.1f} GiB + {WORK_BYTES / GIB:.0f} GiB of working "
             "memory a rank"} for b in batches if b not in fit]  # fmt: skip
    budget = kv_budget(config, tp, max(fit), seq_len, dtype) if fit else 0
    tbps = copy_tbps(gpu_timer()) if not cpu and tp.leader else None
    if fit:
        with Engine(model, name=name, tensor_parallel=tp, device=device, budget_bytes=budget, max_num_seqs=max(fit),
                    max_seq_len=seq_len, max_num_batched_tokens=max(2 * context, 512)) as engine:  # fmt: skip
            if not tp.leader:
                engine.follow()
                return
            rows += run_steps(engine, fit, weights, tbps, config.vocab_size, context=context, new=new)
    if tp.leader:
        extra = {"weights_gib_a_rank": weights / GIB, "kv_budget_gib_a_rank": budget / GIB, "copy_tbps": tbps}
        Path(out).write_text(json.dumps([row | extra for row in rows]))


def run_case(
    name: str, ranks: int, batches: list[int], context: int, new: int, cpu: bool, timeout_s: float
) -> list[dict]:
    case = {"model": name, "tp": ranks}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        started = time.perf_counter()
        procs = start_ranks(ranks, rank_main, (name, batches, context, new, cpu, str(out)),
                            init_method=local_init_method(), device_type="cpu" if cpu else "cuda")  # fmt: skip
        codes = join_ranks(procs, timeout_s)
        took = time.perf_counter() - started
        if codes != [0] * ranks or not out.exists():
            return [case | {"error": f"ranks exited {codes} after {took:.0f} s (a rank's error, or past --timeout)"}]
        return [case | row for row in json.loads(out.read_text())]


def speedups(rows: list[dict]) -> None:
    """Each TP>1 row gets its decode tokens/s over the same model's and batch's TP=1 row, where that ran."""
    one = {(r["model"], r["what"]): r for r in rows if r["tp"] == 1 and "decode_tok_s" in r}
    for r in rows:
        base = one.get((r["model"], r.get("what")))
        if r["tp"] > 1 and base and "decode_tok_s" in r:
            r["over_tp1"] = r["decode_tok_s"] / base["decode_tok_s"]


def parse_cases(text: str, parser: argparse.ArgumentParser) -> list[tuple[str, int]]:
    cases = []
    for item in text.split(","):
        name, _, ranks = item.partition("@")
        if name not in PRESETS or not ranks.isdigit() or int(ranks) < 1:
            parser.error(f"--cases: {item!r} is not PRESET@RANKS (a preset of {', '.join(PRESETS)}; RANKS >= 1)")
        cases.append((name, int(ranks)))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases", default=None, help="default llama-3-8b@1,llama-3-8b@2,llama-3-70b@2 (--tiny: tiny-llama@1,2)"
    )
    parser.add_argument("--batches", default="1,8,32", help="batch sizes of the decode steps")
    parser.add_argument("--tiny", action="store_true", help="CPU ranks (gloo), short prompts, tiny-llama cases")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a case may take")
    parser.add_argument("--out", type=Path, default=RESULTS / "tp.json")
    args = parser.parse_args()
    default = "tiny-llama@1,tiny-llama@2" if args.tiny else "llama-3-8b@1,llama-3-8b@2,llama-3-70b@2"
    cases = parse_cases(args.cases or default, parser)
    batches = [int(b) for b in args.batches.split(",")]
    context, new = (16, 6) if args.tiny else (2048, 64)
    if not args.tiny and (need := max(r for _, r in cases)) > torch.cuda.device_count():
        parser.error(f"the cases need {need} GPUs, this host has {torch.cuda.device_count()} (--tiny: CPU ranks)")
    if args.tiny:  # the ranks (spawned: they inherit this environment) run on the CPU, in Triton's interpreter
        os.environ.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    rows, env = [], environment()
    for name, ranks in cases:
        print(f"{name} over {ranks} rank(s)...", flush=True)
        rows += run_case(name, ranks, batches, context, new, args.tiny, args.timeout)
        speedups(rows)  # written after each case: a later case's hang or crash loses nothing measured
        path = write_json(args.out.stem, {"environment": env, "context": context, "new": new, "rows": rows},
                          args.out.parent)  # fmt: skip
    print_table(rows, ["model", "tp", "what", "step_ms", "decode_tok_s", "bound_ms", "of_bound", "over_tp1", "error"])
    print(f"wrote {path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
