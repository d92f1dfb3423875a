# SPDX-License-Identifier: Apache-2.0
"""Registers, spills and shared memory of vkv's kernels compiled for sm_90 (H100/H200), without a GPU.

    TRITON_DEFAULT_FP_FUSION=1 python tools/static_sm90.py

Compiles the decode split kernel (TMA on and off), the paged baseline and the extend kernel at their
head_dim-128 GPU configs (bf16, 32/8 heads) with this machine's Triton, assembles the PTX with the ptxas
Triton ships, and prints what ptxas reports. A kernel at 255 registers with spill stores holds fewer
programs per SM and pays local-memory traffic; look here before spending GPU time on a tile change. The
figures are this Triton's: the H200 machine may run an older one, so confirm on the device.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vkv.kernels import decode, extend, paged_decode
from vkv.kernels._common import GPU_DECODE_CONFIGS

TARGET = GPUTarget("cuda", 90, 32)
INT_POINTERS = {"slot_ids_ptr", "seq_lens_ptr", "block_table_ptr", "cu_seqlens_ptr", "counter_ptr", "tiles_ptr"}
BF16_POINTERS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr"}


def ptxas() -> str:
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX versions new Triton writes
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise SystemExit(f"no ptxas under {folder}")


def arg_type(name: str, block_n: int) -> str:
    if name in ("k_desc", "v_desc"):
        return f"tensordesc<bf16[1,{block_n},128]>"
    if name.endswith("_ptr"):
        return "*i32" if name in INT_POINTERS else "*bf16" if name in BF16_POINTERS else "*fp32"
    return "fp32" if name == "qk_scale" else "i32"


def report(label: str, kernel, constexprs: dict, block_n: int, num_warps: int, num_stages: int) -> None:
    fn = kernel
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}  # knobs a kernel lacks are skipped
    signature = {n: "constexpr" if n in constexprs else arg_type(n, block_n) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run(
            [ptxas(), "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.findall(r"Used (\d+) registers", info)
    spills = re.findall(r"(\d+) bytes spill stores", info)
    print(
        f"{label:32s} registers {regs[0] if regs else '?':>4s}  spill stores {spills[0] if spills else '?':>4s} B  "
        f"shared {compiled.metadata.shared / 1024:6.1f} KiB",
        flush=True,
    )


def main() -> None:
    print(f"triton {triton.__version__}, {ptxas()}")
    dc = GPU_DECODE_CONFIGS[128]
    common = {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_G": 16, "BLOCK_D": 128, "INPUT_PRECISION": "tf32"}
    split = {**common, "BLOCK_N": dc.block_n, "HAS_LSE": True, "TAIL_N": min(32, dc.block_n), "BLOCK_S": 16}
    for tma in (True, False):
        flags = {"USE_TMA": tma, "PDL": True, "FUSED_REDUCE": False, "HAS_LSE_OUT": False}
        report(f"decode, TMA {'on' if tma else 'off'}", decode._decode_split_kernel, {**split, **flags},
               dc.block_n, dc.num_warps, dc.num_stages)  # fmt: skip
    report("paged decode, block 16", paged_decode._paged_decode_split_kernel,
           {**split, "PAGE": 16, "PDL": True, "FUSED_REDUCE": False, "HAS_LSE_OUT": False}, dc.block_n, dc.num_warps,
           dc.num_stages)  # fmt: skip
    ec = extend.GPU_EXTEND_CONFIGS[128]
    for tma, tiles in ((True, False), (False, False), (True, True)):
        report(f"extend, TMA {'on' if tma else 'off'}{', tile list' if tiles else ''}", extend._extend_kernel,
               {**common, "BLOCK_M": ec.block_m, "BLOCK_N": ec.block_n, "USE_TMA": tma, "HEADS": ec.pack_heads,
                "TILE_LIST": tiles}, ec.block_n, ec.num_warps, ec.num_stages)  # fmt: skip
    for m, n, w, st, heads in ((64, 64, 4, 3, 1), (128, 64, 8, 3, 2), (128, 64, 8, 3, 4)):
        report(f"extend bm{m} bn{n} w{w} st{st}, {heads} heads a program", extend._extend_kernel,
               {**common, "BLOCK_M": m, "BLOCK_N": n, "USE_TMA": True, "HEADS": heads, "TILE_LIST": False}, n, w,
               st)  # fmt: skip


if __name__ == "__main__":
    main()
