# SPDX-License-Identifier: Apache-2.0
"""Store new tokens' K and V into (slot, position) of one layer's cache views.

Shapes and strides (elements):
    k_new, v_new      [T, Hkv, D]                      strides (stride_nt, stride_nh, 1)
    k_cache, v_cache  [num_slots, max_seq_len, Hkv, D] strides (stride_s, stride_t, stride_h, 1), any
                      (token-major default: (slot_bytes, token_bytes, D, 1) / elem_size, K and V of all
                      layers interleaved, so the views are not contiguous)
    slot_ids          int32 [T]  slot of each token; < 0 marks a padding token (skipped)
    positions         int32 [T]  position of each token inside its slot
One program per (token, block of heads) copies a [BLOCK_H, BLOCK_D] tile of K and one of V.

Invariant (vkv): the kernel writes only (slot_ids[t], positions[t]); the caller (the vkv cache) has mapped
those bytes. Tokens whose slot or position falls outside the view are skipped, so no address outside the
view is ever formed; ``validate=True`` raises on them instead (it synchronises).
"""

import torch
import triton
import triton.language as tl

from vkv.allocator.errors import InvalidRequestError

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_in_tile_offsets,
    check_runnable,
    check_same_dtype,
    check_tensor,
    next_power_of_2,
)


@triton.jit
def _store_kv_kernel(
    k_new_ptr,
    v_new_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ids_ptr,
    positions_ptr,
    num_slots,
    max_seq_len,
    num_kv_heads,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_kcs,
    stride_kct,
    stride_kch,
    stride_vcs,
    stride_vct,
    stride_vch,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    slot = tl.load(slot_ids_ptr + token)
    pos = tl.load(positions_ptr + token)
    # Padding tokens and indices outside the view: skip before any cache address is formed.
    if (slot < 0) | (slot >= num_slots) | (pos < 0) | (pos >= max_seq_len):
        return
    slot = slot.to(tl.int64)
    pos = pos.to(tl.int64)
    token = token.to(tl.int64)

    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = tl.load(k_new_ptr + token * stride_knt + offs_h[:, None] * stride_knh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + slot * stride_kcs + pos * stride_kct
    tl.store(k_dst + offs_h[:, None] * stride_kch + offs_d[None, :], k, mask=mask)

    v = tl.load(v_new_ptr + token * stride_vnt + offs_h[:, None] * stride_vnh + offs_d[None, :], mask=mask)
    v_dst = v_cache_ptr + slot * stride_vcs + pos * stride_vct
    tl.store(v_dst + offs_h[:, None] * stride_vch + offs_d[None, :], v, mask=mask)


# A program copies at most this many elements of K (and as many of V).
_MAX_TILE_ELEMENTS = 4096


def _store_config(num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps)."""
    block_d = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(num_kv_heads), max(1, _MAX_TILE_ELEMENTS // block_d))
    num_warps = 4 if block_h * block_d >= 2048 else 2
    return block_h, block_d, num_warps


def store_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    validate: bool = False,
) -> None:
    """Write ``k_new[t]`` / ``v_new[t]`` into ``k_cache`` / ``v_cache[slot_ids[t], positions[t]]``.

    Parameters
    ----------
    k_new, v_new : torch.Tensor
        [T, Hkv, D], float16 / bfloat16 / float32 (the cache's dtype), unit stride on D.
    k_cache, v_cache : torch.Tensor
        One layer's views [num_slots, max_seq_len, Hkv, D], any strides with unit stride on D.
        Written in place.
    slot_ids : torch.Tensor
        int32 [T], contiguous. A negative slot id marks a padding token, which is skipped (CUDA-graph
        padded batches).
    positions : torch.Tensor
        int32 [T], contiguous.
    validate : bool
        Check on the host that every non-padding (slot, position) lies inside the view and raise
        InvalidRequestError if not. Synchronises; leave False on the hot path (out-of-range tokens are then
        skipped silently). Duplicate (slot, position) pairs leave one of the values, unspecified which.

    Examples
    --------
    >>> k_cache = torch.zeros(4, 16, 2, 64)
    >>> v_cache = torch.zeros(4, 16, 2, 64)
    >>> k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    >>> slots = torch.tensor([0, 0, 2], dtype=torch.int32)
    >>> pos = torch.tensor([0, 1, 5], dtype=torch.int32)
    >>> store_kv(k, v, k_cache, v_cache, slots, pos)  # CPU tensors: Triton's interpreter (TRITON_INTERPRET=1)
    >>> bool((k_cache[2, 5] == k[2]).all()), bool(v_cache[0, 2:].any())  # token 2 at slot 2, position 5
    (True, False)
    """
    check_tensor("k_new", k_new, shape=(None, None, None), dims="T, Hkv, D", dtypes=FLOAT_DTYPES, unit_last_stride=True)
    num_tokens, num_kv_heads, head_dim = k_new.shape
    device = k_new.device
    check_tensor(
        "v_new", v_new, shape=k_new.shape, dims="T, Hkv, D", dtypes=FLOAT_DTYPES, device=device, unit_last_stride=True
    )
    cache_shape = (None, None, num_kv_heads, head_dim)
    dims = "num_slots, max_seq_len, Hkv, D"
    check_tensor(
        "k_cache", k_cache, shape=cache_shape, dims=dims, dtypes=FLOAT_DTYPES, device=device, unit_last_stride=True
    )
    check_tensor(
        "v_cache", v_cache, shape=k_cache.shape, dims=dims, dtypes=FLOAT_DTYPES, device=device, unit_last_stride=True
    )
    check_same_dtype("v_new", v_new, "k_new", k_new)
    check_same_dtype("k_cache", k_cache, "k_new", k_new)
    check_same_dtype("v_cache", v_cache, "k_new", k_new)
    check_tensor(
        "slot_ids", slot_ids, shape=(num_tokens,), dims="T", dtypes=INDEX_DTYPES, device=device, contiguous=True
    )
    check_tensor(
        "positions", positions, shape=(num_tokens,), dims="T", dtypes=INDEX_DTYPES, device=device, contiguous=True
    )
    check_runnable(_store_kv_kernel, device)
    num_slots, max_seq_len = k_cache.shape[0], k_cache.shape[1]
    block_h, block_d, num_warps = _store_config(num_kv_heads, head_dim)
    for name, t in (("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_in_tile_offsets(f"{name} head", t.stride(-2), block_h)

    if validate and num_tokens > 0:
        real = slot_ids >= 0
        bad = real & ((slot_ids >= num_slots) | (positions < 0) | (positions >= max_seq_len))
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise InvalidRequestError(
                f"token {t} targets slot {int(slot_ids[t])} position {int(positions[t])}; expected slot in "
                f"[0, {num_slots}) (or < 0 for padding) and position in [0, {max_seq_len})"
            )
    if num_tokens == 0 or num_kv_heads == 0:
        return

    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _store_kv_kernel[grid](
        k_new, v_new, k_cache, v_cache, slot_ids, positions,
        num_slots, max_seq_len, num_kv_heads,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip


def store_kv_reference(
    k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
    positions: torch.Tensor,
) -> None:  # fmt: skip
    """Torch reference of :func:`store_kv` (in place; padding tokens with slot id < 0 are skipped)."""
    keep = slot_ids >= 0
    slots, pos = slot_ids[keep].long(), positions[keep].long()
    k_cache[slots, pos] = k_new[keep].to(k_cache.dtype)
    v_cache[slots, pos] = v_new[keep].to(v_cache.dtype)
