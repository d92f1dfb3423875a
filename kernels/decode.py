# SPDX-License-Identifier: Apache-2.0
"""Decode attention over contiguous per-slot KV: one query token per request, GQA, split-K.

Shapes and strides (elements):
    q                 [B, Hq, D]                       strides (stride_qb, stride_qh, 1)
    k_cache, v_cache  [num_slots, max_seq_len, Hkv, D] strides (stride_s, stride_t, stride_h, 1), any
    slot_ids          int32 [B]   request b reads slot slot_ids[b]
    seq_lens          int32 [B]   ... tokens [0, seq_lens[b]) of it
    out               [B, Hq, D]  q's dtype;   lse [B, Hq] float32, natural log (optional)
    partials          o [B, Hq, S, D] float32, lse [B, Hq, S] float32 (S = num_splits > 1 only)

Split kernel: one program per (split, kv_head, request). The program loads the GROUP = Hq / Hkv query
heads of its KV head as one [BLOCK_G >= 16, BLOCK_D] tile (rows padded so tl.dot runs on tensor cores),
walks its token range in BLOCK_N tiles with an online softmax in float32 and writes the normalised
partial output and its log-sum-exp. Reduce kernel: one program per (query head, request) combines the
partials by log-sum-exp. With one split the split kernel writes out/lse directly and no reduce runs.

Work is balanced by tokens, not by requests: every split covers the same ``tokens_per_split`` tokens
(a multiple of BLOCK_N), so a request of n tokens uses ceil(n / tokens_per_split) splits and the
programs beyond it exit at once. The last split of the grid takes whatever remains of a request, so
results never depend on the length hint that sized the grid. See :func:`choose_num_splits`.

Invariant (vkv): a program loads K/V only at token indices < the request's visible length, which is
seq_lens[b] clamped to [0, max_seq_len], and 0 when slot_ids[b] lies outside [0, num_slots). Full tiles
(all BLOCK_N tokens below the split's end) load unmasked, through TMA descriptors where the views allow
(sm_90+, power-of-2 head_dim, adjacent heads: see _tma_views) and through pointers otherwise. The one
partial tile per split loads masked, masked lanes given the address of the tile's first token (always
below the length), so no address at or beyond the length, and none in another slot, is ever formed:
those bytes may be unmapped.

The split-K scheme follows Flash-Decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html).
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor

from vkv.allocator.checks import is_int
from vkv.allocator.errors import InvalidRequestError

from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    cdiv,
    check_in_tile_offsets,
    check_runnable,
    check_same_dtype,
    check_tensor,
    log2_softmax_scale,
    next_power_of_2,
)


@triton.jit
def _visible_len(seq_lens_ptr, slot_ids_ptr, b, num_slots, capacity, CHECK_SLOT: tl.constexpr):
    """Tokens request b may read: seq_lens[b] clamped to [0, capacity]; 0 if its slot is out of range."""
    n = tl.load(seq_lens_ptr + b)
    n = tl.minimum(tl.maximum(n, 0), capacity)
    if CHECK_SLOT:
        slot = tl.load(slot_ids_ptr + b)
        n = tl.where((slot >= 0) & (slot < num_slots), n, 0)
    return n


@triton.jit
def _attend_tile(q, k, v, valid_n, m_i, l_i, acc, qk_scale, INPUT_PRECISION: tl.constexpr, MASK_N: tl.constexpr = True):
    """One online-softmax step over a [BLOCK_N, BLOCK_D] tile of K and V (scores in log2 units). Columns
    where valid_n is False score -inf; with MASK_N=False every column is valid and valid_n is ignored."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if MASK_N:
        s = tl.where(valid_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _store_split(
    acc, m_i, l_i, o_ptr, lse_ptr, b, heads, split, offs_d, mask_g, mask_d,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    HAS_LSE: tl.constexpr,
):  # fmt: skip
    """Write acc / l (0 where nothing was read) and lse = ln(sum exp) (-inf where nothing was read)."""
    read = l_i > 0
    l_safe = tl.where(read, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + split * stride_os + heads[:, None] * stride_oh
    tl.store(o_ptrs + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])
    if HAS_LSE:
        lse = tl.where(read, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + split * stride_ls + heads * stride_lh, lse, mask=mask_g)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, slot_ids_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    qk_scale, num_slots, capacity, tokens_per_split, num_splits,
    stride_qb, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LSE: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # the reduce kernel may be placed now; it waits for this grid's partials (gdc_wait)
        gdc_launch_dependents()
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = _visible_len(seq_lens_ptr, slot_ids_ptr, b, num_slots, capacity, True)
    start = split * tokens_per_split
    if (split > 0) & (start >= seq_len):  # nothing to read; split 0 always writes (zeros if empty)
        return
    end = tl.where(split == num_splits - 1, seq_len, tl.minimum(start + tokens_per_split, seq_len))
    slot = tl.where(seq_len > 0, tl.load(slot_ids_ptr + b), 0).to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # Full tiles (every token < end): no token mask. With USE_TMA each K/V tile is one TMA copy through a
    # descriptor over the layer view seen as [num_slots, capacity, Hkv * HEAD_DIM] (see _tma_views).
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    d_mask = mask_d[None, :] if HEAD_DIM != BLOCK_D else None
    for n0 in range(start, full_end, BLOCK_N):
        if USE_TMA:
            k = k_desc.load([slot.to(tl.int32), n0, kv_head * HEAD_DIM]).reshape(BLOCK_N, BLOCK_D)
            v = v_desc.load([slot.to(tl.int32), n0, kv_head * HEAD_DIM]).reshape(BLOCK_N, BLOCK_D)
        else:
            tile = tl.cast(n0, tl.int64)
            k = tl.load(k_base + tile * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :], mask=d_mask)
            v = tl.load(v_base + tile * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :], mask=d_mask)
        m_i, l_i, acc = _attend_tile(q, k, v, offs_n, m_i, l_i, acc, qk_scale, INPUT_PRECISION, False)
    # The last, partial tile (at most one): masked loads.
    for n0 in range(full_end, end, BLOCK_N):
        valid = n0 + offs_n < end
        rows = tl.where(valid, offs_n, 0)  # masked lanes address token n0 (< end): nothing past seq_len
        kv_mask = valid[:, None] if HEAD_DIM == BLOCK_D else valid[:, None] & mask_d[None, :]
        tile = tl.cast(n0, tl.int64)
        k = tl.load(k_base + tile * stride_kt + rows[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + tile * stride_vt + rows[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, INPUT_PRECISION)

    _store_split(acc, m_i, l_i, o_ptr, lse_ptr, b, heads, split, offs_d, mask_g, mask_d,
                 stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls, HAS_LSE)  # fmt: skip


@triton.jit
def _decode_reduce_kernel(
    o_part_ptr, lse_part_ptr, seq_lens_ptr, slot_ids_ptr, out_ptr, lse_ptr,
    num_slots, capacity, tokens_per_split, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lpb, stride_lph, stride_lps,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    CHECK_SLOT: tl.constexpr, HAS_LSE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Combine the used splits of one (query head, request): o = sum_s exp(lse_s - lse) o_s."""
    head = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = _visible_len(seq_lens_ptr, slot_ids_ptr, b, num_slots, capacity, CHECK_SLOT)
    used = tl.minimum(tl.cdiv(seq_len, tokens_per_split), num_splits)
    if PDL:  # launched early (programmatic dependent launch): wait until the split kernel's writes are visible
        gdc_wait()

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    o_base = o_part_ptr + b.to(tl.int64) * stride_pb + head * stride_ph
    l_base = lse_part_ptr + b.to(tl.int64) * stride_lpb + head * stride_lph
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, used, BLOCK_S):
        splits = s0 + offs_s
        mask_s = splits < used
        lse_s = tl.load(l_base + splits * stride_lps, mask=mask_s, other=float("-inf"))
        o_s = tl.load(
            o_base + splits[:, None] * stride_ps + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0
        )
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse_s - m_new)
        acc = acc * alpha + tl.sum(w[:, None] * o_s, 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new

    read = total > 0
    o = acc / tl.where(read, total, 1.0)
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=mask_d
    )
    if HAS_LSE:
        # -inf where nothing was read; a NaN partial (paged_decode's out-of-range blocks) stays NaN
        lse = tl.where(total == 0, float("-inf"), m + tl.log(total))
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + head * stride_lh, lse)


# ---------------------------------------------------------------------------------------------------
# Configs and the split heuristic (tuned on the H200 later; every number here is a knob).


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """Tile and launch parameters of the split kernel."""

    block_n: int  # tokens per tile (power of 2, >= 16)
    num_warps: int
    num_stages: int
    tma: bool = True  # load full K/V tiles through TMA descriptors where the views allow it (_tma_views)
    # Launch the reduce kernel as a programmatic dependent of the split kernel (sm_90+): it is placed while
    # the last splits run and waits for their partials, so the step pays no launch gap between the two.
    pdl: bool = True

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise InvalidRequestError(f"block_n must be a power of 2 >= 16, got {self.block_n}")


# Keyed by the padded head_dim (BLOCK_D). Static sm_90 figures (Triton 3.9 + ptxas, bf16, GROUP 4): each
# config pipelines K/V with cp.async, needs ~72-75 KB of shared memory and 75-100 registers, no spills,
# so 3 programs fit on an SM; a 4th stage costs ~104 KB (2 programs per SM). Not yet timed on the H200.
GPU_DECODE_CONFIGS: dict[int, DecodeConfig] = {
    16: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    32: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    64: DecodeConfig(block_n=128, num_warps=4, num_stages=3),
    128: DecodeConfig(block_n=128, num_warps=4, num_stages=2),  # H200 sweep: bench/tune_decode.py
    256: DecodeConfig(block_n=32, num_warps=4, num_stages=3),
}
# The interpreter: small tiles so short test sequences still cross tile and split boundaries.
CPU_DECODE_CONFIG = DecodeConfig(block_n=32, num_warps=1, num_stages=1, pdl=False)

PROGRAMS_PER_SM = 2  # equal work for ~2 programs per SM: more splits only add partials and reduce (H200 sweep)
MIN_TOKENS_PER_SPLIT = 128  # one tile of 128 tokens a split at least; a longer floor left a small batch's grid
# short of the SMs (batch 1 at 8k: 32 programs at 2048 a split, 31 us a layer in a generate() profile on the
# H100; 13.2 us at 32 splits). H100 sweeps: the heuristic's count is the best at 1x8192, 4x4096, 1x65536, and
# this floor gives the best counts found at 1x2048 (16) and 8x512 (4)
VARIED_LENGTHS = 1.25  # batch * longest > this * total tokens: the lengths vary enough to cut the longest...
MIN_SPLITS_OF_LONGEST = 4  # ...in at least this many pieces, so short requests do not wait on long ones
MAX_SPLITS = 256
MAX_GIVEN_SPLITS = 4096  # an explicit num_splits above this is refused (its partials would be mostly idle memory)
CPU_NUM_SMS = 4  # stands in for the SM count under the interpreter
REDUCE_BLOCK_S = 16  # splits combined per step of the reduce kernel


def block_d_for(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def decode_config(head_dim: int, device: torch.device) -> DecodeConfig:
    if device.type != "cuda":
        return CPU_DECODE_CONFIG
    block_d = block_d_for(head_dim)
    if block_d not in GPU_DECODE_CONFIGS:
        raise InvalidRequestError(f"head_dim {head_dim} is not supported; expected at most {max(GPU_DECODE_CONFIGS)}")
    return GPU_DECODE_CONFIGS[block_d]


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_NUM_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(
    batch_size: int,
    num_kv_heads: int,
    max_seq_len: int,
    *,
    head_dim: int,
    device: torch.device,
    total_tokens: int | None = None,
    block_n: int | None = None,
) -> int:
    """Splits per request for the decode kernels (host only; never synchronises).

    Heuristic (from the H200 split sweeps of bench/decode.py): give ``num_sms * PROGRAMS_PER_SM`` programs
    equal work. The work is ``total_tokens * num_kv_heads`` token-heads (``total_tokens`` = sum of the
    lengths; estimated as ``batch_size * max_seq_len`` when not given), so ``tokens_per_split`` is the
    work per program, at least ``MIN_TOKENS_PER_SPLIT`` (on the CPU: BLOCK_N). When the lengths vary
    (``batch_size * max_seq_len > VARIED_LENGTHS * total_tokens``) the longest request is cut in at least
    ``MIN_SPLITS_OF_LONGEST`` pieces so the short ones do not leave SMs idle. Rounded up to a multiple of
    BLOCK_N; the grid needs ``ceil(max_seq_len / tokens_per_split)`` splits (at most ``MAX_SPLITS``) and
    shorter requests' idle programs exit at once. Batch 1 at 64k tokens gets 32 splits (2048 tokens each), at 8k
    also 32 (256 each); batch 32 at 4k (256 programs) and larger batches one.
    """
    if max_seq_len <= 0 or batch_size <= 0 or num_kv_heads <= 0:
        return 1
    block_n = block_n or decode_config(head_dim, device).block_n
    total = total_tokens if total_tokens is not None else batch_size * max_seq_len
    floor = MIN_TOKENS_PER_SPLIT if device.type == "cuda" else block_n
    tokens_per_split = max(cdiv(max(total, 1) * num_kv_heads, num_sms(device) * PROGRAMS_PER_SM), floor)
    if batch_size * max_seq_len > VARIED_LENGTHS * total:
        tokens_per_split = min(tokens_per_split, max(cdiv(max_seq_len, MIN_SPLITS_OF_LONGEST), block_n))
    tokens_per_split = cdiv(tokens_per_split, block_n) * block_n
    return max(1, min(cdiv(max_seq_len, tokens_per_split), MAX_SPLITS))


def tokens_per_split_for(length_bound: int, num_splits: int, block_n: int) -> int:
    """Tokens each split covers so that num_splits splits cover length_bound tokens (multiple of block_n)."""
    return cdiv(cdiv(max(length_bound, 1), num_splits), block_n) * block_n


# ---------------------------------------------------------------------------------------------------
# Launchers (shared pieces are used by paged_decode.py too).


def check_decode_io(
    q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None, num_splits: int | None
) -> torch.Tensor:
    """Check q / out / lse / num_splits; returns out (allocated if None)."""
    check_tensor("q", q, shape=(None, None, None), dims="B, Hq, D", dtypes=FLOAT_DTYPES, unit_last_stride=True)
    batch, num_q_heads, head_dim = q.shape
    if out is None:
        out = q.new_empty(batch, num_q_heads, head_dim)
    else:
        check_tensor(
            "out", out, shape=q.shape, dims="B, Hq, D", dtypes=(q.dtype,), device=q.device, unit_last_stride=True
        )
    if lse is not None:
        check_tensor("lse", lse, shape=(batch, num_q_heads), dims="B, Hq", dtypes=(torch.float32,), device=q.device)
    if num_splits is not None and (not is_int(num_splits) or not 1 <= num_splits <= MAX_GIVEN_SPLITS):
        raise InvalidRequestError(
            f"num_splits must be a positive int (at most {MAX_GIVEN_SPLITS}) or None, got {num_splits!r}"
        )
    return out


def check_kv(name: str, t: torch.Tensor, q: torch.Tensor, dims: str, num_kv_heads: int | None = None) -> None:
    head_dim = q.shape[2]
    shape = (None, None, num_kv_heads, head_dim)
    check_tensor(name, t, shape=shape, dims=dims, dtypes=FLOAT_DTYPES, device=q.device, unit_last_stride=True)
    check_same_dtype(name, t, "q", q)


def check_gqa(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise InvalidRequestError(f"Hq={num_q_heads} query heads must be a multiple of Hkv={num_kv_heads} KV heads")
    return num_q_heads // num_kv_heads


def plan_splits(
    num_splits: int | None,
    max_seq_len: int | None,
    capacity: int,
    length_stats: Callable[[], tuple[int, int]],
    *,
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
    block_n: int,
) -> tuple[int, int]:
    """(num_splits, tokens_per_split). Calls length_stats (it synchronises) only when both hints are None."""
    if max_seq_len is not None and (not is_int(max_seq_len) or max_seq_len < 0):
        raise InvalidRequestError(f"max_seq_len must be a non-negative int or None, got {max_seq_len!r}")
    max_seq_len = None if max_seq_len is None else int(max_seq_len)  # numpy integers become ints
    if num_splits is None:
        total = None
        if max_seq_len is None:
            max_seq_len, total = length_stats()
        num_splits = choose_num_splits(
            batch,
            num_kv_heads,
            min(max_seq_len, capacity),
            head_dim=head_dim,
            device=device,
            total_tokens=total,
            block_n=block_n,
        )
    bound = capacity if max_seq_len is None else min(max_seq_len, capacity)
    return int(num_splits), tokens_per_split_for(bound, num_splits, block_n)


def split_outputs(
    out: torch.Tensor, lse: torch.Tensor | None, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...], tuple[int, ...]]:
    """Where the split kernel writes: out/lse directly for one split, float32 partials otherwise."""
    if num_splits == 1:
        lse_strides = (lse.stride(0), lse.stride(1), 0) if lse is not None else (0, 0, 0)
        return out, lse, (out.stride(0), out.stride(1), 0), lse_strides
    batch, num_q_heads, head_dim = out.shape
    o_part = torch.empty(batch, num_q_heads, num_splits, head_dim, device=out.device, dtype=torch.float32)
    lse_part = torch.empty(batch, num_q_heads, num_splits, device=out.device, dtype=torch.float32)
    return o_part, lse_part, o_part.stride()[:3], lse_part.stride()


def reduce_splits(
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_ids: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    *,
    num_slots: int,
    capacity: int,
    tokens_per_split: int,
    pdl: bool = False,
) -> None:
    """Launch the reduce kernel over partials [B, Hq, S, D] / [B, Hq, S]; pdl: see :func:`use_pdl`."""
    batch, num_q_heads, num_splits, head_dim = o_part.shape
    launch = {"launch_pdl": True} if pdl else {}  # only then: the interpreter knows no such option
    _decode_reduce_kernel[(num_q_heads, batch)](
        o_part, lse_part, seq_lens, slot_ids if slot_ids is not None else seq_lens, out,
        lse if lse is not None else lse_part,
        num_slots, capacity, tokens_per_split, num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        HEAD_DIM=head_dim, BLOCK_D=block_d_for(head_dim), BLOCK_S=REDUCE_BLOCK_S,
        CHECK_SLOT=slot_ids is not None, HAS_LSE=lse is not None, PDL=pdl,
        num_warps=1 if head_dim <= 64 else 2, **launch,
    )  # fmt: skip


def use_pdl(cfg: DecodeConfig, device: torch.device, num_splits: int) -> bool:
    """Whether the split + reduce launches pair up as programmatic dependent launches (sm_90 and newer)."""
    return cfg.pdl and num_splits > 1 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def input_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    max_seq_len: int | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one new query token per request over its slot's cached tokens.

    Parameters
    ----------
    q : torch.Tensor
        [B, Hq, D], float16 / bfloat16 / float32, unit stride on D.
    k_cache, v_cache : torch.Tensor
        One layer's views [num_slots, max_seq_len, Hkv, D], q's dtype, any strides with unit stride on D.
    slot_ids : torch.Tensor
        int32 [B], contiguous: the slot request b reads. Out-of-range ids (e.g. -1 for CUDA-graph padding)
        read nothing.
    seq_lens : torch.Tensor
        int32 [B], contiguous: request b attends over tokens [0, seq_lens[b]). A length of 0 gives a zero
        output row and lse = -inf.
    sm_scale : float, optional
        Softmax scale; default 1 / sqrt(D).
    out : torch.Tensor, optional
        [B, Hq, D], q's dtype, unit stride on D; written and returned.
    lse : torch.Tensor, optional
        [B, Hq] float32: filled with the natural-log log-sum-exp of the scaled scores.
    num_splits : int, optional
        Splits of the longest request (the grid's split axis). None: chosen by :func:`choose_num_splits`.
    max_seq_len : int, optional
        Host-side bound on seq_lens used to size the splits. With num_splits given and no max_seq_len the
        cache capacity (k_cache.shape[1]) is used. A wrong bound only costs balance, never correctness.
    config : DecodeConfig, optional
        Override the tile configuration (tuning).

    Synchronisation: with ``num_splits`` or ``max_seq_len`` given the launcher never reads device memory
    (CUDA-graph capturable); lengths above the capacity are clamped and out-of-range slots read nothing.
    With both None it reads max/sum of seq_lens (one sync) and raises InvalidRequestError on negative lengths,
    lengths above the capacity and out-of-range slots of non-empty requests.

    Examples
    --------
    >>> q = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    >>> k = torch.randn(4, 128, 2, 64, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    >>> slots = torch.tensor([3, 0], device="cuda", dtype=torch.int32)
    >>> lens = torch.tensor([100, 7], device="cuda", dtype=torch.int32)
    >>> o = decode_attention(q, k, v, slots, lens)  # doctest: +SKIP
    """
    out = check_decode_io(q, out, lse, num_splits)
    batch, num_q_heads, head_dim = q.shape
    dims = "num_slots, max_seq_len, Hkv, D"
    check_kv("k_cache", k_cache, q, dims)
    check_kv("v_cache", v_cache, q, dims, num_kv_heads=k_cache.shape[2])
    if v_cache.shape[:2] != k_cache.shape[:2]:
        raise InvalidRequestError(
            f"v_cache has shape {tuple(v_cache.shape)}; expected k_cache's {tuple(k_cache.shape)}"
        )
    num_slots, capacity, num_kv_heads = k_cache.shape[:3]
    group = check_gqa(num_q_heads, num_kv_heads)
    for name, t in (("slot_ids", slot_ids), ("seq_lens", seq_lens)):
        check_tensor(name, t, shape=(batch,), dims="B", dtypes=INDEX_DTYPES, device=q.device, contiguous=True)
    check_runnable(_decode_split_kernel, q.device, q.dtype)
    cfg = config or decode_config(head_dim, q.device)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_in_tile_offsets(f"{name} token", t.stride(1), cfg.block_n)
    if batch == 0 or num_q_heads == 0:
        return out

    num_splits, tokens_per_split = plan_splits(
        num_splits,
        max_seq_len,
        capacity,
        lambda: _checked_length_stats(seq_lens, slot_ids, num_slots, capacity),
        batch=batch,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        device=q.device,
        block_n=cfg.block_n,
    )
    o_buf, lse_buf, o_strides, lse_strides = split_outputs(out, lse, num_splits)
    scale = log2_softmax_scale(sm_scale, head_dim)

    descs = _tma_views(k_cache, v_cache, cfg.block_n) if cfg.tma else None
    pdl = use_pdl(cfg, q.device, num_splits)
    _decode_split_kernel[(num_splits, num_kv_heads, batch)](
        q, k_cache, v_cache, *(descs or (k_cache, v_cache)), slot_ids, seq_lens, o_buf,
        lse_buf if lse_buf is not None else o_buf,
        scale, num_slots, capacity, tokens_per_split, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *o_strides, *lse_strides,
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d_for(head_dim), BLOCK_N=cfg.block_n,
        HAS_LSE=lse_buf is not None, INPUT_PRECISION=input_precision(q.dtype), USE_TMA=descs is not None,
        PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        reduce_splits(
            o_buf,
            lse_buf,
            seq_lens,
            slot_ids,
            out,
            lse,
            num_slots=num_slots,
            capacity=capacity,
            tokens_per_split=tokens_per_split,
            pdl=pdl,
        )
    return out


def _tma_views(k_cache: torch.Tensor, v_cache: torch.Tensor, block_n: int) -> tuple[object, object] | None:
    """TMA descriptors over K and V seen as [num_slots, capacity, Hkv * D], or None where a view does not
    fit that shape or TMA's rules (then the kernel loads every tile through pointers).

    A tile is [1, BLOCK_N, D]: BLOCK_N tokens of one head. The kernel reads through a descriptor only
    tiles whose tokens all lie below the request's length, so it never touches an unmapped page; the
    partial last tile still uses masked pointer loads.
    """
    if k_cache.device.type == "cuda" and torch.cuda.get_device_capability(k_cache.device)[0] < 9:
        return None  # TMA needs sm_90 or newer; the interpreter emulates it on the CPU
    num_slots, capacity, num_kv_heads, head_dim = k_cache.shape
    if head_dim != block_d_for(head_dim) or 0 in k_cache.shape:
        return None
    descs = []
    for t in (k_cache, v_cache):
        stride_s, stride_t, stride_h, _ = t.stride()
        itemsize = t.element_size()
        if stride_h != head_dim or (stride_s * itemsize) % 16 or (stride_t * itemsize) % 16 or t.data_ptr() % 16:
            return None
        descs.append(
            _TensorDescriptor(
                t, [num_slots, capacity, num_kv_heads * head_dim], [stride_s, stride_t, 1], [1, block_n, head_dim]
            )
        )
    return descs[0], descs[1]


def _checked_length_stats(
    seq_lens: torch.Tensor, slot_ids: torch.Tensor, num_slots: int, capacity: int
) -> tuple[int, int]:
    """(max length, total tokens), read in one synchronisation, after validating lengths and slots."""
    active = seq_lens > 0
    slots = torch.where(active, slot_ids, 0)
    stats = torch.stack([seq_lens.max(), seq_lens.sum(), seq_lens.min(), slots.min(), slots.max()]).tolist()
    longest, total, shortest, low_slot, high_slot = (int(x) for x in stats)
    if shortest < 0:
        raise InvalidRequestError(f"seq_lens has a negative length {shortest}; expected lengths >= 0")
    if longest > capacity:
        raise InvalidRequestError(f"seq_lens has length {longest}; expected at most the cache's max_seq_len {capacity}")
    if low_slot < 0 or high_slot >= num_slots:
        bad = low_slot if low_slot < 0 else high_slot
        raise InvalidRequestError(
            f"slot_ids has slot {bad} for a non-empty request; expected slots in [0, {num_slots})"
        )
    return longest, total


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 torch reference of :func:`decode_attention`: returns (out [B, Hq, D], lse [B, Hq]), float32."""
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    num_slots, capacity = k_cache.shape[:2]
    for b, (slot, n) in enumerate(zip(slot_ids.tolist(), seq_lens.tolist(), strict=True)):
        n = min(n, capacity)
        if n <= 0 or not 0 <= slot < num_slots:
            continue
        k = k_cache[slot, :n].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[slot, :n].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, dim=-1), v)
    return out, lse
