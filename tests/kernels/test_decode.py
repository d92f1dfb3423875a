# SPDX-License-Identifier: Apache-2.0
"""decode_attention against its float32 reference, over token-major strided KV views."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vkv.kernels._common as common
from vkv.kernels import DecodeConfig, choose_num_splits, decode_attention, decode_attention_reference

gpu = pytest.mark.gpu
NUM_KV_HEADS = 2

BATCHES = [1, 3, pytest.param(33, marks=gpu)]
LENGTHS = [1, 17, 97, pytest.param(4099, marks=gpu)]
GQA_RATIOS = [1, 4, 8]
HEAD_DIMS = [64, 128, pytest.param(80, marks=gpu), pytest.param(96, marks=gpu), pytest.param(256, marks=gpu)]
# bfloat16 only on the GPU: Triton's interpreter computes tl.dot on bfloat16 as raw 16-bit integers.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu)]


def random_batch(batch: int, max_len: int, num_slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_ids, seq_lens): distinct random slots; lengths max_len then random in [1, max_len]."""
    slots = torch.randperm(num_slots)[:batch]
    lens = torch.cat([torch.tensor([max_len]), torch.randint(1, max_len + 1, (batch - 1,))])
    return slots.to(device, torch.int32), lens.to(device, torch.int32)


def poisoned(*shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def run_and_check(q, k, v, slots, lens, assert_close, **kwargs):
    batch, num_q_heads, head_dim = q.shape
    out = poisoned(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = poisoned(batch, num_q_heads, dtype=torch.float32, device=q.device)
    result = decode_attention(q, k, v, slots, lens, out=out, lse=lse, **kwargs)
    assert result is out
    ref_out, ref_lse = decode_attention_reference(q, k, v, slots, lens, sm_scale=kwargs.get("sm_scale"))
    assert_close(out, ref_out, q.dtype)
    assert_close(lse, ref_lse, q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("gqa", GQA_RATIOS)
@pytest.mark.parametrize("max_len", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference(batch, max_len, gqa, head_dim, dtype, device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(batch + 2, max_len + 5, NUM_KV_HEADS, head_dim, dtype, device)
    q = torch.randn(batch, NUM_KV_HEADS * gqa, head_dim, device=device).to(dtype)
    slots, lens = random_batch(batch, max_len, batch + 2, device)
    run_and_check(q, k, v, slots, lens, assert_close)


@pytest.mark.parametrize("hint", [None, "exact", "too_low"])
@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_explicit_splits_never_change_the_result(num_splits, hint, device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(6, 128, NUM_KV_HEADS, 64, torch.float32, device)
    q = torch.randn(3, 4 * NUM_KV_HEADS, 64, device=device)
    slots = torch.tensor([5, 0, 3], dtype=torch.int32, device=device)
    lens = torch.tensor([97, 40, 1], dtype=torch.int32, device=device)
    max_len = {None: None, "exact": 97, "too_low": 10}[hint]
    run_and_check(q, k, v, slots, lens, assert_close, num_splits=num_splits, max_len=max_len, sm_scale=0.3)


@pytest.mark.parametrize("block_n", [16, 64, 128])
def test_any_tile_size_gives_the_same_result(block_n, device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(4, 200, NUM_KV_HEADS, 64, torch.float32, device)
    q = torch.randn(3, 4 * NUM_KV_HEADS, 64, device=device)
    slots = torch.tensor([3, 1, 0], dtype=torch.int32, device=device)
    lens = torch.tensor([200, 129, 17], dtype=torch.int32, device=device)
    config = DecodeConfig(block_n=block_n, num_warps=4, num_stages=2)
    run_and_check(q, k, v, slots, lens, assert_close, num_splits=3, config=config)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_strided_q_and_out(num_splits, device, token_major_kv, assert_close):
    """q sliced out of a fused qkv projection, out a slice of a wider buffer: only head_dim must be unit-stride."""
    k, v, _ = token_major_kv(3, 64, NUM_KV_HEADS, 64, torch.float32, device)
    num_q_heads = 4 * NUM_KV_HEADS
    qkv = torch.randn(2, (num_q_heads + 2 * NUM_KV_HEADS) * 64, device=device)
    q = qkv[:, : num_q_heads * 64].view(2, num_q_heads, 64)
    wide = torch.full((2, num_q_heads, 2 * 64), float("nan"), device=device)
    out = wide[:, :, 64:]
    slots = torch.tensor([2, 0], dtype=torch.int32, device=device)
    lens = torch.tensor([64, 30], dtype=torch.int32, device=device)
    decode_attention(q, k, v, slots, lens, out=out, num_splits=num_splits)
    assert_close(out, decode_attention_reference(q, k, v, slots, lens)[0], torch.float32)
    assert torch.isnan(wide[:, :, :64]).all()  # nothing written outside out


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_zero_length_gives_zeros_and_minus_inf_lse(num_splits, device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(4, 64, NUM_KV_HEADS, 64, torch.float32, device)
    q = torch.randn(3, 2 * NUM_KV_HEADS, 64, device=device)
    slots = torch.tensor([1, 2, 3], dtype=torch.int32, device=device)
    lens = torch.tensor([0, 17, 0], dtype=torch.int32, device=device)
    lse = poisoned(3, 2 * NUM_KV_HEADS, dtype=torch.float32, device=device)
    out = decode_attention(q, k, v, slots, lens, lse=lse, num_splits=num_splits)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    assert torch.isneginf(lse[[0, 2]]).all()
    ref_out, ref_lse = decode_attention_reference(q, k, v, slots, lens)
    assert_close(out[1], ref_out[1], torch.float32)
    assert_close(lse[1], ref_lse[1], torch.float32)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_never_reads_at_or_beyond_seq_len(num_splits, tma, device, token_major_kv, assert_close):
    """NaN everywhere except tokens [0, len) of the requests' slots: one stray read would poison the output.
    Lengths end inside a tile and exactly on one, after several full tiles (on the GPU too)."""
    k, v, buffer = token_major_kv(5, 300, NUM_KV_HEADS, 64, torch.float32, device)
    slots = torch.tensor([4, 0, 2, 1], dtype=torch.int32, device=device)
    lens = torch.tensor([77, 1, 261, 256], dtype=torch.int32, device=device)
    clean_k, clean_v = k.clone(), v.clone()
    buffer.fill_(float("nan"))
    for slot, n in zip(slots.tolist(), lens.tolist(), strict=True):
        k[slot, :n], v[slot, :n] = clean_k[slot, :n], clean_v[slot, :n]
    q = torch.randn(4, 4 * NUM_KV_HEADS, 64, device=device)
    config = common.decode_config(64, device)
    config = DecodeConfig(config.block_n, config.num_warps, config.num_stages, tma=tma)
    run_and_check(q, k, v, slots, lens, assert_close, num_splits=num_splits, config=config)


def test_full_tiles_go_through_tma_where_the_views_allow(device, token_major_kv):
    """The token-major views of a cache (slots padded to pages) get descriptors; a head_dim that is not a
    power of 2, or heads that are not adjacent, fall back to pointer loads."""
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or newer")
    k, v, _ = token_major_kv(3, 40, NUM_KV_HEADS, 64, torch.float32, device)
    assert common.tma_views(k, v, 32) is not None
    k80, v80, _ = token_major_kv(3, 40, NUM_KV_HEADS, 80, torch.float32, device)
    assert common.tma_views(k80, v80, 32) is None
    wide, _, _ = token_major_kv(3, 40, 2 * NUM_KV_HEADS, 64, torch.float32, device)
    every_other_head = wide[:, :, ::2]
    assert common.tma_views(every_other_head, every_other_head, 32) is None


def test_out_of_range_slots_read_nothing_when_not_validated(device, token_major_kv):
    k, v, buffer = token_major_kv(3, 32, NUM_KV_HEADS, 64, torch.float32, device)
    buffer.fill_(float("nan"))
    q = torch.randn(2, NUM_KV_HEADS, 64, device=device)
    slots = torch.tensor([-1, 3], dtype=torch.int32, device=device)
    lens = torch.tensor([5, 7], dtype=torch.int32, device=device)
    lse = poisoned(2, NUM_KV_HEADS, dtype=torch.float32, device=device)
    out = decode_attention(q, k, v, slots, lens, lse=lse, num_splits=2)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    with pytest.raises(ValueError, match=r"slot_ids has slot -1 .* expected slots in \[0, 3\)"):
        decode_attention(q, k, v, slots, lens)


def test_lengths_beyond_max_seq_len_are_clamped_when_not_validated(device, token_major_kv, assert_close):
    k, v, _ = token_major_kv(2, 40, NUM_KV_HEADS, 64, torch.float32, device)
    q = torch.randn(1, NUM_KV_HEADS, 64, device=device)
    slots = torch.tensor([1], dtype=torch.int32, device=device)
    out = decode_attention(q, k, v, slots, torch.tensor([1000], dtype=torch.int32, device=device), num_splits=3)
    ref, _ = decode_attention_reference(q, k, v, slots, torch.tensor([40], dtype=torch.int32, device=device))
    assert_close(out, ref, torch.float32)


def _inputs(device):
    k = torch.randn(4, 32, 2, 64, device=device)
    return {
        "q": torch.randn(2, 8, 64, device=device),
        "k_cache": k,
        "v_cache": torch.randn_like(k),
        "slot_ids": torch.tensor([0, 1], dtype=torch.int32, device=device),
        "seq_lens": torch.tensor([3, 9], dtype=torch.int32, device=device),
    }


BAD_INPUTS = {
    "q_ndim": ({"q": torch.randn(2, 8 * 64)}, r"q must be 3-D \[B, Hq, D\]"),
    "q_dtype": ({"q": torch.randn(2, 8, 64).double()}, r"q has dtype torch.float64; expected float16 or bfloat16"),
    "kv_dtype": ({"k_cache": torch.randn(4, 32, 2, 64).half()}, r"k_cache has dtype torch.float16; expected the dtype"),
    "head_dim": ({"v_cache": torch.randn(4, 32, 2, 32)}, r"v_cache has shape \(4, 32, 2, 32\); expected"),
    "gqa": ({"q": torch.randn(2, 7, 64)}, r"Hq=7 query heads must be a multiple of Hkv=2"),
    "strided_d": ({"k_cache": torch.randn(4, 32, 2, 64, 2)[..., 0]}, r"k_cache must have unit stride on its last"),
    "slot_dtype": ({"slot_ids": torch.tensor([0, 1])}, r"slot_ids has dtype torch.int64; expected int32"),
    "lens_shape": ({"seq_lens": torch.tensor([3], dtype=torch.int32)}, r"seq_lens has shape \(1,\); expected \[B\]"),
    "out_dtype": ({"out": torch.empty(2, 8, 64).half()}, r"out has dtype torch.float16; expected float32"),
    "lse_shape": ({"lse": torch.empty(2, 4)}, r"lse has shape \(2, 4\); expected \[B, Hq\]"),
    "num_splits": ({"num_splits": 0}, r"num_splits must be a positive int"),
    "sm_scale": ({"sm_scale": -0.125}, r"sm_scale must be a positive finite number or None, got -0.125"),
    "max_len": ({"max_len": -5}, r"max_len must be a non-negative int"),
    "negative_len": ({"seq_lens": torch.tensor([3, -1], dtype=torch.int32)}, r"negative length -1"),
    "too_long": ({"seq_lens": torch.tensor([3, 33], dtype=torch.int32)}, r"length 33; expected at most .* 32"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs_with_clear_messages(case, device):
    changes, message = BAD_INPUTS[case]
    args = _inputs(device)
    args.update({name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in changes.items()})
    with pytest.raises(ValueError, match=message):
        decode_attention(**args)


def test_split_heuristic_fills_the_gpu_and_balances_by_tokens(monkeypatch):
    monkeypatch.setattr(common, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")

    def programs(batch, max_len, total=None, kv_heads=8):
        splits = choose_num_splits(batch, kv_heads, max_len, head_dim=128, device=cuda, total_tokens=total)
        tps = common.tokens_per_split_for(max_len, splits, 64)
        used = total if total is not None else batch * max_len
        return splits, kv_heads * -(-used // tps)

    splits, busy = programs(1, 65536)
    assert busy >= 132  # batch 1: split deep enough to give every SM a program...
    assert 65536 / splits >= common.MIN_TOKENS_PER_SPLIT  # ...but no split too short to pay off
    assert programs(1, 65536)[0] == 32  # 2048 tokens a split: the work of 264 programs, no more splits
    assert programs(1, 8192) == (32, 256)  # a shorter context is split finer, down to MIN_TOKENS_PER_SPLIT
    assert programs(1, 1024)[0] == 1024 // common.MIN_TOKENS_PER_SPLIT
    assert programs(256, 1024)[0] == 1  # batch 256 fills the GPU without splitting
    assert programs(32, 4096)[0] == 1  # so does batch 32 x 8 KV heads: two equal programs per SM
    # The longest request of a varied batch is cut in MIN_SPLITS_OF_LONGEST pieces at least, so short
    # requests do not leave SMs idle while the long ones finish.
    assert programs(64, 4096, total=64 * 1024)[0] >= common.MIN_SPLITS_OF_LONGEST
    # The true total (a varied batch) never gives fewer splits than the batch * max_len estimate.
    assert programs(64, 4096, total=64 * 1024)[0] >= programs(64, 4096)[0]
    assert choose_num_splits(4, 8, 0, head_dim=128, device=cuda) == 1
    assert choose_num_splits(1, 1, 10**7, head_dim=128, device=cuda) <= common.MAX_SPLITS


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    num_splits=st.one_of(st.none(), st.integers(1, 6)),
    gqa=st.sampled_from([1, 2, 4]),
)
def test_random_batches(lengths, num_splits, gqa, device, token_major_kv, assert_close):
    batch = len(lengths)
    k, v, _ = token_major_kv(batch + 1, 72, NUM_KV_HEADS, 64, torch.float32, device)
    q = torch.randn(batch, NUM_KV_HEADS * gqa, 64, device=device)
    slots = torch.randperm(batch + 1)[:batch].to(device, torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    run_and_check(q, k, v, slots, lens, assert_close, num_splits=num_splits)


@gpu
def test_cuda_graph_capture_and_replay(token_major_kv, assert_close):
    device = torch.device("cuda")
    k, v, _ = token_major_kv(8, 4096, 8, 128, torch.bfloat16, device)
    q = torch.randn(4, 32, 128, device=device, dtype=torch.bfloat16)
    slots = torch.tensor([7, 0, 3, 5], dtype=torch.int32, device=device)
    lens = torch.tensor([4000, 1, 100, 2048], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    decode_attention(q, k, v, slots, lens, out=out, num_splits=16, max_len=4096)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, slots, lens, out=out, num_splits=16, max_len=4096)
    lens.copy_(torch.tensor([17, 4096, 1, 999], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    ref, _ = decode_attention_reference(q, k, v, slots, lens)
    assert_close(out, ref, torch.bfloat16)
