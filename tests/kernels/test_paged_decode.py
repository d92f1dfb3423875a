# SPDX-License-Identifier: Apache-2.0
"""paged_decode_attention against its reference and against decode_attention on the same KV."""

import pytest
import torch

from vkv import InvalidRequestError
from vkv.kernels import decode_attention, paged_decode_attention, paged_decode_attention_reference

gpu = pytest.mark.gpu
NUM_KV_HEADS = 2

BATCHES = [1, 3, pytest.param(33, marks=gpu)]
LENGTHS = [1, 17, 97, pytest.param(4099, marks=gpu)]
GQA_RATIOS = [1, 4]  # 8 is covered by test_decode: the two kernels share the GQA code
BLOCK_SIZES = [16, 64, pytest.param(256, marks=gpu)]
HEAD_DIMS = [64, pytest.param(128, marks=gpu)]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=gpu)]


def paged_batch(lengths, block_size, num_kv_heads, head_dim, dtype, device, spare_blocks=3):
    """Random pages in shuffled order, a block table with one spare column; unused entries hold -7."""
    blocks_per_seq = max(-(-n // block_size) for n in lengths) + 1
    num_blocks = len(lengths) * blocks_per_seq + spare_blocks
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    order = torch.randperm(num_blocks)
    table = torch.full((len(lengths), blocks_per_seq), -7, dtype=torch.int32)
    taken = 0
    for b, n in enumerate(lengths):
        used = -(-n // block_size)
        table[b, :used] = order[taken : taken + used].to(torch.int32)
        taken += used
    lens = torch.tensor(lengths, dtype=torch.int32)
    return k, v, table.to(device), lens.to(device)


def run_and_check(q, k, v, table, lens, assert_close, **kwargs):
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    assert paged_decode_attention(q, k, v, table, lens, out=out, lse=lse, **kwargs) is out
    ref_out, ref_lse = paged_decode_attention_reference(q, k, v, table, lens)
    assert_close(out, ref_out, q.dtype)
    assert_close(lse, ref_lse, q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("gqa", GQA_RATIOS)
@pytest.mark.parametrize("max_len", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference(batch, max_len, gqa, block_size, head_dim, dtype, device, assert_close):
    lengths = [max_len] + torch.randint(1, max_len + 1, (batch - 1,)).tolist()
    k, v, table, lens = paged_batch(lengths, block_size, NUM_KV_HEADS, head_dim, dtype, device)
    q = torch.randn(batch, NUM_KV_HEADS * gqa, head_dim, device=device).to(dtype)
    run_and_check(q, k, v, table, lens, assert_close)


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_never_reads_past_seq_len_or_unused_table_entries(num_splits, device, assert_close):
    """Unused table entries are -7 (reading one faults or fails); every unused KV byte is NaN."""
    lengths = [50, 1, 0, 33]
    k, v, table, lens = paged_batch(lengths, 16, NUM_KV_HEADS, 64, torch.float32, device)
    clean_k, clean_v = k.clone(), v.clone()
    k.fill_(float("nan"))
    v.fill_(float("nan"))
    for b, n in enumerate(lengths):
        for i in range(n):
            block = int(table[b, i // 16])
            k[block, i % 16], v[block, i % 16] = clean_k[block, i % 16], clean_v[block, i % 16]
    q = torch.randn(len(lengths), 4 * NUM_KV_HEADS, 64, device=device)
    run_and_check(q, k, v, table, lens, assert_close, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_agrees_with_decode_on_the_same_kv(num_splits, device, token_major_kv, assert_close):
    """The baseline and vkv's kernel read the same tokens from differently addressed memory."""
    lengths = [97, 17, 1]
    k_cache, v_cache, _ = token_major_kv(3, 112, NUM_KV_HEADS, 64, torch.float32, device)
    k_pages = k_cache.reshape(3 * 7, 16, NUM_KV_HEADS, 64)  # each slot = 7 pages of 16 tokens, in order
    v_pages = v_cache.reshape(3 * 7, 16, NUM_KV_HEADS, 64)
    table = torch.arange(21, dtype=torch.int32, device=device).view(3, 7)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    slots = torch.arange(3, dtype=torch.int32, device=device)
    q = torch.randn(3, 4 * NUM_KV_HEADS, 64, device=device)
    paged = paged_decode_attention(q, k_pages, v_pages, table, lens, num_splits=num_splits)
    dense = decode_attention(q, k_cache, v_cache, slots, lens, num_splits=num_splits)
    assert_close(paged, dense, torch.float32)


BAD_INPUTS = {
    "block_size": ({"k_pages": torch.randn(8, 24, 2, 64)}, r"block_size \(k_pages.shape\[1\]\) is 24; expected a"),
    "table_dtype": ({"block_table": torch.zeros(2, 4, dtype=torch.int64)}, r"block_table has dtype torch.int64"),
    "table_rows": ({"block_table": torch.zeros(3, 4, dtype=torch.int32)}, r"block_table has shape \(3, 4\)"),
    "table_entry": ({"block_table": torch.full((2, 4), 99, dtype=torch.int32)}, r"block_table has block 99 in use"),
    "too_long": ({"seq_lens": torch.tensor([3, 65], dtype=torch.int32)}, r"at most max_blocks_per_seq \* block_size"),
    "sm_scale": ({"sm_scale": 0.0}, r"sm_scale must be a positive finite number or None, got 0.0"),
    "sm_scale_text": ({"sm_scale": "0.125"}, r"sm_scale must be a positive finite number or None, got '0.125'"),
    "num_splits_bool": ({"num_splits": True}, r"num_splits must be a positive int \(at most 4096\) or None, got True"),
    "num_splits_huge": ({"num_splits": 2**63}, r"num_splits must be a positive int \(at most 4096\) or None, got 9"),
    "max_len_float": ({"max_len": 64.0}, r"max_len must be a non-negative int or None, got 64.0"),
    "no_blocks": ({"k_pages": torch.randn(0, 16, 2, 64)}, r"k_pages has no blocks"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs_with_clear_messages(case, device):
    k = torch.randn(8, 16, 2, 64)
    args = {
        "q": torch.randn(2, 8, 64),
        "k_pages": k,
        "v_pages": torch.randn_like(k),
        "block_table": torch.arange(8, dtype=torch.int32).view(2, 4),
        "seq_lens": torch.tensor([3, 9], dtype=torch.int32),
    }
    changes, message = BAD_INPUTS[case]
    args.update(changes)
    if "k_pages" in changes:
        args["v_pages"] = torch.randn_like(changes["k_pages"])
    with pytest.raises(InvalidRequestError, match=message):
        paged_decode_attention(**{name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in args.items()})


@pytest.mark.parametrize("hint", [{"num_splits": 1}, {"num_splits": 3}, {"max_len": 50}])
@pytest.mark.parametrize("bad_id", ["past_end", -1, -(2**31), 2**31 - 1])
@pytest.mark.parametrize("block_size", [16, 64, 256])  # a tile (CPU 32, GPU 128 tokens) spans pages / lies in one
def test_out_of_range_block_ids_read_nothing_and_give_nan_rows(block_size, bad_id, hint, device, assert_close):
    """Issue 12 #6: with a length hint the launcher does not synchronise, so the kernel checks the ids: the
    request naming a block outside [0, num_blocks) gets NaN out and lse; the others are exact. The pages are
    a view inside a larger buffer whose blocks on either side hold finite values, so a read outside the
    view would give a finite row instead of NaN (or crash, for the huge ids)."""
    lengths = [33, 50, 17]
    k, v, table, lens = paged_batch(lengths, block_size, NUM_KV_HEADS, 64, torch.float32, device)
    num_blocks = k.shape[0]
    k_buf, v_buf = (torch.randn(num_blocks + 2, *k.shape[1:], device=device) for _ in range(2))
    k_buf[1 : num_blocks + 1], v_buf[1 : num_blocks + 1] = k, v
    k_pages, v_pages = k_buf[1 : num_blocks + 1], v_buf[1 : num_blocks + 1]
    bad_table = table.clone()
    bad_table[1, 0] = num_blocks if bad_id == "past_end" else bad_id  # request 1's first block (split 0 only)
    q = torch.randn(len(lengths), 4 * NUM_KV_HEADS, 64, device=device)
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2], device=device)
    paged_decode_attention(q, k_pages, v_pages, bad_table, lens, out=out, lse=lse, **hint)
    assert out[1].isnan().all() and lse[1].isnan().all()
    ref_out, ref_lse = paged_decode_attention_reference(q, k_pages, v_pages, table, lens)
    for b in (0, 2):
        assert_close(out[b], ref_out[b], torch.float32)
        assert_close(lse[b], ref_lse[b], torch.float32)
    with pytest.raises(InvalidRequestError, match=r"block_table has block .* in use; expected blocks in \[0, "):
        paged_decode_attention(q, k_pages, v_pages, bad_table, lens)  # no hint: validated on the host
