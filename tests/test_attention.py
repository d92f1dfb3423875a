# SPDX-License-Identifier: Apache-2.0
"""plan/run over a real mapped cache: prefill, extend over a prefix, decode; against a float64 reference."""

import contextlib

import numpy as np
import pytest
import torch

from vkv import CacheConfig, InvalidRequestError, KVCache
from vkv.attention import AttentionWrapper

from .conftest import skip_unless_kernels_run_on

HQ, HKV, D, LAYERS = 4, 2, 64, 2


def _reference(q, keys, values, cached, new, scale):
    """float64 causal attention, bottom-right aligned, per request. keys/values: per request [n, Hkv, D]."""
    outs, row = [], 0
    for kk, vv, c, n in zip(keys, values, cached, new, strict=True):
        qq = q[row : row + n].double().transpose(0, 1)  # [Hq, n, D]
        kk = kk.double().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)  # [Hq, c + n, D]
        vv = vv.double().repeat_interleave(HQ // HKV, dim=1).transpose(0, 1)
        s = qq @ kk.transpose(-1, -2) * scale
        allowed = torch.arange(c + n)[None, :] <= (c + torch.arange(n))[:, None]
        s = s.masked_fill(~allowed.to(s.device), float("-inf"))
        outs.append((torch.softmax(s, -1) @ vv).transpose(0, 1))
        row += n
    return torch.cat(outs)


@pytest.mark.parametrize("layout", ["token", "layer", "grouped"])
def test_prefill_extend_decode_match_the_reference(pool, layout):
    skip_unless_kernels_run_on(pool.driver.name)
    dtype = torch.float32 if pool.driver.name == "host" else torch.bfloat16
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    # grouped: 4 layers in 2 planes, so layers 1 and 3 sit inside their planes' rows, not at their start
    layers = 4 if layout == "grouped" else LAYERS
    cfg = CacheConfig(
        num_layers=layers,
        num_kv_heads=HKV,
        head_dim=D,
        dtype=dtype,
        max_slots=4,
        max_seq_len=256,
        layout=layout,
        group_layers=2 if layout == "grouped" else None,
    )
    dev = pool.driver.device
    with KVCache(cfg, pool) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        slots = [cache.allocate() for _ in range(3)]
        history = {s: [torch.empty(0, HKV, D, dtype=dtype, device=dev)] * 2 * layers for s in slots}
        steps = [
            ([0, 0, 0], [7, 1, 17]),
            ([7, 1, 17], [5, 30, 1]),
            ([12, 31, 18], [1, 1, 4]),  # decode rows before a chunk, as the engine's scheduler orders a mixed step
            ([13, 32, 22], [1, 1, 1]),
            ([14, 33, 23], [1, 1, 1]),
        ]
        for cached, new in steps:
            for s, c, n in zip(slots, cached, new, strict=True):
                cache.grow(s, c + n)
            plan = wrapper.plan(slots, cached, new)
            assert plan.is_decode == (new == [1, 1, 1])
            T = sum(new)
            for layer in range(layers):
                q = torch.randn(T, HQ, D, dtype=dtype, device=dev)
                k = torch.randn(T, HKV, D, dtype=dtype, device=dev)
                v = torch.randn(T, HKV, D, dtype=dtype, device=dev)
                out = torch.full_like(q, float("nan"))
                got = wrapper.run(layer, q, k, v, out=out)
                assert got.data_ptr() == out.data_ptr()
                row = 0
                for s, n in zip(slots, new, strict=True):
                    for j, new_kv in ((2 * layer, k), (2 * layer + 1, v)):
                        history[s][j] = torch.cat([history[s][j], new_kv[row : row + n]])
                    row += n
                keys = [history[s][2 * layer] for s in slots]
                values = [history[s][2 * layer + 1] for s in slots]
                ref = _reference(q, keys, values, cached, new, D**-0.5)
                torch.testing.assert_close(got.double(), ref, **tol)
                for s in slots:  # the store landed in the cache itself
                    n = len(keys[slots.index(s)])
                    assert torch.equal(cache.key_view(layer)[s, :n], keys[slots.index(s)])


def _graph_steps(cache, wrapper, slots, pad, steps, tokens, layers, dtype, dev):
    """Each (cached, new) step planned eagerly and for a graph of ``tokens`` tokens: the requests' rows agree,
    the graph plan's buffers never move. Returns the graph plans."""
    plans = []
    for cached, new in steps:
        for s, c, n in zip(slots, cached, new, strict=True):
            cache.grow(s, c + n)
        T = sum(new)
        q, k, v = (torch.randn(T, h, D, dtype=dtype, device=dev) for h in (HQ, HKV, HKV))
        wrapper.plan(slots, cached, new)
        eager = [wrapper.run(layer, q, k, v) for layer in range(layers)]
        plan = wrapper.plan(slots, cached, new, graph_tokens=tokens, pad_slot=pad)
        assert (plan.num_tokens, plan.is_decode, plan.batch_size) == (tokens, False, len(slots))
        padded = [torch.cat([x, torch.randn(tokens - T, *x.shape[1:], dtype=dtype, device=dev)]) for x in (q, k, v)]
        for layer in range(layers):
            got = wrapper.run(layer, *padded)
            assert got.shape == (tokens, HQ, D) and not got[T:].any()  # the padding rows' outputs: zeros
            torch.testing.assert_close(got[:T], eager[layer], rtol=1e-3, atol=1e-3)
        plans.append(plan)
    return plans


def test_graph_plans_pad_any_step_and_keep_their_buffers(pool):
    """plan(graph_tokens=32): a prompt, chunks beside decode rows, decode rows alone, padded to 32 tokens with rows
    of no request; the requests' rows equal the eager plan's, the padding writes only the pad slot's first token,
    and every buffer the kernels read (metadata, tile list) sits at the same address in every such plan."""
    skip_unless_kernels_run_on(pool.driver.name)
    dtype = torch.float32 if pool.driver.name == "host" else torch.bfloat16
    cfg = CacheConfig(num_layers=2, num_kv_heads=HKV, head_dim=D, dtype=dtype, max_slots=5, max_seq_len=256)
    dev = pool.driver.device
    with KVCache(cfg, pool) as cache:
        wrapper = AttentionWrapper(cache, HQ, max_graph_tokens=32)
        pad = cache.allocate()
        cache.grow(pad, 1)
        slots = [cache.allocate() for _ in range(3)]
        steps = [([0, 0, 0], [7, 1, 17]), ([7, 1, 17], [1, 1, 20]), ([8, 2, 37], [1, 1, 1]), ([9, 3, 38], [1, 30, 1])]
        plans = _graph_steps(cache, wrapper, slots, pad, steps, 32, 2, dtype, dev)
        fields = ("slot_ids", "seq_lens", "cu_seqlens_q", "token_slots", "token_positions", "tiles")
        assert len({tuple(getattr(p, f).data_ptr() for f in fields) for p in plans}) == 1
        assert all(tuple(getattr(p, f).shape[0] for f in fields[:5]) == (5, 5, 6, 32, 32) for p in plans)
        untouched = cache.key_view(0)[pad, 1:16].clone()
        _graph_steps(cache, wrapper, slots, pad, [([10, 33, 39], [2, 2, 2])], 32, 1, dtype, dev)
        assert torch.equal(cache.key_view(0)[pad, 1:16], untouched)  # the padding writes token 0 only
        last = wrapper._plan
        for kwargs, message in (
            ({"graph_tokens": 5}, r"graph_tokens must be an int in \[6, 32\], got 5"),
            ({"graph_tokens": 33, "pad_slot": pad}, r"graph_tokens must be an int in \[6, 32\], got 33"),
            ({"graph_tokens": 8}, r"2 padding tokens need a pad_slot that is not one of \[1, 2, 3\], got None"),
            ({"graph_tokens": 8, "pad_slot": slots[0]}, "padding tokens need a pad_slot that is not one of"),
            ({"graph_tokens": 8, "pad_slot": pad, "pad_rows": 1}, "not with pad_rows or graph_max_len"),
        ):
            with pytest.raises(InvalidRequestError, match=message):
                wrapper.plan(slots, [12, 35, 41], [2, 2, 2], **kwargs)
            assert wrapper._plan is last
        with pytest.raises(InvalidRequestError, match="the step has 34 new tokens; a graph plan holds at most max_g"):
            wrapper.plan(slots, [12, 35, 41], [2, 30, 2], graph_tokens=32, pad_slot=pad)
        assert wrapper._plan is last
        with pytest.raises(InvalidRequestError, match="graph_tokens needs a wrapper made with max_graph_tokens"):
            AttentionWrapper(cache, HQ).plan(slots, [12, 35, 41], [2, 2, 2], graph_tokens=8, pad_slot=pad)


def test_every_plans_fields_start_16_byte_aligned(pool):
    """Triton compiles a kernel variant per pointer alignment (16 bytes or not): the fields of an eager plan start
    aligned whatever its size, fewer tokens than the cache's slots (one buffer) or more (their own), so no step
    shape compiles another variant while requests wait. Odd slot and token counts; the values as planned."""
    cfg = CacheConfig(num_layers=2, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_slots=5, max_seq_len=64)
    with KVCache(cfg, pool) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        slots = [cache.allocate() for _ in range(3)]
        for s in slots:
            cache.grow(s, 40)
        for cached, new in (([0, 3, 1], [1, 1, 1]), ([0, 0, 0], [1, 2, 2]), ([2, 0, 5], [13, 9, 7]), ([0], [33])):
            plan = wrapper.plan(slots[: len(new)], cached, new)
            fields = (plan.slot_ids, plan.seq_lens, plan.cu_seqlens_q, plan.token_slots, plan.token_positions)
            assert all(f.data_ptr() % 16 == 0 for f in fields), [f.data_ptr() % 16 for f in fields]
            want = [p for c, n in zip(cached, new, strict=True) for p in range(c, c + n)]
            assert plan.token_positions.tolist() == want and plan.num_tokens == sum(new)
            assert plan.token_slots.tolist() == [s for s, n in zip(slots, new, strict=False) for _ in range(n)]


def test_plan_refuses_unmapped_tokens_and_run_rechecks_after_a_free(pool):
    cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_slots=4, max_seq_len=4096)
    with KVCache(cfg, pool) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        a, b = cache.allocate(), cache.allocate()
        cache.grow(a, 10)
        cases = [
            (([a], [2000], [49]), "slot 0 has 2048 tokens mapped but the step reads 2049"),  # whole pages: 2048
            (([b], [0], [1]), "slot 1 has 0 tokens mapped"),
            (([2], [0], [1]), "slot 2 is not allocated"),
            (([a, a], [0, 0], [1, 1]), "appears twice"),
            (([a], [0, 1], [1]), "of one length"),
            (([a], [-1], [1]), r"cached_lens\[0\] must be an int in \[0, 4095\], got -1"),
            (([a], [0], [0]), r"new_lens\[0\] must be an int in \[1, 4096\], got 0"),
        ]
        for args, message in cases:
            with pytest.raises(InvalidRequestError, match=message):
                wrapper.plan(*args)
        padding = [  # rows that pad a decode step to a captured batch size: a slot of their own, mapped
            ({"pad_rows": 1}, "pad_rows needs a pad_slot that is not one of"),
            ({"pad_rows": 1, "pad_slot": a}, "pad_rows needs a pad_slot that is not one of"),
            ({"pad_rows": 1, "pad_slot": b}, "slot 1 has 0 tokens mapped"),
            ({"pad_rows": 9, "pad_slot": b}, r"pad_rows must be an int in \[0, 3\], got 9"),
        ]
        for kwargs, message in padding:
            with pytest.raises(InvalidRequestError, match=message):
                wrapper.plan([a], [9], [1], **kwargs)
        cache.grow(b, 1)
        plan = wrapper.plan([a], [9], [1], pad_slot=b, pad_rows=2)
        assert plan.slots == (a, b, b) and plan.seq_lens_host == (10, 1, 1) and plan.is_decode
        wrapper.plan([a], [9], [1])
        cache.free(a)
        dev = pool.driver.device
        q, kv = torch.randn(1, HQ, D, device=dev), torch.randn(1, HKV, D, device=dev)
        with pytest.raises(InvalidRequestError, match="slot 0 is not allocated"):
            wrapper.run(0, q, kv, kv)
        with pytest.raises(InvalidRequestError, match="num_q_heads must be a positive multiple"):
            AttentionWrapper(cache, 3)


def test_decode_plans_keep_their_device_buffers_across_a_larger_prefill(pool):
    """CUDA graphs captured over a decode plan read its buffers by address: a prefill of more tokens than
    max_slots in between must not move them."""
    cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_slots=4, max_seq_len=512)
    with KVCache(cfg, pool) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        a, b = cache.allocate(), cache.allocate()
        cache.grow(a, 300)
        cache.grow(b, 300)

        def addresses(plan):
            fields = (plan.slot_ids, plan.seq_lens, plan.cu_seqlens_q, plan.token_slots, plan.token_positions)
            return [t.data_ptr() for t in fields]

        first = addresses(wrapper.plan([a, b], [10, 20], [1, 1]))
        prefill = wrapper.plan([a, b], [0, 0], [150, 100])  # 250 tokens: more than ever before
        assert prefill.token_positions.tolist() == list(range(150)) + list(range(100))
        again = wrapper.plan([a, b], [250, 100], [1, 1])
        assert addresses(again) == first
        assert again.seq_lens.tolist() == [251, 101] and again.token_positions.tolist() == [250, 100]


def test_run_rejects_bad_arguments_before_it_stores_anything(pool):
    cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_slots=2, max_seq_len=64)
    dev = pool.driver.device
    with KVCache(cfg, pool) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        slot = cache.allocate()
        cache.grow(slot, 16)
        cache.key_view(0)[slot, :16].normal_()
        cache.value_view(0)[slot, :16].normal_()
        before = (cache.key_view(0)[slot, :16].clone(), cache.value_view(0)[slot, :16].clone())
        kv = torch.randn(3, HKV, D, device=dev)
        q = torch.randn(3, HQ, D, device=dev)
        wrapper.plan([slot], [8], [3])  # a prefill step of 3 tokens at positions 8, 9, 10
        cases = [
            ({"q": q.double()}, r"q is torch.float64 on .*; expected the cache's torch.float32"),
            ({"q": q[:2]}, r"q must be \[3, 4, 64\] \(tokens, q heads, head_dim\) for this plan, got \[2, 4, 64\]"),
            ({"q": None}, r"q must be \[3, 4, 64\] .* got NoneType"),
            ({"out": torch.empty(3, HQ, D + 1, device=dev)}, r"out must be \[3, 4, 64\] .* got \[3, 4, 65\]"),
            ({"lse": torch.empty(3, HQ, device=dev)}, r"lse is only returned for decode steps"),
        ]
        for change, message in cases:
            args = {"q": q, "k": kv, "v": kv, **change}
            with pytest.raises(InvalidRequestError, match=message):
                wrapper.run(0, **args)
            # nothing was stored: the tokens at 8..10 (and all others) are as they were
            assert torch.equal(cache.key_view(0)[slot, :16], before[0])
            assert torch.equal(cache.value_view(0)[slot, :16], before[1])
        wrapper.plan([slot], [8], [1])  # a decode step: lse is allowed, but must fit
        cases = [
            ({"lse": torch.empty(1, HQ + 1, device=dev)}, r"lse must be \[1, 4\] \(tokens, q heads\) .* got \[1, 5\]"),
            ({"lse": torch.empty(1, HQ, device=dev).double()}, r"lse is torch.float64 on .*; expected torch.float32"),
            ({"out": torch.empty(1, HQ, 2 * D, device=dev)[..., ::2]}, r"out must have unit stride on head_dim"),
        ]
        for change, message in cases:
            args = {"q": q[:1], "k": kv[:1], "v": kv[:1], **change}
            with pytest.raises(InvalidRequestError, match=message):
                wrapper.run(0, **args)
            assert torch.equal(cache.key_view(0)[slot, :16], before[0])
            assert torch.equal(cache.value_view(0)[slot, :16], before[1])
        for bad in (-0.5, 0.0, float("nan"), float("inf"), 1e39, True, np.True_, "0.125", b"1", 10**400):
            with pytest.raises(InvalidRequestError, match="sm_scale must be a positive finite number"):
                AttentionWrapper(cache, HQ, sm_scale=bad)


def _captured_layers(wrapper, q, k, v, out) -> torch.cuda.CUDAGraph:
    """Every layer's run() of the current plan, warmed up (compiled) eagerly, then captured in one CUDA graph."""
    for layer in range(LAYERS):
        wrapper.run(layer, q, k, v, out=out[layer])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            wrapper.run(layer, q, k, v, out=out[layer])
    return graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_decode_step_captured_in_a_cuda_graph_replays_after_a_new_plan():
    cfg = CacheConfig(
        num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, dtype=torch.bfloat16, max_slots=4, max_seq_len=4096
    )
    with KVCache(cfg, backend="cuda", budget_bytes=64 << 20) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        slots = [cache.allocate() for _ in range(3)]
        lens = [100, 1000, 3000]
        for s, n in zip(slots, lens, strict=True):
            cache.grow(s, n + 2)
            for layer in range(LAYERS):
                cache.key_view(layer)[s, :n].normal_()
                cache.value_view(layer)[s, :n].normal_()
        q = torch.randn(3, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (
            torch.randn(3, HKV, D, device="cuda", dtype=torch.bfloat16),
            torch.randn(3, HKV, D, device="cuda", dtype=torch.bfloat16),
        )
        out = torch.empty(LAYERS, 3, HQ, D, device="cuda", dtype=torch.bfloat16)
        wrapper.plan(slots, lens, [1, 1, 1])
        graph = _captured_layers(wrapper, q, k, v, out)
        extra = cache.allocate()  # a prefill planned in between (more tokens than max_slots) moves nothing
        cache.grow(extra, 300)
        wrapper.plan([extra], [0], [300])
        wrapper.plan(slots, [n + 1 for n in lens], [1, 1, 1])  # the next step: metadata updated in place
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(LAYERS):
            eager = wrapper.run(layer, q, k, v)
            assert not out[layer].isnan().any()
            # the graph keeps the split count captured with it; another split order rounds differently
            torch.testing.assert_close(out[layer], eager, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_that_prefills_captured_in_a_cuda_graph_replays_after_a_new_plan():
    """A graph plan of 64 tokens (chunks beside decode rows) captured once, replayed after plans of other mixes
    and an eager prefill planned in between: each replay equals the eager run of its step."""
    cfg = CacheConfig(num_layers=LAYERS, num_kv_heads=HKV, head_dim=D, dtype=torch.bfloat16, max_slots=5,
                      max_seq_len=4096)  # fmt: skip
    with KVCache(cfg, backend="cuda", budget_bytes=64 << 20) as cache:
        wrapper = AttentionWrapper(cache, HQ, max_graph_tokens=64)
        pad = cache.allocate()
        cache.grow(pad, 1)
        slots = [cache.allocate() for _ in range(3)]
        for s in slots:
            cache.grow(s, 3100)
            for layer in range(LAYERS):
                cache.key_view(layer)[s, :3100].normal_()
                cache.value_view(layer)[s, :3100].normal_()
        q = torch.randn(64, HQ, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(64, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = torch.empty(LAYERS, 64, HQ, D, device="cuda", dtype=torch.bfloat16)
        wrapper.plan(slots, [100, 1000, 3000], [1, 40, 1], graph_tokens=64, pad_slot=pad)
        graph = _captured_layers(wrapper, q, k, v, out)
        for cached, new in (([100, 1000, 3000], [1, 40, 1]), ([7, 2000, 50], [30, 1, 33]), ([0, 1, 2], [1, 1, 1])):
            extra = cache.allocate()  # an eager prefill planned in between moves nothing
            cache.grow(extra, 300)
            wrapper.plan([extra], [0], [300])
            cache.free(extra)
            wrapper.plan(slots, cached, new, graph_tokens=64, pad_slot=pad)
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            rows = sum(new)
            wrapper.plan(slots, cached, new)
            for layer in range(LAYERS):
                eager = wrapper.run(layer, q[:rows], k[:rows], v[:rows])
                assert not out[layer, :rows].isnan().any()
                torch.testing.assert_close(out[layer, :rows], eager, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_does_not_wait_for_queued_gpu_work():
    cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.bfloat16, max_slots=4, max_seq_len=512)
    with KVCache(cfg, backend="cuda", budget_bytes=64 << 20) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        slot = cache.allocate()
        cache.grow(slot, 300)
        wrapper.plan([slot], [0], [300])  # warm up (allocations)
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued on the current stream
        for cached, new in (([10], [1]), ([0], [300])):  # a decode step and a prefill (two copies)
            wrapper.plan([slot], cached, new)
        assert not torch.cuda.current_stream().query(), "plan() waited for the GPU's queued work"
        torch.cuda.synchronize()
        plan = wrapper.plan([slot], [10], [1])
        torch.cuda.synchronize()
        assert plan.seq_lens.tolist() == [11] and plan.token_positions.tolist() == [10]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plans_queued_faster_than_the_gpu_runs_each_keep_their_metadata():
    """plan() copies its metadata from pinned host memory without waiting for the GPU: with 20 plans queued
    behind busy work, no host buffer may be reused before the copy that reads it has run."""
    cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.bfloat16, max_slots=4, max_seq_len=512)
    with KVCache(cfg, backend="cuda", budget_bytes=64 << 20) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        slots = [cache.allocate() for _ in range(3)]
        for s in slots:
            cache.grow(s, 400)
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued before every copy below
        snapshots, expected = [], []
        for step in range(20):
            lens = [10 + step, 100 + 2 * step, 300 + step]
            plan = wrapper.plan(slots, lens, [1, 1, 1])
            snapshots.append(plan.seq_lens.clone())  # read on the device after this plan's copy
            expected.append([n + 1 for n in lens])
        torch.cuda.synchronize()
        assert [t.tolist() for t in snapshots] == expected


def test_run_names_a_bad_k_or_v_and_stores_nothing(pool):
    """Issue 12 #12: k and v are checked by run() itself (before, store_kv's ValueError named k_new / v_new)."""
    cfg = CacheConfig(num_layers=2, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_slots=2, max_seq_len=64)
    dev = pool.driver.device
    with KVCache(cfg, pool) as cache:
        wrapper = AttentionWrapper(cache, HQ)
        slot = cache.allocate()
        cache.grow(slot, 16)
        for layer in range(2):
            cache.key_view(layer)[slot, :16].normal_()
            cache.value_view(layer)[slot, :16].normal_()
        before = [cache.key_view(layer)[slot, :16].clone() for layer in range(2)]
        before += [cache.value_view(layer)[slot, :16].clone() for layer in range(2)]
        q, kv = torch.randn(2, HQ, D, device=dev), torch.randn(2, HKV, D, device=dev)
        wrapper.plan([slot], [8], [2])
        cases = [
            ({"k": kv[:1]}, r"k must be \[2, 2, 64\] \(tokens, kv heads, head_dim\) for this plan, got \[1, 2, 64\]"),
            ({"v": torch.randn(2, HQ, D, device=dev)}, r"v must be \[2, 2, 64\] .* got \[2, 4, 64\]"),
            ({"k": kv.half()}, r"k is torch.float16 on .*; expected the cache's torch.float32"),
            ({"v": kv.to("meta")}, r"v is torch.float32 on meta; expected the cache's torch.float32 on cpu"),
            ({"v": "values"}, r"v must be \[2, 2, 64\] .* got str"),
            ({"k": torch.randn(2, HKV, 2 * D, device=dev)[..., ::2]}, r"k must have unit stride on head_dim"),
            ({"layer": 2}, r"layer must be an int in \[0, 1\], got 2"),
            ({"layer": True}, r"layer must be an int, got bool True"),
            ({"layer": 1.0}, r"layer must be an int, got float 1.0"),
        ]
        for change, message in cases:
            if dev.type == "cuda" and "meta" in message:
                continue
            args = {"layer": 0, "q": q, "k": kv, "v": kv, **change}
            with pytest.raises(InvalidRequestError, match=message):
                wrapper.run(**args)
            after = [cache.key_view(layer)[slot, :16] for layer in range(2)]
            after += [cache.value_view(layer)[slot, :16] for layer in range(2)]
            assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


BAD_PLANS = [
    (([True], [0], [1]), r"slots\[0\] must be an int, got bool True"),
    (([np.True_], [0], [1]), r"slots\[0\] must be an int, got bool"),
    (([0.0], [0], [1]), r"slots\[0\] must be an int, got float 0.0"),
    ((["0"], [0], [1]), r"slots must be a sequence of ints, got list|slots\[0\] must be an int, got str"),
    (("0", [0], [1]), r"slots must be a sequence of ints, got str"),
    ((torch.tensor([0.0]), [0], [1]), r"slots must be a 1-D integer tensor, got torch.float32"),
    ((torch.tensor([[0]]), [0], [1]), r"slots must be a 1-D integer tensor, got torch.int64 of shape \[1, 1\]"),
    ((torch.tensor([True]), [0], [1]), r"slots must be a 1-D integer tensor, got torch.bool"),
    (([None], [0], [1]), r"slots\[0\] must be an int, got NoneType"),
    (([4], [0], [1]), r"slots\[0\] must be an int in \[0, 3\], got 4"),
    (([-1], [0], [1]), r"slots\[0\] must be an int in \[0, 3\], got -1"),
    (([0], [False], [1]), r"cached_lens\[0\] must be an int, got bool False"),
    (([0], [0], [True]), r"new_lens\[0\] must be an int, got bool True"),
    (([0], np.array([0]), [1]), r"cached_lens must be a sequence of ints, got ndarray"),
    (([0], [0], torch.tensor([1.5])), r"new_lens must be a 1-D integer tensor, got torch.float32"),
    (([0], [0], torch.tensor([2**40])), r"new_lens\[0\] must be an int in \[1, 256\], got 1099511627776"),
    (([0], [0], [2.5]), r"new_lens\[0\] must be an int, got float 2.5"),
    (([0], [10**30], [1]), r"cached_lens\[0\] must be an int in \[0, 255\], got 10{30}"),
    (([0], [0], [2**40]), r"new_lens\[0\] must be an int in \[1, 256\], got 1099511627776"),
    (([0], None, [1]), r"cached_lens must be a sequence of ints, got NoneType"),
]


@contextlib.contextmanager
def _two_slots(pool):
    """A one-layer cache with a wrapper and two allocated slots of 20 mapped tokens."""
    cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_slots=4, max_seq_len=256)
    with KVCache(cfg, pool) as cache:
        a, b = cache.allocate(), cache.allocate()
        cache.grow(a, 20)
        cache.grow(b, 20)
        yield cache, AttentionWrapper(cache, HQ), a, b


@pytest.mark.parametrize("args, message", BAD_PLANS)
def test_plan_refuses_what_is_not_a_list_of_ints_and_keeps_the_last_plan(pool, args, message):
    """Issue 12 #14: plan([True]) planned slot 1; tensors, floats and huge lengths got through or raised raw."""
    with _two_slots(pool) as (cache, wrapper, a, b):
        last = wrapper.plan([a], [4], [3])
        with pytest.raises(InvalidRequestError, match=message):
            wrapper.plan(*args)
        assert wrapper._plan is last and last.slot_ids.tolist() == [a] and last.seq_lens.tolist() == [7]


def test_plan_takes_integer_tensors_as_lists(pool):
    """Issue 13: plan() takes 1-D integer tensors (host or device) as well as lists, with the same result."""
    with _two_slots(pool) as (cache, wrapper, a, b):
        want = wrapper.plan([b, a], [4, 0], [3, 9])
        fields = [want.slot_ids.tolist(), want.seq_lens.tolist(), want.cu_seqlens_q.tolist(), want.token_slots.tolist()]
        for device in {torch.device("cpu"), cache.device}:
            got = wrapper.plan(*(torch.tensor(x, dtype=torch.int32, device=device) for x in ([b, a], [4, 0], [3, 9])))
            assert got.slots == want.slots and got.seq_lens_host == want.seq_lens_host
            assert [
                got.slot_ids.tolist(),
                got.seq_lens.tolist(),
                got.cu_seqlens_q.tolist(),
                got.token_slots.tolist(),
            ] == fields


@pytest.mark.parametrize("bad", [True, 4.0, "4", None, torch.tensor(4), np.float64(4.0), 0, -4, 3, 2**63, [4]])
def test_wrapper_refuses_a_bad_num_q_heads_or_cache(pool, bad):
    cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32, max_slots=2, max_seq_len=64)
    with KVCache(cfg, pool) as cache:
        with pytest.raises(InvalidRequestError, match=r"num_q_heads must be a positive multiple of the cache's 2"):
            AttentionWrapper(cache, bad)
        assert AttentionWrapper(cache, np.int64(4)).num_q_heads == 4
    with pytest.raises(InvalidRequestError, match=r"cache must be a vkv.KVCache, got str"):
        AttentionWrapper("cache", HQ)


def test_bfloat16_is_refused_under_the_interpreter_and_float16_runs(pool):
    """Issue 12 #17: the interpreter's bfloat16 attention returned |out| ~8e8 with no error."""
    skip_unless_kernels_run_on(pool.driver.name)
    dev = pool.driver.device
    for dtype in (torch.bfloat16, torch.float16):
        cfg = CacheConfig(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=dtype, max_slots=2, max_seq_len=64)
        with KVCache(cfg, pool) as cache:
            if dtype == torch.bfloat16 and dev.type == "cpu":
                with pytest.raises(InvalidRequestError, match=r"bfloat16 attention cannot run under Triton's "
                                   r"interpreter .* expected float16 or float32 on the CPU"):  # fmt: skip
                    AttentionWrapper(cache, HQ)
                continue
            wrapper = AttentionWrapper(cache, HQ)
            slot = cache.allocate()
            cache.grow(slot, 9)
            q = (4 * torch.randn(8, HQ, D, device=dev)).to(dtype)  # |x| ~ 4: a garbage result is far off
            k, v = ((4 * torch.randn(8, HKV, D, device=dev)).to(dtype) for _ in range(2))
            tol = 4 * 4e-3  # float16's tolerance for unit-sized data (tests/kernels), times the data's scale
            wrapper.plan([slot], [0], [8])
            prefill = wrapper.run(0, q, k, v)
            torch.testing.assert_close(prefill.double(), _reference(q, [k], [v], [0], [8], D**-0.5), rtol=tol, atol=tol)
            wrapper.plan([slot], [8], [1])
            step = wrapper.run(0, q[:1], k[:1], v[:1])
            keys, values = torch.cat([k, k[:1]]), torch.cat([v, v[:1]])
            ref = _reference(q[:1], [keys], [values], [8], [1], D**-0.5)
            torch.testing.assert_close(step.double(), ref, rtol=tol, atol=tol)
