# SPDX-License-Identifier: Apache-2.0
"""PagedAttention decode baseline: decode.py's kernel design reading KV through a block table.

Shapes and strides (elements):
    q                 [B, Hq, D]                               strides (stride_qb, stride_qh, 1)
    k_pages, v_pages  [num_blocks, block_size, Hkv, D]         strides (stride_b, stride_t, stride_h, 1), any
    block_table       int32 [B, max_blocks_per_seq]            token i of request b lives at
                      (block_table[b, i // block_size], i % block_size)
    seq_lens          int32 [B]
    out               [B, Hq, D] q's dtype;  lse [B, Hq] float32 (optional)

Same split-K / GQA / online-softmax / reduce structure as decode.py (the split heuristic, the tile step
and the split reduce are _common.py's, as decode.py's are), so the two compare apples to apples: the only
difference is the address of a token. When BLOCK_N <= block_size a tile lies inside one page and costs one
table lookup; otherwise each token looks its page up.

Invariant: as in decode.py, only tokens below the visible length (seq_lens[b] clamped to
[0, max_blocks_per_seq * block_size]) are loaded and only their block-table entries are read. The kernel
never reads outside k_pages / v_pages: each table lookup compares the id with num_blocks (one unsigned
compare per tile, enforced in _page_rows); a request whose used entries leave [0, num_blocks) reads no KV
at those entries and gets a NaN output row and lse, with no host synchronisation.
"""

import math

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
    check_num_splits,
    check_token_strides,
    decode_config,
    input_precision,
    next_power_of_2,
    plan_decode,
    store_split,
    visible_len,
)

MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 256
MAX_BLOCKS = 2**31 - 1  # block ids are int32: with more blocks, every non-negative id is in range


@triton.jit
def _page_rows(table, n0, tokens, num_blocks, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt,
               PAGE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Row pointers [BLOCK_N, 1] of K and V for ``tokens`` (all in the tile starting at n0), and whether every
    block they name lies in [0, num_blocks). Blocks outside it are replaced by block 0, never addressed."""
    if BLOCK_N <= PAGE:  # n0 is a multiple of BLOCK_N, so the tile lies in one page
        block = tl.load(table + n0 // PAGE)
        in_range = block.to(tl.uint32) < num_blocks  # one compare: negative ids wrap to >= 2**31
        block = tl.where(in_range, block, 0).to(tl.int64)
        k_rows = k_head + block * stride_kb + (tokens % PAGE)[:, None] * stride_kt
        v_rows = v_head + block * stride_vb + (tokens % PAGE)[:, None] * stride_vt
    else:
        blocks = tl.load(table + tokens // PAGE)
        each_in_range = blocks.to(tl.uint32) < num_blocks
        in_range = tl.min(each_in_range.to(tl.int32), 0) > 0
        blocks = tl.where(each_in_range, blocks, 0).to(tl.int64)
        k_rows = k_head + blocks[:, None] * stride_kb + (tokens % PAGE)[:, None] * stride_kt
        v_rows = v_head + blocks[:, None] * stride_vb + (tokens % PAGE)[:, None] * stride_vt
    return k_rows, v_rows, in_range


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    qk_scale, max_seq_len, num_blocks, tokens_per_split, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LSE: tl.constexpr, INPUT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # as in decode.py: the reduce kernel may be placed now and waits for the partials
        gdc_launch_dependents()
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = visible_len(seq_lens_ptr, seq_lens_ptr, b, 0, max_seq_len, False)
    start = split * tokens_per_split
    if (split > 0) & (start >= seq_len):
        return
    end = tl.where(split == num_splits - 1, seq_len, tl.minimum(start + tokens_per_split, seq_len))

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    table = block_table_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    in_range = tl.full([], 1, tl.int1)  # every block the split used lies in [0, num_blocks)
    # A deliberate copy of decode.py's kernel (its prologue above, its loop here: this is the PagedAttention
    # baseline, which must run the same code but for the address), tiles found through the table:
    # full tiles without a token mask, then the partial last tile (at most one) masked.
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    d_mask = mask_d[None, :] if HEAD_DIM != BLOCK_D else None
    for n0 in range(start, full_end, BLOCK_N):
        k_rows, v_rows, tile_in_range = _page_rows(
            table, n0, n0 + offs_n, num_blocks, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt, PAGE,
            BLOCK_N,
        )  # fmt: skip
        in_range &= tile_in_range
        k = tl.load(k_rows + offs_d[None, :], mask=d_mask)
        v = tl.load(v_rows + offs_d[None, :], mask=d_mask)
        m_i, l_i, acc = attend_tile(q, k, v, offs_n, m_i, l_i, acc, qk_scale, INPUT_PRECISION, False)
    for n0 in range(full_end, end, BLOCK_N):
        valid = n0 + offs_n < end
        tokens = n0 + tl.where(valid, offs_n, 0)  # masked lanes address token n0 (< end)
        k_rows, v_rows, tile_in_range = _page_rows(
            table, n0, tokens, num_blocks, k_head, v_head, stride_kb, stride_kt, stride_vb, stride_vt, PAGE, BLOCK_N
        )
        in_range &= tile_in_range
        kv_mask = valid[:, None] if HEAD_DIM == BLOCK_D else valid[:, None] & mask_d[None, :]
        k = tl.load(k_rows + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_rows + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, INPUT_PRECISION)
    # A block id outside [0, num_blocks) makes the request's row NaN (out and lse); nothing was read there.
    acc = tl.where(in_range, acc, float("nan"))
    m_i = tl.where(in_range, m_i, float("nan"))
    l_i = tl.where(in_range, l_i, 1.0)

    store_split(acc, m_i, l_i, o_ptr, lse_ptr, b, heads, split, offs_d, mask_g, mask_d,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls, HAS_LSE)  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    sm_scale: float | None = None, out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
    num_splits: int | None = None, *, max_len: int | None = None, config: DecodeConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """Decode attention over a paged KV cache (baseline for :func:`vkv.kernels.decode_attention`).

    Parameters
    ----------
    q : torch.Tensor
        [B, Hq, D], float16 / bfloat16 / float32, unit stride on D.
    k_pages, v_pages : torch.Tensor
        [num_blocks, block_size, Hkv, D], q's dtype, unit stride on D; block_size a power of 2 in [16, 256].
    block_table : torch.Tensor
        int32 [B, max_blocks_per_seq], unit stride on its last axis: the pages of each request, in order.
        Only the entries covering [0, seq_lens[b]) are read. A used entry outside [0, num_blocks) raises
        InvalidRequestError when the launcher synchronises (num_splits and max_len both None); otherwise
        the kernel reads nothing there and writes NaN to that request's output row and lse.
    seq_lens : torch.Tensor
        int32 [B], contiguous. 0 gives a zero output row and lse = -inf.
    sm_scale, out, lse, num_splits, max_len, config
        As in :func:`vkv.kernels.decode_attention`; a request's max_seq_len is max_blocks_per_seq * block_size.
        Never synchronises when num_splits or max_len is given; otherwise reads max/sum of seq_lens.

    Examples
    --------
    CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1, float32); on a GPU, pass device="cuda" and bf16.

    >>> q = torch.randn(2, 8, 64)
    >>> k = torch.randn(16, 16, 2, 64); v = torch.randn_like(k)  # 16 pages of 16 tokens
    >>> table = torch.randperm(16, dtype=torch.int32).view(2, 8)
    >>> lens = torch.tensor([100, 17], dtype=torch.int32)
    >>> o = paged_decode_attention(q, k, v, table, lens)
    >>> ref, _ = paged_decode_attention_reference(q, k, v, table, lens)
    >>> torch.allclose(o, ref, atol=1e-4)
    True
    """
    index = {"block_table": block_table, "seq_lens": seq_lens}
    out, group = check_attention_inputs(
        q,
        k_pages,
        v_pages,
        index,
        out,
        lse,
        kernel=_paged_decode_split_kernel,
        q_dims="B, Hq, D",
        kv_names=("k_pages", "v_pages"),
        kv_dims="num_blocks, block_size, Hkv, D",
    )
    check_num_splits(num_splits)
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    if block_size != next_power_of_2(block_size) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidRequestError(
            f"block_size (k_pages.shape[1]) is {block_size}; expected a power of 2 in [{MIN_BLOCK_SIZE}, "
            f"{MAX_BLOCK_SIZE}]"
        )
    if k_pages.shape[0] == 0 and batch > 0:
        raise InvalidRequestError("k_pages has no blocks (shape[0] is 0); expected at least one page of KV")
    cfg = config or decode_config(head_dim, q.device)
    check_token_strides((("k_pages", k_pages), ("v_pages", v_pages)), cfg.block_n)
    max_seq_len = block_table.shape[1] * block_size
    if batch == 0 or num_q_heads == 0:
        return out

    lengths = lambda: _checked_length_stats(seq_lens, block_table, k_pages.shape[0], max_seq_len)  # noqa: E731
    plan = plan_decode(q, out, lse, sm_scale, cfg, num_splits, max_len, max_seq_len, lengths, num_kv_heads)
    _paged_decode_split_kernel[(plan.num_splits, num_kv_heads, batch)](
        q, k_pages, v_pages, block_table, seq_lens, plan.o_buf, plan.lse_arg,
        plan.scale, max_seq_len, min(k_pages.shape[0], MAX_BLOCKS), plan.tokens_per_split, plan.num_splits,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        block_table.stride(0),
        *plan.o_strides, *plan.lse_strides,
        GROUP=group, HEAD_DIM=head_dim, PAGE=block_size,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d_for(head_dim), BLOCK_N=cfg.block_n,
        HAS_LSE=plan.lse_buf is not None, INPUT_PRECISION=input_precision(q.dtype), PDL=plan.pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return plan.finish(seq_lens, None, out, lse, num_slots=0, max_seq_len=max_seq_len)


def _checked_length_stats(
    seq_lens: torch.Tensor, block_table: torch.Tensor, num_blocks: int, max_seq_len: int
) -> tuple[int, int]:
    """(max length, total tokens) in one synchronisation; validates lengths and the used table entries."""
    block_size = max_seq_len // max(block_table.shape[1], 1)
    used = torch.arange(block_table.shape[1], device=seq_lens.device) * block_size < seq_lens[:, None].long()
    entries = torch.where(used, block_table, 0)
    stats = torch.stack([seq_lens.max(), seq_lens.sum(), seq_lens.min(), entries.min(), entries.max()]).tolist()
    longest, total, shortest, low, high = (int(x) for x in stats)
    if shortest < 0:
        raise InvalidRequestError(f"seq_lens has a negative length {shortest}; expected lengths >= 0")
    if longest > max_seq_len:
        raise InvalidRequestError(
            f"seq_lens has length {longest}; expected at most max_blocks_per_seq * block_size = {max_seq_len}"
        )
    if low < 0 or high >= num_blocks:
        bad = low if low < 0 else high
        raise InvalidRequestError(f"block_table has block {bad} in use; expected blocks in [0, {num_blocks})")
    return longest, total


def paged_decode_attention_reference(
    q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Float32 torch reference of :func:`paged_decode_attention`: (out [B, Hq, D], lse [B, Hq]), float32."""
    block_size = k_pages.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        n = min(n, block_table.shape[1] * block_size)
        if n > 0:
            blocks = block_table[b, : math.ceil(n / block_size)].long()
            k, v = k_pages[blocks].flatten(0, 1)[:n], v_pages[blocks].flatten(0, 1)[:n]  # [n, Hkv, D]
            out[b], lse[b] = attend_reference(q[b], k, v, sm_scale)
    return out, lse
