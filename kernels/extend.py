# SPDX-License-Identifier: Apache-2.0
"""Prefill / extend attention: ragged new tokens per request, causal over a cached prefix in the same slot.

Shapes and strides (elements):
    q, out            [T, Hq, D]   strides (stride_qt, stride_qh, 1); request b's queries are rows
                      [cu_seqlens_q[b], cu_seqlens_q[b + 1])
    k_cache, v_cache  [num_slots, max_seq_len, Hkv, D] strides (stride_s, stride_t, stride_h, 1), any
    slot_ids          int32 [B]
    cu_seqlens_q      int32 [B + 1]
    seq_lens          int32 [B]   cached prefix + new tokens; the new tokens' K/V are already stored
Request b with new = cu_seqlens_q[b + 1] - cu_seqlens_q[b] and prefix = seq_lens[b] - new: its i-th query
sits at position prefix + i and attends to tokens [0, prefix + i] (causal, bottom-right aligned).

One program per (BLOCK_M query rows, query head, request), flash-attention style (with pack_heads > 1 the
rows are BLOCK_M / pack_heads positions of pack_heads query heads that share a KV head): K/V tiles of BLOCK_N
tokens, online softmax in float32. Tiles every row sees in full run without masks (through TMA descriptors
where the views allow, as in decode.py); the tiles crossing the causal diagonal run with the mask; tiles
entirely beyond the diagonal are skipped. Programs take row blocks last-first, so the longest start first.

With a tile list (``tiles``, int32 [num_tiles, 2] of (request, row block), built by :func:`extend_tiles`) the
grid is (head groups, num_tiles) instead: one program per listed row block, none for the row blocks a short
request does not have, and a list longer than the step's (rows of request -1) launches the same grid for every
step of up to so many tokens, as a CUDA graph captured once needs.

Invariant (vkv): K/V are loaded only at token indices below the visible length (seq_lens[b] clamped to
[0, max_seq_len]; 0 if slot_ids[b] is outside [0, num_slots)); masked lanes address a token below it.

Follows FlashAttention-2 (https://arxiv.org/abs/2307.08691) and Triton's fused-attention tutorial.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vkv.allocator.checks import check_int, check_ints
from vkv.allocator.errors import InvalidRequestError

from ._common import (
    block_d_for,
    check_attention_inputs,
    check_in_tile_offsets,
    check_lengths_and_slots,
    check_tensor,
    check_token_strides,
    input_precision,
    length_hint,
    log2_softmax_scale,
    tma_views,
    visible_len,
)


@triton.jit
def _extend_tile(q, k, v, m_i, l_i, acc, qk_scale, mask, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MASKED:
        s = tl.where(mask, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row may have seen nothing yet (only with invalid lengths): keep exp2 away from -inf - -inf
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_new[:, None])
    else:  # qk_scale > 0, so the row max commutes with it and the scaling folds into one FMA per score
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["batch"])  # the eager grid's batch varies step to step: no variant per value
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, slot_ids_ptr, cu_seqlens_ptr, seq_lens_ptr, tiles_ptr,
    qk_scale, num_tokens, num_slots, max_seq_len, batch,
    stride_qt, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, TILE_LIST: tl.constexpr,
):  # fmt: skip
    BLOCK_P: tl.constexpr = BLOCK_M // HEADS  # query positions per program; row r is head r // BLOCK_P
    if TILE_LIST:  # (request, row block) from the list; a row of another request (-1: padding) runs nothing. The
        # head groups of one row block are neighbours in the launch (axis 0), as in the grid below: the programs
        # that share a KV head run together and read its tiles once from memory, then from L2
        head = tl.program_id(0) * HEADS
        b = tl.load(tiles_ptr + 2 * tl.program_id(1))
        m_block = tl.load(tiles_ptr + 2 * tl.program_id(1) + 1)
        if (b < 0) | (b >= batch) | (m_block < 0):
            return
    else:
        head = tl.program_id(1) * HEADS  # the program's first query head; all HEADS share one KV head
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the last rows (the most work, causal) start first
        b = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + b)
    num_new = tl.load(cu_seqlens_ptr + b + 1) - q_start
    m0 = m_block * BLOCK_P
    if m0 >= num_new:
        return
    seq_len = visible_len(seq_lens_ptr, slot_ids_ptr, b, num_slots, max_seq_len, True)
    prefix = seq_len - num_new
    slot = tl.where(seq_len > 0, tl.load(slot_ids_ptr + b), 0).to(tl.int64)
    kv_head = head // GROUP

    offs_m = tl.arange(0, BLOCK_M) % BLOCK_P  # each row's position in the block
    offs_h = tl.arange(0, BLOCK_M) // BLOCK_P  # each row's head in the program
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    row = q_start + m0 + offs_m
    mask_m = (m0 + offs_m < num_new) & (row >= 0) & (row < num_tokens)
    pos = prefix + m0 + offs_m
    q_rows = (q_ptr + tl.cast(q_start + m0, tl.int64) * stride_qt + head * stride_qh
              + offs_m[:, None] * stride_qt + offs_h[:, None] * stride_qh)  # fmt: skip
    q = tl.load(q_rows + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Tiles below the first row's position: every row sees every token, no masks (all < seq_len).
    full_end = tl.maximum(prefix + m0 + 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        if USE_TMA:  # see tma_views: a [1, BLOCK_N, D] box of one head
            k = k_desc.load([slot.to(tl.int32), n0, kv_head * HEAD_DIM]).reshape(BLOCK_N, BLOCK_D)
            v = v_desc.load([slot.to(tl.int32), n0, kv_head * HEAD_DIM]).reshape(BLOCK_N, BLOCK_D)
        else:
            tile = tl.cast(n0, tl.int64)
            k_rows = k_base + tile * stride_kt + offs_n[:, None] * stride_kt
            v_rows = v_base + tile * stride_vt + offs_n[:, None] * stride_vt
            if HEAD_DIM == BLOCK_D:
                k = tl.load(k_rows + offs_d[None, :])
                v = tl.load(v_rows + offs_d[None, :])
            else:
                k = tl.load(k_rows + offs_d[None, :], mask=mask_d[None, :], other=0.0)
                v = tl.load(v_rows + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        m_i, l_i, acc = _extend_tile(q, k, v, m_i, l_i, acc, qk_scale, None, False, INPUT_PRECISION)
    # Tiles crossing the diagonal, up to the last row's position; tiles beyond it are skipped.
    hi = tl.minimum(seq_len, prefix + m0 + BLOCK_P)
    for n0 in range(full_end, hi, BLOCK_N):
        cols = n0 + offs_n
        valid = cols < seq_len
        rows = tl.where(valid, offs_n, 0)  # masked lanes address token n0 (< seq_len)
        tile = tl.cast(n0, tl.int64)
        kv_mask = valid[:, None] if HEAD_DIM == BLOCK_D else valid[:, None] & mask_d[None, :]
        k = tl.load(k_base + tile * stride_kt + rows[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + tile * stride_vt + rows[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        causal = (cols[None, :] <= pos[:, None]) & valid[None, :]
        m_i, l_i, acc = _extend_tile(q, k, v, m_i, l_i, acc, qk_scale, causal, True, INPUT_PRECISION)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows that saw nothing (invalid lengths) write zeros
    o_rows = (o_ptr + tl.cast(q_start + m0, tl.int64) * stride_ot + head * stride_oh
              + offs_m[:, None] * stride_ot + offs_h[:, None] * stride_oh)  # fmt: skip
    tl.store(o_rows + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@dataclass(frozen=True, slots=True)
class ExtendConfig:
    """Tile and launch parameters of the extend kernel."""

    block_m: int  # query rows per program (power of 2, >= 16): block_m // heads positions of each packed head
    block_n: int  # tokens per K/V tile (power of 2, >= 16)
    num_warps: int
    num_stages: int
    tma: bool = True  # load the K/V tiles below the diagonal through TMA descriptors where the views allow
    # Query heads of one KV head stacked in a program's rows (FlashAttention-3's PackGQA idea): the K/V tiles
    # are loaded once for them, and the causal diagonal is as narrow as block_m // pack_heads positions. Where
    # the GQA group is not a multiple, the heads that divide it are packed (none for MHA) in the same rows.
    pack_heads: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise InvalidRequestError(f"{name} must be a power of 2 >= 16, got {value}")
        if self.pack_heads < 1 or self.pack_heads & (self.pack_heads - 1) or self.block_m // self.pack_heads < 16:
            raise InvalidRequestError(
                f"pack_heads must be a power of 2 leaving >= 16 positions of block_m {self.block_m}, "
                f"got {self.pack_heads}"
            )

    def packed(self, group: int) -> tuple[int, int]:
        """(heads per program, rows per program) for ``group`` query heads per KV head: the packed heads must
        divide the group; the rows (the tile the sweep measured) stay block_m."""
        return math.gcd(self.pack_heads, group), self.block_m


# Keyed by the padded head_dim (BLOCK_D). D=128: 128-token K/V tiles, two query heads packed a program (spill-free
# on sm_90 where the unpacked tiles spill), the best of the H200 sweeps; over short KV (at most SHORT_KV tokens)
# 64-token tiles do best. Other head dims keep unpacked tiles (not measured packed). See docs/kernels.md.
GPU_EXTEND_CONFIGS: dict[int, ExtendConfig] = {
    16: ExtendConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    32: ExtendConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    64: ExtendConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    128: ExtendConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, pack_heads=2),
    256: ExtendConfig(block_m=64, block_n=32, num_warps=8, num_stages=2),
}
MAX_TILES = 65535  # a tile list is the grid's second axis (CUDA: at most 65,535 blocks)
SHORT_KV = 2048  # the longest request's KV (prefix + new) up to which GPU_EXTEND_SHORT_KV_CONFIGS apply
GPU_EXTEND_SHORT_KV_CONFIGS: dict[int, ExtendConfig] = {
    128: ExtendConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, pack_heads=2),
}
CPU_EXTEND_CONFIG = ExtendConfig(block_m=64, block_n=32, num_warps=1, num_stages=1)
# float32 tiles take twice the shared memory of 16-bit ones: at D=128, 128-token K/V tiles at 3 stages do not fit
# sm_90's 227 KiB, 64-token ones do. 4-byte inputs get K/V tiles of at most this.
FP32_MAX_BLOCK_N = 64


def extend_config(
    head_dim: int, device: torch.device, max_len: int | None = None, dtype: torch.dtype = torch.bfloat16
) -> ExtendConfig:
    """The tiles for ``head_dim`` and ``dtype`` on ``device``; ``max_len`` (the longest request's prefix + new
    tokens, None: unknown, taken as long) picks the short-KV tiles where they were measured faster."""
    if device.type != "cuda":
        return CPU_EXTEND_CONFIG
    block_d = block_d_for(head_dim)
    if block_d not in GPU_EXTEND_CONFIGS:
        raise InvalidRequestError(f"head_dim {head_dim} is not supported; expected at most {max(GPU_EXTEND_CONFIGS)}")
    if max_len is not None and max_len <= SHORT_KV and block_d in GPU_EXTEND_SHORT_KV_CONFIGS:
        cfg = GPU_EXTEND_SHORT_KV_CONFIGS[block_d]
    else:
        cfg = GPU_EXTEND_CONFIGS[block_d]
    if dtype.itemsize >= 4 and cfg.block_n > FP32_MAX_BLOCK_N:
        cfg = dataclasses.replace(cfg, block_n=FP32_MAX_BLOCK_N)
    return cfg


def extend_variants(
    head_dim: int,
    device: torch.device,
    max_seq_len: int,
    min_tokens: int = 2,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> list[list[tuple[int, int]]]:
    """Steps, as their requests' (prefix, new) token counts, that together compile every variant of the extend
    kernel's eager grid that a step of ``min_tokens`` to ``max_tokens`` tokens over sequences of at most
    ``max_seq_len`` launches on ``device``: Triton compiles one per tile config (short- or long-KV, by the step's
    longest sequence) and per whether the step's token count is a multiple of 16 (it specializes integer
    arguments on that). A warm-up runs them so that no request waits for a compile (seconds each). None on the
    CPU (the interpreter compiles nothing)."""
    max_seq_len = check_int("max_seq_len", max_seq_len, lo=1)
    lo = check_int("min_tokens", min_tokens, lo=1)
    max_tokens = max_seq_len if max_tokens is None else check_int("max_tokens", max_tokens, lo=1)
    if device.type != "cuda":
        return []
    counts = [n for n in (-(-lo // 16) * 16, lo if lo % 16 else lo + 1) if n <= max_tokens]  # 16k, and not

    def split(tokens: int, most: int) -> list[tuple[int, int]]:  # new requests of at most ``most`` tokens each
        return [(0, min(most, tokens - i)) for i in range(0, tokens, most)]

    short = extend_config(head_dim, device, SHORT_KV, dtype)
    steps = [split(n, min(SHORT_KV, max_seq_len)) for n in counts]  # the short-KV tiles (or the only ones)
    if max_seq_len > SHORT_KV and extend_config(head_dim, device, None, dtype) != short:
        for n in counts:  # one sequence past the short-KV tiles' lengths, the rest of the tokens beside it
            first = min(n, SHORT_KV + 1)
            steps.append([(SHORT_KV + 1 - first, first), *split(n - first, max_seq_len)])
    return steps


def extend_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor, cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float | None = None, out: torch.Tensor | None = None,
    max_new_tokens: int | None = None, *, max_len: int | None = None, config: ExtendConfig | None = None,
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of each request's new tokens over its slot (cached prefix + the new tokens).

    Parameters
    ----------
    q : torch.Tensor
        [T, Hq, D], float16 / bfloat16 / float32, unit stride on D: the new tokens of all requests.
    k_cache, v_cache : torch.Tensor
        One layer's views [num_slots, max_seq_len, Hkv, D], q's dtype, any strides with unit stride on D.
        The new tokens' K/V must already be stored (see :func:`vkv.kernels.store_kv`).
    slot_ids : torch.Tensor
        int32 [B], contiguous.
    cu_seqlens_q : torch.Tensor
        int32 [B + 1], contiguous, non-decreasing: request b's queries are q[cu[b]:cu[b + 1]].
    seq_lens : torch.Tensor
        int32 [B], contiguous: cached prefix + new tokens of each request (>= its new tokens).
    sm_scale : float, optional
        Softmax scale; default 1 / sqrt(D).
    out : torch.Tensor, optional
        [T, Hq, D], q's dtype, unit stride on D; written (rows of the requests) and returned.
    max_new_tokens : int, optional
        Host-side max of cu[b + 1] - cu[b]; sizes the grid. Given, the launcher never synchronises
        (CUDA-graph capturable) and must be >= the true max (longer requests are cut short). None: read
        from the device (one sync), which also validates cu_seqlens_q, seq_lens and slot_ids (InvalidRequestError).
    max_len : int, optional
        Host-side max of seq_lens (prefix + new tokens), a hint that picks the tiles (:func:`extend_config`);
        never read from the device. None: the tiles for long KV.
    config : ExtendConfig, optional
        Override the tile configuration (tuning).
    tiles : torch.Tensor, optional
        int32 [num_tiles, 2], contiguous: the (request, row block) pairs to run, from :func:`extend_tiles` with
        this call's :func:`extend_tile_positions`; rows of request -1 run nothing; at most MAX_TILES rows. Given,
        the grid is (head groups, num_tiles) whatever the step (CUDA-graph capturable: the list's length fixes the
        launch; max_new_tokens is not needed), and row blocks not listed are not computed.

    Examples
    --------
    CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1, float32); on a GPU, pass device="cuda" and bf16.

    >>> q = torch.randn(5, 8, 64)  # 2 + 3 new tokens
    >>> k = torch.randn(4, 64, 2, 64); v = torch.randn_like(k)  # their K/V already stored in the slots
    >>> slots = torch.tensor([1, 2], dtype=torch.int32)
    >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    >>> lens = torch.tensor([40, 3], dtype=torch.int32)  # prefixes 38 and 0
    >>> o = extend_attention(q, k, v, slots, cu, lens, max_new_tokens=3)
    >>> torch.allclose(o, extend_attention_reference(q, k, v, slots, cu, lens), atol=1e-4)
    True
    """
    index = {"slot_ids": slot_ids, "cu_seqlens_q": cu_seqlens_q, "seq_lens": seq_lens}
    out, group = check_attention_inputs(q, k_cache, v_cache, index, out, kernel=_extend_kernel, q_dims="T, Hq, D")
    max_new_tokens = length_hint("max_new_tokens", max_new_tokens)
    max_len = length_hint("max_len", max_len)
    num_tokens, num_q_heads, head_dim = q.shape
    num_slots, max_seq_len = k_cache.shape[:2]
    batch = slot_ids.shape[0]
    if max_new_tokens is not None:
        max_new_tokens = min(max_new_tokens, num_tokens)  # no request has more new tokens than q has rows
    cfg = config or extend_config(head_dim, q.device, max_len, q.dtype)
    check_token_strides((("k_cache", k_cache), ("v_cache", v_cache)), cfg.block_n)
    heads, block_m = cfg.packed(group)
    for name, t in (("q", q), ("out", out)):  # a row adds position * token stride + head * head stride
        check_in_tile_offsets(f"{name} token + head", t.stride(0) + t.stride(1), block_m)
    if batch == 0 or num_tokens == 0 or num_q_heads == 0:
        return out
    if tiles is not None:
        check_tensor("tiles", tiles, shape=(None, 2), dims="num_tiles, 2", dtypes=(torch.int32,), device=q.device,
                     contiguous=True)  # fmt: skip
        if tiles.shape[0] == 0:
            return out
        if tiles.shape[0] > MAX_TILES:
            raise InvalidRequestError(f"tiles has {tiles.shape[0]} rows; a launch takes at most {MAX_TILES}")
        grid = (num_q_heads // heads, tiles.shape[0], 1)
    else:
        if max_new_tokens is None:
            max_new_tokens = _checked_max_new_tokens(
                cu_seqlens_q, seq_lens, slot_ids, num_tokens, num_slots, max_seq_len
            )
        if max_new_tokens == 0:
            return out
        grid = (triton.cdiv(max_new_tokens, block_m // heads), num_q_heads // heads, batch)

    scale = log2_softmax_scale(sm_scale, head_dim)
    descs = tma_views(k_cache, v_cache, cfg.block_n) if cfg.tma else None
    _extend_kernel[grid](
        q, k_cache, v_cache, *(descs or (k_cache, v_cache)), out, slot_ids, cu_seqlens_q, seq_lens,
        cu_seqlens_q if tiles is None else tiles,
        scale, num_tokens, num_slots, max_seq_len, batch,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, HEADS=heads,
        BLOCK_M=block_m, BLOCK_D=block_d_for(head_dim), BLOCK_N=cfg.block_n,
        INPUT_PRECISION=input_precision(q.dtype), USE_TMA=descs is not None, TILE_LIST=tiles is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def extend_tile_positions(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
    max_len: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    config: ExtendConfig | None = None,
) -> int:
    """Query positions one program of :func:`extend_attention` covers (a row block), for a call with these
    heads, ``max_len`` hint and ``config``: what :func:`extend_tiles` needs to list the row blocks."""
    cfg = config or extend_config(head_dim, device, max_len, dtype)
    heads, block_m = cfg.packed(num_q_heads // num_kv_heads)
    return block_m // heads


def extend_tiles(new_lens: list[int], seq_lens: list[int], positions: int, length: int | None = None) -> list[int]:
    """The row blocks of a step, flattened (request, row block) pairs for :func:`extend_attention`'s ``tiles``:
    request b has ceil(new_lens[b] / positions) blocks. The most work first (a block's causal span, its last
    position), as the kernel's own grid orders them. ``length``: pad the list to that many pairs with (-1, -1)
    (raises InvalidRequestError if the step has more blocks)."""
    positions = check_int("positions", positions, lo=1, hi=1 << 20)
    new_lens = check_ints("new_lens", new_lens, lo=0, hi=1 << 31)
    seq_lens = check_ints("seq_lens", seq_lens, lo=0, hi=1 << 31)
    if len(new_lens) != len(seq_lens) or any(n > s for n, s in zip(new_lens, seq_lens, strict=True)):
        raise InvalidRequestError(
            f"new_lens and seq_lens must be of one length with each new <= its seq_len, got {new_lens}, {seq_lens}"
        )
    return tile_list(new_lens, seq_lens, positions, None if length is None else check_int("length", length, lo=0))


def tile_list(new_lens: list[int], seq_lens: list[int], positions: int, length: int | None) -> list[int]:
    """:func:`extend_tiles` for arguments already checked (AttentionWrapper's graph plans, once a step)."""
    blocks = [
        (seq - new + min(new, (m + 1) * positions), b, m)
        for b, (new, seq) in enumerate(zip(new_lens, seq_lens, strict=True))
        for m in range(-(-new // positions))
    ]
    blocks.sort(key=lambda x: -x[0])
    if length is not None and len(blocks) > length:
        raise InvalidRequestError(f"the step has {len(blocks)} row blocks; the tile list holds {length}")
    flat = [v for _, b, m in blocks for v in (b, m)]
    return flat + [-1] * (2 * (length - len(blocks))) if length is not None else flat


def max_extend_tiles(num_tokens: int, batch: int, positions: int) -> int:
    """The most row blocks a step of ``num_tokens`` new tokens over at most ``batch`` requests can have: each
    request's blocks cover its tokens, and at most one of them is partial."""
    num_tokens, batch = check_int("num_tokens", num_tokens, lo=0), check_int("batch", batch, lo=0)
    positions = check_int("positions", positions, lo=1)
    return min(num_tokens, -(-num_tokens // positions) + min(batch, num_tokens))


def _checked_max_new_tokens(
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_ids: torch.Tensor,
    num_tokens: int,
    num_slots: int,
    max_seq_len: int,
) -> int:
    """Max new tokens per request, read in one synchronisation after validating the metadata."""
    new = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    slots = torch.where(seq_lens > 0, slot_ids, 0).long()
    stats = torch.stack([
        new.max(), new.min(), (seq_lens.long() - new).min(), seq_lens.max().long(),
        cu_seqlens_q[0].long(), cu_seqlens_q[-1].long(), slots.min(), slots.max(),
    ]).tolist()  # fmt: skip
    most, fewest, min_prefix, longest, first, last, low_slot, high_slot = (int(x) for x in stats)
    if fewest < 0 or first < 0 or last > num_tokens:
        raise InvalidRequestError(
            f"cu_seqlens_q must be non-decreasing within [0, T={num_tokens}]; got first {first}, last {last}, "
            f"smallest step {fewest}"
        )
    if min_prefix < 0:
        raise InvalidRequestError(
            f"seq_lens[b] must be >= the new tokens of request b (cached prefix + new); found a prefix of {min_prefix}"
        )
    check_lengths_and_slots(longest, low_slot, high_slot, num_slots=num_slots, max_seq_len=max_seq_len)
    return most


def extend_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor, cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor, sm_scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Float32 torch reference of :func:`extend_attention`: out [T, Hq, D] float32 (rows of no request: 0)."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = torch.zeros(num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    cu = cu_seqlens_q.tolist()
    for b, (slot, n) in enumerate(zip(slot_ids.tolist(), seq_lens.tolist(), strict=True)):
        start, end = cu[b], cu[b + 1]
        if end <= start or n <= 0:
            continue
        k = k_cache[slot, :n].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[slot, :n].float().repeat_interleave(group, dim=1)
        positions = torch.arange(n - (end - start), n, device=q.device)
        scores = torch.einsum("ihd,nhd->hin", q[start:end].float(), k) * scale
        causal = torch.arange(n, device=q.device)[None, :] <= positions[:, None]  # [new, n]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = torch.einsum("hin,nhd->ihd", torch.softmax(scores, dim=-1), v)
    return out
