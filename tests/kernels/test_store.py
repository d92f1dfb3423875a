# SPDX-License-Identifier: Apache-2.0
"""store_kv against its reference: exactly the addressed (slot, position) rows change, nothing else."""

import pytest
import torch

from vkv.kernels import store_kv, store_kv_reference

gpu = pytest.mark.gpu
NUM_KV_HEADS = 2
NUM_SLOTS, MAX_SEQ_LEN = 4, 40

TOKENS = [1, 17, 97]
HEAD_DIMS = [64, 128, 80, pytest.param(96, marks=gpu), pytest.param(256, marks=gpu)]
DTYPES = [torch.float32, torch.bfloat16, pytest.param(torch.float16, marks=gpu)]  # a copy: exact in every dtype
CACHE_LAYOUTS = ["token_major", "contiguous"]
NEW_LAYOUTS = ["contiguous", "qkv_slices"]


def make_cache(layout, head_dim, dtype, device, token_major_kv):
    """(k_cache, v_cache, buffer): buffer holds every byte the views can reach."""
    if layout == "token_major":
        return token_major_kv(NUM_SLOTS, MAX_SEQ_LEN, NUM_KV_HEADS, head_dim, dtype, device)
    buffer = torch.randn(2, NUM_SLOTS, MAX_SEQ_LEN, NUM_KV_HEADS, head_dim, device=device).to(dtype)
    return buffer[0], buffer[1], buffer


def make_new(layout, num_tokens, head_dim, dtype, device):
    """New K/V, contiguous or as slices of a fused [T, (Hq + 2 Hkv) * D] qkv projection."""
    if layout == "contiguous":
        k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, device=device).to(dtype)
        return k, torch.randn_like(k)
    num_q_heads = 4 * NUM_KV_HEADS
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * NUM_KV_HEADS) * head_dim, device=device).to(dtype)
    _, k, v = qkv.split([num_q_heads * head_dim, NUM_KV_HEADS * head_dim, NUM_KV_HEADS * head_dim], dim=1)
    return k.view(num_tokens, NUM_KV_HEADS, head_dim), v.view(num_tokens, NUM_KV_HEADS, head_dim)


def distinct_targets(num_tokens, device):
    flat = torch.randperm(NUM_SLOTS * MAX_SEQ_LEN)[:num_tokens]
    slots, positions = flat // MAX_SEQ_LEN, flat % MAX_SEQ_LEN
    return slots.to(device, torch.int32), positions.to(device, torch.int32)


def views_of(buffer, k, v):
    """The same views as (k, v), over another buffer with the same geometry."""
    return tuple(buffer.as_strided(t.shape, t.stride(), t.storage_offset()) for t in (k, v))


@pytest.mark.parametrize("new_layout", NEW_LAYOUTS)
@pytest.mark.parametrize("cache_layout", CACHE_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("num_tokens", TOKENS)
def test_matches_reference(num_tokens, head_dim, dtype, cache_layout, new_layout, device, token_major_kv):
    k_cache, v_cache, buffer = make_cache(cache_layout, head_dim, dtype, device, token_major_kv)
    k_new, v_new = make_new(new_layout, num_tokens, head_dim, dtype, device)
    slots, positions = distinct_targets(num_tokens, device)
    expected = buffer.clone()
    store_kv_reference(k_new, v_new, *views_of(expected, k_cache, v_cache), slots, positions)
    store_kv(k_new, v_new, k_cache, v_cache, slots, positions)
    assert torch.equal(buffer, expected)


def test_padding_and_out_of_range_tokens_are_skipped(device, token_major_kv):
    k_cache, v_cache, buffer = token_major_kv(NUM_SLOTS, MAX_SEQ_LEN, NUM_KV_HEADS, 64, torch.float32, device)
    k_new, v_new = make_new("contiguous", 5, 64, torch.float32, device)
    slots = torch.tensor([0, -1, NUM_SLOTS, 2, 3], dtype=torch.int32, device=device)
    positions = torch.tensor([3, 0, 1, MAX_SEQ_LEN, 39], dtype=torch.int32, device=device)
    expected = buffer.clone()
    k_ref, v_ref = views_of(expected, k_cache, v_cache)
    k_ref[0, 3], v_ref[0, 3] = k_new[0], v_new[0]
    k_ref[3, 39], v_ref[3, 39] = k_new[4], v_new[4]
    store_kv(k_new, v_new, k_cache, v_cache, slots, positions)
    assert torch.equal(buffer, expected)
    with pytest.raises(ValueError, match=r"token 2 targets slot 4 position 1; expected slot in \[0, 4\)"):
        store_kv(k_new, v_new, k_cache, v_cache, slots, positions, validate=True)


BAD_INPUTS = {
    "new_dtype": ({"k_new": torch.randn(3, 2, 64).half()}, r"v_new has dtype torch.float32; expected the dtype of"),
    "cache_dtype": ({"v_cache": torch.randn(4, 40, 2, 64).half()}, r"v_cache has dtype torch.float16; expected"),
    "heads": ({"k_cache": torch.randn(4, 40, 3, 64)}, r"k_cache has shape \(4, 40, 3, 64\); expected"),
    "new_ndim": ({"k_new": torch.randn(3, 128)}, r"k_new must be 3-D \[T, Hkv, D\]"),
    "strided_d": ({"v_new": torch.randn(3, 2, 128)[..., ::2]}, r"v_new must have unit stride on its last axis"),
    "slot_dtype": ({"slot_ids": torch.tensor([0, 1, 2])}, r"slot_ids has dtype torch.int64; expected int32"),
    "positions_len": ({"positions": torch.tensor([0, 1], dtype=torch.int32)}, r"positions has shape \(2,\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs_with_clear_messages(case, device):
    k = torch.randn(4, 40, 2, 64)
    args = {
        "k_new": torch.randn(3, 2, 64),
        "v_new": torch.randn(3, 2, 64),
        "k_cache": k,
        "v_cache": torch.randn_like(k),
        "slot_ids": torch.tensor([0, 1, 2], dtype=torch.int32),
        "positions": torch.tensor([0, 1, 2], dtype=torch.int32),
    }
    changes, message = BAD_INPUTS[case]
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        store_kv(**{name: t.to(device) for name, t in args.items()})
