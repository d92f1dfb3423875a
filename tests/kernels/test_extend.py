# SPDX-License-Identifier: Apache-2.0
"""extend_attention (prefill over a cached prefix) against its reference, decode and torch SDPA."""

import math

import pytest
import torch

from vkv.allocator import InvalidRequestError
from vkv.kernels import ExtendConfig, decode_attention, extend_attention, extend_attention_reference, store_kv
from vkv.kernels.extend import (
    GPU_EXTEND_CONFIGS,
    GPU_EXTEND_SHORT_KV_CONFIGS,
    MAX_TILES,
    SHORT_KV,
    extend_config,
    extend_tile_positions,
    extend_tiles,
    extend_variants,
    max_extend_tiles,
)

gpu = pytest.mark.gpu
NUM_KV_HEADS = 1  # the query heads of one KV head are what GQA changes; one keeps the interpreter fast

BATCHES = [1, 3, pytest.param(33, marks=gpu)]
NEW_TOKENS = [1, 17, 97, pytest.param(1000, marks=gpu)]
PREFIXES = [0, 33, pytest.param(4096, marks=gpu)]
GQA_RATIOS = [1, 4, 8]
HEAD_DIMS = [64, 128, pytest.param(96, marks=gpu), pytest.param(256, marks=gpu)]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=gpu), pytest.param(torch.float16, marks=gpu)]


def ragged_batch(batch, max_new, max_prefix, num_slots, device):
    """(slot_ids, cu_seqlens_q, seq_lens, max_new): the first request has max_new / max_prefix, the rest random."""
    new = [max_new] + torch.randint(1, max_new + 1, (batch - 1,)).tolist()
    prefix = [max_prefix] + torch.randint(0, max_prefix + 1, (batch - 1,)).tolist()
    cu = torch.tensor([0] + new).cumsum(0)
    lens = torch.tensor(new) + torch.tensor(prefix)
    slots = torch.randperm(num_slots)[:batch]
    return (slots.to(device, torch.int32), cu.to(device, torch.int32), lens.to(device, torch.int32))


def run_and_check(q, k, v, slots, cu, lens, assert_close, **kwargs):
    out = torch.full_like(q, float("nan"))
    assert extend_attention(q, k, v, slots, cu, lens, out=out, **kwargs) is out
    ref = extend_attention_reference(q, k, v, slots, cu, lens, sm_scale=kwargs.get("sm_scale"))
    assert_close(out, ref, q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("gqa", GQA_RATIOS)
@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("new_tokens", NEW_TOKENS)
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference(batch, new_tokens, prefix, gqa, head_dim, dtype, device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(batch + 1, new_tokens + prefix + 3, NUM_KV_HEADS, head_dim, dtype, device)
    slots, cu, lens = ragged_batch(batch, new_tokens, prefix, batch + 1, device)
    q = torch.randn(int(cu[-1]), NUM_KV_HEADS * gqa, head_dim, device=device).to(dtype)
    # the host hints a plan passes: on the GPU they pick the short- or long-KV tiles
    run_and_check(q, k, v, slots, cu, lens, assert_close, max_new_tokens=new_tokens, max_len=int(lens.max()))


D128_GPU_CONFIGS = {
    "long KV": GPU_EXTEND_CONFIGS[128],
    "short KV": GPU_EXTEND_SHORT_KV_CONFIGS[128],
    "unpacked": ExtendConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    "4 heads packed": ExtendConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, pack_heads=4),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU tile tables)")
@pytest.mark.parametrize("kv", list(D128_GPU_CONFIGS))
@pytest.mark.parametrize("prefix", [0, 1500, 5000])
def test_each_gpu_tile_table_matches_reference(kv, prefix, device, token_major_kv, assert_close):
    """Both head_dim-128 tile tables at every length (the hint only picks one; each must be right anywhere)."""
    k, v, _ = token_major_kv(4, prefix + 300, 2, 128, torch.bfloat16, device)
    slots, cu, lens = ragged_batch(3, 257, prefix, 4, device)
    q = torch.randn(int(cu[-1]), 8, 128, device=device).to(torch.bfloat16)
    run_and_check(q, k, v, slots, cu, lens, assert_close, config=D128_GPU_CONFIGS[kv])


def test_the_hint_picks_the_short_kv_tiles_only_where_measured():
    cuda = torch.device("cuda")
    assert extend_config(128, cuda, SHORT_KV) == GPU_EXTEND_SHORT_KV_CONFIGS[128]
    assert extend_config(128, cuda, SHORT_KV + 1) == GPU_EXTEND_CONFIGS[128]
    assert extend_config(128, cuda, None) == GPU_EXTEND_CONFIGS[128]  # unknown: long
    assert extend_config(64, cuda, 100) == GPU_EXTEND_CONFIGS[64]  # no short-KV entry for 64
    assert extend_config(128, torch.device("cpu"), 100) == extend_config(128, torch.device("cpu"))
    # float32 tiles are twice the bytes: the long-KV table's 128-token K/V tiles would not fit in shared memory
    assert extend_config(128, cuda, None, torch.float32).block_n == 64
    assert extend_config(128, cuda, None, torch.float16) == GPU_EXTEND_CONFIGS[128]


@pytest.mark.parametrize(
    "head_dim, max_seq_len, fewest, most, configs",
    [
        (128, 4096, 2, 8192, 2),  # short- and long-KV tiles
        (128, 2048, 2, 8192, 1),  # no sequence outgrows the short-KV tiles
        (64, 4096, 2, 8192, 1),  # one table for every length
        (128, 4096, 513, 4096, 2),  # steps above graph buckets of up to 512 tokens
        (128, 4096, 2040, 2047, 2),  # token counts just short of a multiple of 16
        (128, 4096, 2050, 2056, 2),  # over 2,048 new tokens: short-KV tiles take two requests
        (128, 1024, 4097, 8192, 1),  # steps of several requests, each at most max_seq_len
    ],
)
def test_the_warm_up_calls_launch_every_variant_a_step_can(head_dim, max_seq_len, fewest, most, configs):
    """Every (tile config, token count a multiple of 16 or not) pair that an eager step within the bounds can
    launch, launched by exactly one of the calls, each call within the bounds."""
    cuda = torch.device("cuda")
    calls = extend_variants(head_dim, cuda, max_seq_len, fewest, most)
    for step in calls:
        assert fewest <= sum(new for _, new in step) <= most
        assert all(cached >= 0 and new > 0 and cached + new <= max_seq_len for cached, new in step)
    launched = [(extend_config(head_dim, cuda, max(c + n for c, n in step)), sum(n for _, n in step) % 16 == 0)
                for step in calls]  # fmt: skip
    # what a step can launch: any token count in the bounds with its longest sequence any length from 1 (several
    # requests, any prefix) to max_seq_len
    tables = {extend_config(head_dim, cuda, length) for length in range(1, max_seq_len + 1)}
    steps = {(table, n % 16 == 0) for table in tables for n in range(fewest, most + 1)}
    assert len(launched) == len(set(launched)) and set(launched) == steps and len({c for c, _ in steps}) == configs
    assert extend_variants(head_dim, torch.device("cpu"), max_seq_len, fewest, most) == []  # nothing compiles
    bad = [((0,), "max_seq_len"), ((64, 0), "min_tokens"), ((64, 2, -1), "max_tokens"), ((64, 2.5), "min_tokens")]
    for args, name in bad:
        with pytest.raises(InvalidRequestError, match=name):
            extend_variants(head_dim, cuda, *args)


@pytest.mark.parametrize("tiles", [(16, 16), (16, 32), (32, 16), (128, 64)])
def test_any_tile_shape_gives_the_same_result(tiles, device, token_major_kv, assert_close):
    """Configs get retuned: every (BLOCK_M, BLOCK_N) must cover the diagonal and the skipped tiles right."""
    k, v, _ = token_major_kv(3, 80, 2, 64, torch.float32, device)
    slots = torch.tensor([1, 2], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 40, 47], dtype=torch.int32, device=device)
    lens = torch.tensor([61, 7], dtype=torch.int32, device=device)
    q = torch.randn(47, 4, 64, device=device)
    config = ExtendConfig(block_m=tiles[0], block_n=tiles[1], num_warps=4, num_stages=2)
    run_and_check(q, k, v, slots, cu, lens, assert_close, config=config)


@pytest.mark.parametrize("gqa", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("pack", [2, 4])
def test_packed_query_heads_give_the_same_result(pack, gqa, device, token_major_kv, assert_close):
    """pack_heads stacks query heads of one KV head in a program's rows; a group smaller than the pack (or
    not a multiple of it) packs what divides it, in the same rows. Ragged requests, a prefix, rows that end
    mid-block."""
    k, v, _ = token_major_kv(3, 80, 2, 64, torch.float32, device)
    slots = torch.tensor([1, 2, 0], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 40, 47, 50], dtype=torch.int32, device=device)
    lens = torch.tensor([61, 7, 80], dtype=torch.int32, device=device)
    q = torch.randn(50, 2 * gqa, 64, device=device)
    config = ExtendConfig(block_m=16 * pack, block_n=16, num_warps=4, num_stages=2, pack_heads=pack)
    assert config.packed(gqa) == (math.gcd(pack, gqa), 16 * pack)
    run_and_check(q, k, v, slots, cu, lens, assert_close, config=config)


def test_a_pack_that_leaves_too_few_positions_is_refused():
    with pytest.raises(ValueError, match="pack_heads"):
        ExtendConfig(block_m=32, block_n=16, num_warps=4, num_stages=2, pack_heads=4)
    with pytest.raises(ValueError, match="pack_heads"):
        ExtendConfig(block_m=64, block_n=16, num_warps=4, num_stages=2, pack_heads=3)


@pytest.mark.parametrize("max_new_tokens", [None, 97, 200])
def test_host_hint_gives_the_same_result(max_new_tokens, device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(4, 160, 2, 64, torch.float32, device)
    slots = torch.tensor([3, 0, 1], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 97, 98, 118], dtype=torch.int32, device=device)
    lens = torch.tensor([150, 1, 20], dtype=torch.int32, device=device)
    q = torch.randn(118, 4, 64, device=device)
    run_and_check(q, k, v, slots, cu, lens, assert_close, max_new_tokens=max_new_tokens, sm_scale=0.2)


@pytest.mark.parametrize("pack", [1, 2])
def test_a_tile_list_gives_the_same_result_and_pads_with_nothing(pack, device, token_major_kv, assert_close):
    """A mixed step (decode rows, a chunk over a prefix, a prompt) through a tile list padded far past its row
    blocks: the rows of requests equal the reference's; the rows of no request (padding tokens) are not written.
    Listed in any order, the result is the same; a list of bad pairs (other requests, negative blocks) runs
    nothing for them."""
    k, v, _ = token_major_kv(6, 200, 2, 64, torch.float32, device)
    new, seq = [1, 1, 70, 1, 23], [50, 9, 150, 120, 23]
    slots = torch.tensor([4, 0, 2, 5, 1], dtype=torch.int32, device=device)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device=device)
    lens = torch.tensor(seq, dtype=torch.int32, device=device)
    rows, padded = sum(new), sum(new) + 11  # 11 padding rows belong to no request
    q = torch.randn(padded, 4, 64, device=device)
    config = ExtendConfig(block_m=32 * pack, block_n=16, num_warps=4, num_stages=2, pack_heads=pack)
    positions = extend_tile_positions(4, 2, 64, device, config=config)
    assert positions == 32
    length = max_extend_tiles(padded, 8, positions)
    tiles = extend_tiles(new, seq, positions, length=length)
    assert len(tiles) == 2 * length and tiles[-2:] == [-1, -1] and sorted(tiles[: 2 * 7 : 2]) == [0, 1, 2, 2, 2, 3, 4]
    assert tiles[:2] == [2, 2]  # the most work first: the chunk's last block
    ref = extend_attention_reference(q, k, v, slots, cu, lens)
    for order in (tiles, tiles[14:] + tiles[:14]):  # the padding first: the same
        out = torch.full_like(q, float("nan"))
        t = torch.tensor(order, dtype=torch.int32, device=device).view(-1, 2)
        extend_attention(q, k, v, slots, cu, lens, out=out, config=config, tiles=t)
        assert_close(out[:rows], ref[:rows], q.dtype)
        assert bool(out[rows:].isnan().all())
    junk = torch.tensor([[5, 0], [7, 0], [0, -1], [-3, 0], [2, 9]], dtype=torch.int32, device=device)
    out = torch.full_like(q, float("nan"))
    extend_attention(q, k, v, slots, cu, lens, out=out, config=config, tiles=junk)
    assert bool(out.isnan().all())
    with pytest.raises(InvalidRequestError, match="8 row blocks; the tile list holds 7"):
        extend_tiles(new + [1], seq + [3], positions, length=7)
    for args, message in (
        ((new, seq, 0), r"positions must be an int in \[1, 1048576\], got 0"),
        ((new, seq[:-1], 32), "new_lens and seq_lens must be of one length with each new <= its seq_len"),
        (([5], [4], 32), "new_lens and seq_lens must be of one length with each new <= its seq_len"),
        (([1.5], [4], 32), r"new_lens\[0\] must be an int, got float 1.5"),
        ((new, seq, 32, -1), r"length must be an int in \[0, inf\], got -1"),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            extend_tiles(*args)
    with pytest.raises(InvalidRequestError, match=r"positions must be an int in \[1, inf\], got 0"):
        max_extend_tiles(64, 8, 0)
    too_many = torch.full((MAX_TILES + 1, 2), -1, dtype=torch.int32, device=device)
    with pytest.raises(InvalidRequestError, match=f"tiles has {MAX_TILES + 1} rows; a launch takes at most"):
        extend_attention(q, k, v, slots, cu, lens, tiles=too_many)
    with pytest.raises(InvalidRequestError, match=r"tiles must be 2-D \[num_tiles, 2\], got shape \(3,\)"):
        extend_attention(q, k, v, slots, cu, lens, tiles=torch.zeros(3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("tma", [True, False])
def test_never_reads_at_or_beyond_seq_len(tma, device, token_major_kv, assert_close):
    """NaN everywhere except tokens [0, seq_len) of the requests' slots. The first request's prefix spans
    several full tiles (TMA-loaded where allowed) on the GPU's tile sizes too."""
    k, v, buffer = token_major_kv(4, 320, 2, 64, torch.float32, device)
    slots = torch.tensor([2, 0, 3], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 40, 41, 70], dtype=torch.int32, device=device)
    lens = torch.tensor([301, 1, 29], dtype=torch.int32, device=device)
    clean_k, clean_v = k.clone(), v.clone()
    buffer.fill_(float("nan"))
    for slot, n in zip(slots.tolist(), lens.tolist(), strict=True):
        k[slot, :n], v[slot, :n] = clean_k[slot, :n], clean_v[slot, :n]
    q = torch.randn(70, 8, 64, device=device)
    cfg = extend_config(64, device)
    config = ExtendConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, tma=tma)
    run_and_check(q, k, v, slots, cu, lens, assert_close, config=config)


def test_one_new_token_equals_decode(device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(3, 90, 2, 64, torch.float32, device)
    slots = torch.tensor([1, 2, 0], dtype=torch.int32, device=device)
    lens = torch.tensor([90, 1, 45], dtype=torch.int32, device=device)
    cu = torch.arange(4, dtype=torch.int32, device=device)
    q = torch.randn(3, 8, 64, device=device)
    assert_close(extend_attention(q, k, v, slots, cu, lens), decode_attention(q, k, v, slots, lens), torch.float32)


@pytest.mark.parametrize("gqa", [1, 4])
def test_store_then_extend_matches_causal_sdpa(gqa, device, token_major_kv, assert_close):
    """Prefix and new tokens stored with store_kv, then extend == SDPA over the whole sequences."""
    num_kv_heads, head_dim, lengths, new = 2, 64, [60, 35], [25, 35]
    k_cache, v_cache, _ = token_major_kv(3, 64, num_kv_heads, head_dim, torch.float32, device)
    slots = torch.tensor([2, 0], dtype=torch.int32, device=device)
    qs, ks, vs = [], [], []
    for slot, n, m in zip(slots.tolist(), lengths, new, strict=True):
        q = torch.randn(n, num_kv_heads * gqa, head_dim, device=device)
        k = torch.randn(n, num_kv_heads, head_dim, device=device)
        v = torch.randn_like(k)
        idx = torch.arange(n - m, dtype=torch.int32, device=device)
        store_kv(k[: n - m], v[: n - m], k_cache, v_cache, torch.full_like(idx, slot), idx)  # the cached prefix
        qs.append(q), ks.append(k), vs.append(v)
    new_k = torch.cat([k[n - m :] for k, n, m in zip(ks, lengths, new, strict=True)])
    new_v = torch.cat([v[n - m :] for v, n, m in zip(vs, lengths, new, strict=True)])
    new_slots = torch.cat([torch.full((m,), s) for s, m in zip(slots.tolist(), new, strict=True)])
    new_pos = torch.cat([torch.arange(n - m, n) for n, m in zip(lengths, new, strict=True)])
    store_kv(new_k, new_v, k_cache, v_cache, new_slots.to(device, torch.int32), new_pos.to(device, torch.int32))

    q_new = torch.cat([q[n - m :] for q, n, m in zip(qs, lengths, new, strict=True)])
    cu = torch.tensor([0, new[0], sum(new)], dtype=torch.int32, device=device)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    out = extend_attention(q_new, k_cache, v_cache, slots, cu, lens)
    for b, (n, m) in enumerate(zip(lengths, new, strict=True)):
        q, k, v = (t.transpose(0, 1) for t in (qs[b], ks[b], vs[b]))  # [H, n, D]
        full = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(gqa, 0), v.repeat_interleave(gqa, 0), is_causal=True
        )
        assert_close(out[cu[b] : cu[b + 1]], full.transpose(0, 1)[n - m :], torch.float32)


def test_invalid_lengths_are_rejected_or_give_no_nan(device, token_major_kv):
    k, v, _ = token_major_kv(2, 32, 2, 64, torch.float32, device)
    slots = torch.tensor([0, 1], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 10, 12], dtype=torch.int32, device=device)
    lens = torch.tensor([4, 2], dtype=torch.int32, device=device)  # request 0: 10 new tokens but length 4
    q = torch.randn(12, 4, 64, device=device)
    with pytest.raises(ValueError, match=r"seq_lens\[b\] must be >= the new tokens .* prefix of -6"):
        extend_attention(q, k, v, slots, cu, lens)
    out = extend_attention(q, k, v, slots, cu, lens, max_new_tokens=10)  # unvalidated: finite, never NaN
    assert torch.isfinite(out).all()


BAD_INPUTS = {
    "cu_len": ({"cu_seqlens_q": torch.tensor([0, 5], dtype=torch.int32)}, r"cu_seqlens_q has shape \(2,\); expected"),
    "cu_order": ({"cu_seqlens_q": torch.tensor([0, 6, 5], dtype=torch.int32)}, r"must be non-decreasing"),
    "cu_past_end": ({"cu_seqlens_q": torch.tensor([0, 3, 9], dtype=torch.int32)}, r"within \[0, T=6\]"),
    "q_dtype": ({"q": torch.randn(6, 4, 64).half()}, r"k_cache has dtype torch.float32; expected the dtype of q"),
    "out_shape": ({"out": torch.empty(5, 4, 64)}, r"out has shape \(5, 4, 64\); expected \[T, Hq, D\]"),
    "sm_scale": ({"sm_scale": float("nan")}, r"sm_scale must be a positive finite number or None, got nan"),
    "hint": ({"max_new_tokens": -1}, r"max_new_tokens must be a non-negative int"),
    "kv_hint": ({"max_len": 2.5}, r"max_len must be a non-negative int or None, got 2.5"),
    "slot": ({"slot_ids": torch.tensor([0, 7], dtype=torch.int32)}, r"slot_ids has slot 7 .* \[0, 2\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs_with_clear_messages(case, device):
    k = torch.randn(2, 32, 2, 64)
    args = {
        "q": torch.randn(6, 4, 64),
        "k_cache": k,
        "v_cache": torch.randn_like(k),
        "slot_ids": torch.tensor([0, 1], dtype=torch.int32),
        "cu_seqlens_q": torch.tensor([0, 2, 6], dtype=torch.int32),
        "seq_lens": torch.tensor([9, 4], dtype=torch.int32),
    }
    changes, message = BAD_INPUTS[case]
    args.update(changes)
    with pytest.raises(ValueError, match=message):
        extend_attention(**{name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in args.items()})
