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
partial output and its log-sum-exp; the split reduce (_common.reduce_splits) combines the partials by
log-sum-exp. With one split the split kernel writes out/lse directly and no reduce runs.

Work is balanced by tokens, not by requests: every split covers the same ``tokens_per_split`` tokens
(a multiple of BLOCK_N), so a request of n tokens uses ceil(n / tokens_per_split) splits and the
programs beyond it exit at once. The last split of the grid takes whatever remains of a request, so
results never depend on the length hint that sized the grid. See :func:`choose_num_splits`.

Invariant (vkv): a program loads K/V only at token indices < the request's visible length, which is
seq_lens[b] clamped to [0, max_seq_len], and 0 when slot_ids[b] lies outside [0, num_slots). Full tiles
(all BLOCK_N tokens below the split's end) load unmasked, through TMA descriptors where the views allow
(sm_90+, power-of-2 head_dim, adjacent heads: see _common.tma_views) and through pointers otherwise. The one
partial tile per split loads masked, masked lanes given the address of the tile's first token (always
below the length), so no address at or beyond the length, and none in another slot, is ever formed:
those bytes may be unmapped.

The split-K scheme follows Flash-Decoding (https://crfm.stanford.edu/2023/10/12/flashdecoding.html).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from vkv.allocator.errors import InvalidRequestError

from ._common import (
    DecodeConfig,
    attend_reference,
    attend_tile,
    block_d_for,
    check_attention_inputs,
    check_lengths_and_slots,
    check_num_splits,
    check_token_strides,
    decode_config,
    input_precision,
    next_power_of_2,
    plan_decode,
    store_split,
    tma_views,
    visible_len,
)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, slot_ids_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    qk_scale, num_slots, max_seq_len, tokens_per_split, num_splits,
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
    seq_len = visible_len(seq_lens_ptr, slot_ids_ptr, b, num_slots, max_seq_len, True)
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
    # descriptor over the layer view seen as [num_slots, max_seq_len, Hkv * HEAD_DIM] (see tma_views).
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
        m_i, l_i, acc = attend_tile(q, k, v, offs_n, m_i, l_i, acc, qk_scale, INPUT_PRECISION, False)
    # The last, partial tile (at most one): masked loads.
    for n0 in range(full_end, end, BLOCK_N):
        valid = n0 + offs_n < end
        rows = tl.where(valid, offs_n, 0)  # masked lanes address token n0 (< end): nothing past seq_len
        kv_mask = valid[:, None] if HEAD_DIM == BLOCK_D else valid[:, None] & mask_d[None, :]
        tile = tl.cast(n0, tl.int64)
        k = tl.load(k_base + tile * stride_kt + rows[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + tile * stride_vt + rows[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, INPUT_PRECISION)

    store_split(acc, m_i, l_i, o_ptr, lse_ptr, b, heads, split, offs_d, mask_g, mask_d,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls, HAS_LSE)  # fmt: skip


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
    max_len: int | None = None,
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
    max_len : int, optional
        Host-side bound on seq_lens used to size the splits. With num_splits given and no max_len the
        slots' max_seq_len (k_cache.shape[1]) is used. A wrong bound only costs balance, never correctness.
    config : DecodeConfig, optional
        Override the tile configuration (tuning).

    Synchronisation: with ``num_splits`` or ``max_len`` given the launcher never reads device memory
    (CUDA-graph capturable); lengths above max_seq_len are clamped and out-of-range slots read nothing.
    With both None it reads max/sum of seq_lens (one sync) and raises InvalidRequestError on negative lengths,
    lengths above max_seq_len and out-of-range slots of non-empty requests.

    Examples
    --------
    CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1, float32); on a GPU, pass device="cuda" and bf16.

    >>> q = torch.randn(2, 8, 64)  # 2 requests, 8 query heads over 2 KV heads
    >>> k = torch.randn(4, 128, 2, 64); v = torch.randn_like(k)  # 4 slots of 128 tokens
    >>> slots = torch.tensor([3, 0], dtype=torch.int32)
    >>> lens = torch.tensor([100, 7], dtype=torch.int32)
    >>> o = decode_attention(q, k, v, slots, lens)
    >>> ref, _ = decode_attention_reference(q, k, v, slots, lens)
    >>> o.shape, torch.allclose(o, ref, atol=1e-4)
    (torch.Size([2, 8, 64]), True)
    """
    index = {"slot_ids": slot_ids, "seq_lens": seq_lens}
    out, group = check_attention_inputs(
        q, k_cache, v_cache, index, out, lse, kernel=_decode_split_kernel, q_dims="B, Hq, D"
    )
    check_num_splits(num_splits)
    batch, num_q_heads, head_dim = q.shape
    num_slots, max_seq_len, num_kv_heads = k_cache.shape[:3]
    cfg = config or decode_config(head_dim, q.device)
    check_token_strides((("k_cache", k_cache), ("v_cache", v_cache)), cfg.block_n)
    if batch == 0 or num_q_heads == 0:
        return out

    lengths = lambda: _checked_length_stats(seq_lens, slot_ids, num_slots, max_seq_len)  # noqa: E731 - it syncs
    plan = plan_decode(q, out, lse, sm_scale, cfg, num_splits, max_len, max_seq_len, lengths, num_kv_heads)
    descs = tma_views(k_cache, v_cache, cfg.block_n) if cfg.tma else None
    _decode_split_kernel[(plan.num_splits, num_kv_heads, batch)](
        q, k_cache, v_cache, *(descs or (k_cache, v_cache)), slot_ids, seq_lens, plan.o_buf, plan.lse_arg,
        plan.scale, num_slots, max_seq_len, plan.tokens_per_split, plan.num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *plan.o_strides, *plan.lse_strides,
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d_for(head_dim), BLOCK_N=cfg.block_n,
        HAS_LSE=plan.lse_buf is not None, INPUT_PRECISION=input_precision(q.dtype), USE_TMA=descs is not None,
        PDL=plan.pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return plan.finish(seq_lens, slot_ids, out, lse, num_slots=num_slots, max_seq_len=max_seq_len)


def _checked_length_stats(
    seq_lens: torch.Tensor, slot_ids: torch.Tensor, num_slots: int, max_seq_len: int
) -> tuple[int, int]:
    """(max length, total tokens), read in one synchronisation, after validating lengths and slots."""
    active = seq_lens > 0
    slots = torch.where(active, slot_ids, 0)
    stats = torch.stack([seq_lens.max(), seq_lens.sum(), seq_lens.min(), slots.min(), slots.max()]).tolist()
    longest, total, shortest, low_slot, high_slot = (int(x) for x in stats)
    if shortest < 0:
        raise InvalidRequestError(f"seq_lens has a negative length {shortest}; expected lengths >= 0")
    check_lengths_and_slots(longest, low_slot, high_slot, num_slots=num_slots, max_seq_len=max_seq_len)
    return longest, total


def decode_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor, seq_lens: torch.Tensor,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Float32 torch reference of :func:`decode_attention`: returns (out [B, Hq, D], lse [B, Hq]), float32."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    num_slots, max_seq_len = k_cache.shape[:2]
    for b, (slot, n) in enumerate(zip(slot_ids.tolist(), seq_lens.tolist(), strict=True)):
        n = min(n, max_seq_len)
        if n > 0 and 0 <= slot < num_slots:
            out[b], lse[b] = attend_reference(q[b], k_cache[slot, :n], v_cache[slot, :n], sm_scale)
    return out, lse
