# SPDX-License-Identifier: Apache-2.0
"""The serving engine (vkv.engine) on tiny random models built from configs, against transformers' generate().

CPU: float32 in Triton's interpreter over the host backend (4 KiB pages, so a few tokens cross a page and the
budget bites); GPU (marked gpu): the same on cuda pages.
"""

import copy
import itertools
import math
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vkv import InvalidRequestError, PagePool, get_driver  # noqa: E402
from vkv.allocator import cuda_usable  # noqa: E402
from vkv.engine import Engine, EngineGroup, SamplingParams  # noqa: E402

VOCAB = 128
PAGE = 4096  # host pages: a tiny model's 8 tokens (2 layers x 2 KV heads x 16 x float32 x K, V = 512 B a token)
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu]),
]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def _config(family: str, **overrides) -> transformers.PretrainedConfig:
    common = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **overrides,
    }  # fmt: skip
    return {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family](**common)


def _reference(family: str, device: str, **overrides) -> torch.nn.Module:
    """The family's tiny model with sdpa, seeded: the engine loads the same weights."""
    torch.manual_seed({"llama": 1, "qwen3": 2}[family])
    model = transformers.AutoModelForCausalLM.from_config(_config(family, **overrides), attn_implementation="sdpa")
    return model.to(device).eval()


def _engine(family: str, device: str, pool: PagePool | None = None, config: dict | None = None, **kwargs) -> Engine:
    if device == "cuda" and not cuda_usable():
        pytest.skip("needs a CUDA GPU")
    reference = _reference(family, device, **(config or {}))
    model = copy.deepcopy(reference)
    if pool is None and device == "cpu":
        pool = kwargs.pop("own_pool", None) or PagePool(get_driver("host", page_size=PAGE), 1 << 20)
    engine = Engine(model, pool=pool, max_seq_len=128, **{"max_num_seqs": 4, **kwargs})
    engine.reference = reference
    return engine


def _expected(engine: Engine, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt], device=engine.kv.device)
    out = engine.reference.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 6, 7], list(range(10, 41)), [100, 3, 99, 4, 98, 5, 97], list(range(60, 80))]


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_outputs_equal_transformers_generate(family, device):
    """Four requests of 3-31 tokens together, prompts cut in chunks of at most 16 tokens a step."""
    with _engine(family, device, max_num_batched_tokens=16) as engine:
        outs = engine.generate(PROMPTS, GREEDY)
        for prompt, out in zip(PROMPTS, outs, strict=True):
            assert out.finish_reason == "length" and out.num_output_tokens == 12
            assert out.new_token_ids == _expected(engine, prompt, 12), prompt
        assert engine.steps > 12  # batched: the 31-token prompt took 2 chunks; decode steps ran all rows
        padding = engine.runner.pad_slot is not None  # the CUDA graphs' padding slot (cuda), held for the engine's life
        assert engine.kv.stats().slots_in_use == padding


@pytest.mark.cpu_kernels
def test_padded_decode_steps_give_the_same_tokens():
    """Decode steps padded to batch-size buckets (what the CUDA graphs run; here eagerly, pad_decode): three
    requests stopping at 4, 9 and 14 tokens run at buckets 4, 2 and 1 with 1, 0 and 0 padding rows."""
    with _engine("llama", "cpu", pad_decode=True) as engine:
        params = [SamplingParams(max_tokens=n, temperature=0) for n in (4, 9, 14)]
        outs = engine.generate(PROMPTS[:3], params)
        for prompt, out, p in zip(PROMPTS, outs, params, strict=False):
            assert out.new_token_ids == _expected(engine, prompt, p.max_tokens), prompt
        assert sorted(engine.runner.graphs) == [1, 2, 4] and engine.runner.bucket(3) == 4
        assert engine.warm_up() > 0 and sorted(engine.runner.graphs) == [1, 2, 4]  # every bucket (max_num_seqs 4)
        assert engine.generate(PROMPTS[:1], params[:1])[0].new_token_ids == outs[0].new_token_ids
        assert engine.kv.stats().slots_in_use == 1  # the padding slot, held for the engine's life


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_steps_that_prefill_padded_to_token_buckets_give_the_same_tokens(family, device):
    """graph_tokens=24: steps that prefill (chunks beside decode rows) of at most 24 tokens run padded to the token
    buckets 16 and 24 (the padding rows belong to no request) through the extend kernel's tile list; cpu: eagerly
    (pad_decode), cuda: as CUDA graphs captured per bucket, like the decode steps. The first step (32 prompt
    tokens) runs eagerly. Tokens as generate() gives them; warm_up captures every bucket."""
    kwargs = {"max_num_batched_tokens": 32, "prefill_with_decode": 4, "graph_tokens": 24}
    kwargs |= {"pad_decode": True} if device == "cpu" else {}
    with _engine(family, device, **kwargs) as engine:
        runner = engine.runner
        assert runner.token_buckets == (16, 24) and runner.token_bucket(17) == 24 and runner.token_bucket(25) is None
        seen = []
        mixed = runner.mixed

        def spy(size, slots, cached, new, token_ids, sample_rows):
            seen.append((size, len(token_ids), len(slots)))
            return mixed(size, slots, cached, new, token_ids, sample_rows)

        runner.mixed = spy
        outs = engine.generate(PROMPTS, GREEDY)
        for prompt, out in zip(PROMPTS, outs, strict=True):
            assert out.new_token_ids == _expected(engine, prompt, 12), prompt
        assert {size for size, _, _ in seen} == {16}, seen  # chunks of 4 beside <= 4 decode rows
        assert any(n < 16 for _, n, _ in seen) and any(b > 1 for _, _, b in seen)  # padded; decode rows beside
        assert engine.steps > len(seen)  # the first (32 tokens) and the decode steps: not here
        if device == "cuda":
            assert runner.captures >= 1 + len(runner.graphs) and set(runner.mixed_graphs) == {16}
        del runner.mixed
        assert engine.warm_up() > 0 and set(runner.mixed_graphs) == {16, 24}
        again = engine.generate(PROMPTS[1:3], GREEDY)
        assert [o.new_token_ids for o in again] == [o.new_token_ids for o in outs[1:3]]
        assert engine.kv.stats().slots_in_use == 1  # the padding slot, held for the engine's life
    with pytest.raises(InvalidRequestError, match=r"graph_tokens must be None or an int in \[0, 65536\], got -1"):
        Engine(_config("llama"), graph_tokens=-1)
    with pytest.raises(InvalidRequestError, match="graph_tokens=8 pads steps for CUDA graphs: it needs cuda_graphs"):
        Engine(_config("llama"), device="cpu", graph_tokens=8)  # no padding on the CPU without pad_decode
    clamped = {"pad_decode": True, "max_num_batched_tokens": 20, "graph_tokens": 64}
    with Engine(_config("llama"), device="cpu", **clamped) as engine:  # on the CPU also where there is a GPU
        assert engine.runner.token_buckets == (16, 20)  # no step is larger than max_num_batched_tokens


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("graph_tokens", [0, 16])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layers_give_the_same_tokens_with_one_graph_for_every_layer(device, graph_tokens):
    """Engine(compile=...): each decoder layer under torch.compile (fullgraph: no break), vkv's store + attention
    as one op. Prefill chunks and (padded) decode steps give generate()'s tokens; the layers share their graphs:
    at most 3 (the first shape, then dynamic sizes >= 2, and a step of 1 token), where a graph per layer index
    would make 6 for these 2 layers. A second engine of the same model shares the graphs, each with its own cache.
    cpu: aot_eager (the same traced graph, no code generation); cuda: inductor, under the CUDA graphs. With
    graph_tokens=16, every step that prefills (a chunk of at most 16 tokens) runs padded to the bucket of 16 (cuda:
    captured) through the same graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    options = {"backend": "aot_eager"} if device == "cpu" else True
    args = {"max_num_batched_tokens": 16, "pad_decode": True, "compile": options, "graph_tokens": graph_tokens}
    with _engine("qwen3", device, **args) as engine, _engine("qwen3", device, **args) as other:
        for prompts in (PROMPTS, PROMPTS[1:3]):
            outs = engine.generate(prompts, GREEDY)
            for prompt, out in zip(prompts, outs, strict=True):
                assert out.new_token_ids == _expected(engine, prompt, 12), prompt
        assert all(layer._compiled_call_impl is not None for layer in engine.model.model.layers)
        with engine.runner.eager() as model:  # for another caller (bench/serve.py's generate_batch), then back
            assert all(layer._compiled_call_impl is None for layer in model.model.layers)
        assert all(layer._compiled_call_impl is not None for layer in engine.model.model.layers)
        assert 1 <= counters["stats"]["unique_graphs"] <= 3 and not counters["graph_break"]
        assert bool(engine.runner.mixed_graphs) == bool(graph_tokens)
        for e, prompts in ((other, PROMPTS[2:]), (engine, PROMPTS[:1]), (other, PROMPTS[:2])):  # each its own cache
            outs = e.generate(prompts, GREEDY)
            assert [o.new_token_ids for o in outs] == [_expected(e, p, 12) for p in prompts]
    assert all(layer._compiled_call_impl is None for layer in engine.model.model.layers)  # the model as it came
    with pytest.raises(InvalidRequestError, match="compile must be a bool or a dict of torch.compile options"):
        Engine(_config("llama"), compile="yes")


@pytest.mark.parametrize("device", DEVICES)
def test_steps_that_prefill_run_as_graphs_by_default_where_decode_steps_do(device):
    """graph_tokens=None (the default): buckets up to 512 tokens (or max_num_batched_tokens) where decode steps run
    as CUDA graphs (a GPU); none on the CPU, padded or not; 0 turns them off."""
    with _engine("llama", device, max_num_batched_tokens=300) as engine:
        assert engine.runner.token_buckets == ((16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 300)
                                               if device == "cuda" else ())  # fmt: skip
    with _engine("llama", device, pad_decode=True, graph_tokens=0) as engine:
        assert engine.runner.token_buckets == ()
    if device == "cpu":
        with _engine("llama", "cpu", pad_decode=True) as engine:
            assert engine.runner.token_buckets == ()


def _compiled_kernels() -> int:
    """The Triton kernels vkv's modules have compiled so far, all variants on all devices."""
    import triton

    from vkv.kernels import _common, decode, extend, paged_decode, store

    jitted = {f for m in (_common, decode, extend, paged_decode, store) for f in vars(m).values()
              if isinstance(f, triton.runtime.jit.JITFunction)}  # fmt: skip
    return sum(len(caches[0]) for f in jitted for caches in f.device_caches.values())


@pytest.mark.gpu
@pytest.mark.parametrize("graph_tokens, max_num_seqs", [(0, 4), (32, 4), (0, 32)])
def test_after_the_warm_up_no_step_compiles_a_kernel(graph_tokens, max_num_seqs):
    """warm_up() compiles every variant of the kernels that a step can launch (Triton compiles one per tile config,
    per whether a token count is a multiple of 16 and per whether a pointer is 16-byte aligned: seconds each, which
    a request would wait): prompts within and past the short-KV tiles' lengths (head_dim 128, bf16), of 16k tokens
    and not, of fewer tokens than the cache's slots and more (the per-token fields' buffer), alone and beside
    decodes."""
    if not cuda_usable():
        pytest.skip("needs a CUDA GPU")
    config = {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
              "max_position_embeddings": 4096}  # fmt: skip
    model = _reference("llama", "cuda", **config).to(torch.bfloat16)
    engine = Engine(
        model, max_seq_len=2300, max_num_batched_tokens=2400, max_num_seqs=max_num_seqs, graph_tokens=graph_tokens
    )
    with engine:
        engine.warm_up()
        before = _compiled_kernels()
        assert before > 0
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        for lengths in ([2112], [2101], [48], [47], [20], [32], [44], [30, 33], [2048, 40]):
            outs = engine.generate([[1 + (i * 7 + j) % 100 for j in range(n)] for i, n in enumerate(lengths)], params)
            assert all(len(o.new_token_ids) == 3 and o.finish_reason == "length" for o in outs), outs
        assert _compiled_kernels() == before
        # /metrics' torch peak: torch's own figure for the process, the weights (loaded by torch on the GPU) in it
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        peak = engine.stats()["torch_peak_reserved_bytes"]
        assert peak == torch.cuda.max_memory_reserved() and peak >= weights


@pytest.mark.cpu_kernels
def test_steps_that_decode_carry_at_most_prefill_with_decode_prompt_tokens():
    """prefill_with_decode=4 under a budget of 16 tokens a step: once a request decodes, prompts come 4 tokens a step
    (short decode steps); a step with no decode takes a whole 16-token chunk. Tokens as generate() gives them."""
    with _engine("llama", "cpu", max_num_batched_tokens=16, prefill_with_decode=4) as engine:
        steps = []
        schedule = engine.scheduler.schedule

        def recorded():
            batch = schedule()
            decodes = sum(1 for s in batch if s.request.output_ids)  # a request with output so far is decoding
            steps.append((decodes, sum(s.num_new for s in batch if not s.request.output_ids)))
            return batch

        engine.scheduler.schedule = recorded
        prompts = [PROMPTS[0], PROMPTS[1]]  # 3 tokens, then 31
        outs = engine.generate(prompts, GREEDY)
        for prompt, out in zip(prompts, outs, strict=True):
            assert out.new_token_ids == _expected(engine, prompt, 12), prompt
    assert steps[0] == (0, 16)  # nothing decodes yet: the first prompt and 13 of the second
    assert all(prefill <= 4 for decodes, prefill in steps if decodes) and any(d and p for d, p in steps)
    with pytest.raises(InvalidRequestError, match="prefill_with_decode must be a positive int, got 0"):
        Engine(_config("llama"), prefill_with_decode=0)
    for wait in (0, -1.0, math.inf, math.nan, True, "60"):
        with pytest.raises(
            InvalidRequestError, match=f"device_full_wait_s must be a finite number of seconds > 0, got {wait!r}"
        ):
            Engine(_config("llama"), device_full_wait_s=wait)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_preempted_requests_are_recomputed_to_the_same_tokens(device):
    """Four requests that outgrow the budget: the newest are preempted, requeued and recomputed (prompt + output so
    far); every request still gets generate()'s tokens. cpu: 12 host pages (96 tokens) for requests that grow to
    23-71 tokens. cuda: 2 MiB pages, so a wider model (32 KiB a token in float32: 4 layers x 8 KV heads x 128 x K, V;
    64 tokens a page) and requests of 73-101 tokens (2 pages each) on 6 pages, one of them the padding slot's."""
    if device == "cpu":
        pool, config, kwargs, pages, new = PagePool(get_driver("host", page_size=PAGE), 12 * PAGE), None, {}, 12, 40
    else:
        config = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128,
                  "hidden_size": 256}  # fmt: skip
        pool, kwargs, pages, new = None, {"budget_bytes": 6 * (2 << 20)}, 6, 70
    with _engine("llama", device, pool, config, **kwargs) as engine:
        params = SamplingParams(max_tokens=new, temperature=0)
        outs = engine.generate(PROMPTS, params)
        assert engine.scheduler.preemptions > 0
        for prompt, out in zip(PROMPTS, outs, strict=True):
            assert out.new_token_ids == _expected(engine, prompt, new), prompt
        assert engine.pool.stats().live <= pages


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_the_step_clock_sums_each_steps_wall_cpu_and_forward_span(device):
    """stats()'s clock: the stepping thread's time in step() fits in the wall time around generate() and its CPU time
    in that; on a GPU every step's forward span is summed but the last (read at the next step's launch; every step
    here samples, so each waited for its forward), none dropped, and the spans fit in the steps around them; on the
    CPU there is none."""
    with _engine("llama", device) as engine:
        engine.clock.trace = trace = []
        start, cpu = time.perf_counter(), time.thread_time()
        engine.generate(PROMPTS, GREEDY)
        wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
        stats = engine.stats()
        # the trace: a record a step that ran, in order, its kind, tokens and requests as the step ran them
        assert len(trace) == stats["steps"] and all(a.started < b.started for a, b in itertools.pairwise(trace))
        assert sum(r.tokens for r in trace) == stats["computed_tokens"]
        assert [r.kind for r in trace].count("mixed") == stats["mixed_steps"]
        assert 0 < sum(r.wall_s for r in trace) <= stats["step_wall_s"] + 1e-9
        assert all(r.sequences == len(PROMPTS) for r in trace if r.kind == "decode")
        assert trace[0].kind == "mixed" and trace[0].tokens == sum(map(len, PROMPTS))
        assert stats["steps"] >= 12  # a prefill step (the first tokens), then 11 decode steps at least
        assert stats["step_calls"] >= stats["steps"]
        assert 0 < stats["step_wall_s"] <= wall and 0 < stats["step_cpu_s"] <= cpu + 1e-3
        # by kind: the step(s) that prefill the prompts are mixed, the rest decode
        assert stats["mixed_steps"] >= 1 and stats["decode_steps"] >= 10
        assert stats["mixed_steps"] + stats["decode_steps"] == stats["steps"]
        kinds_wall = stats["mixed_wall_s"] + stats["decode_wall_s"]
        assert 0 < kinds_wall <= stats["step_wall_s"] + 1e-9
        for kind in ("mixed", "decode"):
            assert 0 < stats[f"{kind}_wall_max_s"] <= stats[f"{kind}_wall_s"]
        if device == "cuda":
            assert stats["forward_timed"] == stats["steps"] - 1 and stats["forward_dropped"] == 0
            assert 0 < stats["forward_gpu_s"] <= stats["step_wall_s"]
            assert stats["mixed_forward_timed"] + stats["decode_forward_timed"] == stats["forward_timed"]
            assert stats["mixed_forward_gpu_s"] + stats["decode_forward_gpu_s"] == pytest.approx(stats["forward_gpu_s"])
            spans = [r.forward_gpu_s for r in trace]  # each record has its forward's span, but the last
            assert None not in spans[:-1] and sum(spans[:-1]) == pytest.approx(stats["forward_gpu_s"])
        else:
            assert stats["forward_timed"] == stats["forward_dropped"] == 0 and stats["forward_gpu_s"] == 0


@pytest.mark.cpu_kernels
def test_a_step_whose_forward_fails_fails_its_requests_and_is_no_step_of_a_kind(caplog):
    """A forward that raises ends the step's requests with "error" and the reason, said in the engine's log; the
    engine goes on, and the failed step counts in neither kind (decode + mixed = the steps that ran)."""
    with _engine("llama", "cpu") as engine, caplog.at_level("ERROR", logger="vkv.engine"):
        forward = engine.runner.forward

        def broken(*args, **kwargs):
            engine.runner.forward = forward  # once
            raise RuntimeError("injected")

        engine.runner.forward = broken
        failed = engine.generate([PROMPTS[0]], GREEDY)[0]
        assert failed.finish_reason == "error" and "RuntimeError: injected" in failed.error
        said = [r.getMessage() for r in caplog.records if r.name == "vkv.engine" and r.levelname == "ERROR"]
        assert said == [
            "model llama: a step of 3 tokens failed, its 1 requests end with an error: RuntimeError: injected"
        ]
        out = engine.generate([PROMPTS[0]], GREEDY)[0]
        assert out.new_token_ids == _expected(engine, PROMPTS[0], 12)
        stats = engine.stats()
        assert stats["mixed_steps"] == 1 and stats["decode_steps"] == 11 == stats["steps"] - 1


def _short_of_memory(engine: Engine, times: int | None) -> list[int]:
    """Make the engine's forward raise torch's OutOfMemoryError (as a GPU that other processes fill does) on its next
    ``times`` calls that step more than one request (None: on every call); returns the requests each failure saw."""
    forward, seen = engine.runner.forward, []

    def short(slots, *args, **kwargs):
        if times is None or (len(slots) > 1 and len(seen) < times):
            seen.append(len(slots))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (injected)")
        return forward(slots, *args, **kwargs)

    engine.runner.forward = short
    return seen


@pytest.mark.cpu_kernels
def test_a_forward_out_of_memory_preempts_the_newest_and_loses_nothing(caplog):
    """A forward that runs out of device memory (activations, cuBLAS's workspace; not KV pages) fails no request:
    the engine gives back what it keeps, preempts the newest running request and steps the rest again; every
    request still gets generate()'s tokens. Before the change all four ended with "error"."""
    with _engine("llama", "cpu") as engine, caplog.at_level("WARNING", logger="vkv.engine"):
        seen = _short_of_memory(engine, times=2)
        outs = engine.generate(PROMPTS, GREEDY)
        assert seen == [4, 3]  # the second try stepped one request fewer
        assert engine.forward_out_of_memory == 2 == engine.stats()["forward_out_of_memory"]
        assert engine.scheduler.preemptions == 2
        for prompt, out in zip(PROMPTS, outs, strict=True):
            assert out.finish_reason == "length" and out.new_token_ids == _expected(engine, prompt, 12), prompt
        said = [r.getMessage() for r in caplog.records if r.name == "vkv.engine"]
        assert len(said) == 1 and "a forward ran out of device memory (1 times so far" in said[0]
        assert engine.kv.stats().slots_in_use == 0


@pytest.mark.cpu_kernels
def test_a_forward_out_of_memory_that_persists_ends_its_requests_after_the_wait():
    """Out of memory at every forward: the requests are stepped again until device_full_wait_s has passed, then end
    with "error" and the reason; the engine serves the next requests once memory is there."""
    with _engine("llama", "cpu", device_full_wait_s=0.3) as engine:
        forward = engine.runner.forward
        _short_of_memory(engine, times=None)
        start = time.monotonic()
        outs = engine.generate(PROMPTS[:2], GREEDY)
        assert time.monotonic() - start >= 0.3
        for out in outs:
            assert out.finish_reason == "error" and "OutOfMemoryError: CUDA out of memory" in out.error
        assert engine.forward_out_of_memory >= 2 and engine.kv.stats().slots_in_use == 0
        engine.runner.forward = forward
        out = engine.generate([PROMPTS[0]], GREEDY)[0]
        assert out.new_token_ids == _expected(engine, PROMPTS[0], 12)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible_whatever_the_batch(device):
    with _engine("qwen3", device) as engine:
        seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=1234)
        alone = engine.generate([PROMPTS[1]], seeded)[0].new_token_ids
        crowd = engine.generate(PROMPTS, [seeded if i == 1 else SamplingParams(max_tokens=5, seed=i) for i in range(4)])
        assert crowd[1].new_token_ids == alone
        other = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0.9, seed=99))[0]
        assert other.new_token_ids != alone  # another seed draws otherwise (10 tokens of 128: never all equal)
        # top_k = 1 and a tiny top_p leave one token: sampling then is greedy
        greedy = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0))[0].new_token_ids
        for narrow in (SamplingParams(max_tokens=6, top_k=1), SamplingParams(max_tokens=6, top_p=1e-6)):
            assert engine.generate([PROMPTS[0]], narrow)[0].new_token_ids == greedy
        mixed = engine.generate(PROMPTS[:2], [SamplingParams(max_tokens=6, temperature=0), seeded])  # one batch
        assert mixed[0].new_token_ids == greedy and mixed[1].new_token_ids == alone


@pytest.mark.cpu_kernels
def test_stop_tokens_streaming_and_abort():
    with _engine("llama", "cpu") as engine:
        full = engine.generate([PROMPTS[2]], GREEDY)[0].new_token_ids
        stop = full[4]
        first = full.index(stop)
        out = engine.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop]))[0]
        assert out.finish_reason == "stop" and out.new_token_ids == full[: first + 1]  # the stop token included
        late = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop], min_tokens=first + 2)
        held = engine.generate([PROMPTS[2]], late)[0].new_token_ids  # the stop token cannot come before min_tokens
        assert held[:first] == full[:first] and stop not in held[: first + 2] and len(held) >= first + 2

        streamed, ended = [], []
        engine.add_request(PROMPTS[2], GREEDY, request_id="s", on_output=lambda o: streamed.append(o))
        victim = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=100, temperature=0), request_id="v",
                                    on_output=lambda o: ended.append(o) if o.finished else None)  # fmt: skip
        for _ in range(4):
            engine.step()
        engine.abort("v")
        while engine.has_work():
            engine.step()
        assert [t for o in streamed for t in o.new_token_ids] == full and streamed[-1].finished
        assert sum(1 for o in streamed if o.finished) == 1
        assert ended[0].finish_reason == "abort" and victim.slot is None and len(victim.output_ids) < 100
        assert engine.kv.stats().slots_in_use == 0


@pytest.mark.cpu_kernels
def test_on_a_gpu_a_steps_outputs_are_delivered_once_the_next_forward_is_queued():
    """defer_outputs (on on a GPU, forced here): step k's on_output calls come after step k+1's forward was queued, so
    the listeners' Python overlaps the GPU's work; each output still comes once, in order, and none stays held."""
    with _engine("llama", "cpu") as engine:
        engine.defer_outputs = True
        seen, at_forward, forward = [], [], engine.runner.forward

        def spy(*args):
            logits = forward(*args)
            at_forward.append(len(seen))
            return logits

        engine.runner.forward = spy
        for i, prompt in enumerate(PROMPTS[:2]):
            engine.add_request(prompt, SamplingParams(max_tokens=5 + 3 * i, temperature=0), request_id=str(i),
                               on_output=seen.append)  # fmt: skip
        steps = []
        while engine.has_work():
            steps.append(engine.step())
        assert [(o.request_id, o.new_token_ids) for o in seen] == [
            (o.request_id, o.new_token_ids) for step in steps for o in step
        ]
        assert at_forward == [sum(map(len, steps[: max(k - 1, 0)])) for k in range(len(steps))]  # step k-1's: not yet
        assert seen[-1].finished and sum(o.finished for o in seen) == 2  # the last step's: at once (nothing runs)
        assert [t for o in seen if o.request_id == "1" for t in o.new_token_ids] == _expected(engine, PROMPTS[1], 8)

        done = threading.Event()  # under the group's thread too, whose stop delivers what is held
        engine.start()
        engine.add_request(PROMPTS[0], GREEDY, on_output=lambda o: o.finished and done.set())
        assert done.wait(60)
        engine.stop()


@pytest.mark.cpu_kernels
def test_generate_streams_every_output_to_on_output_before_it_returns():
    """generate(on_output=...): each request's streamed tokens are its returned ids, its end heard once, with the
    outputs held for the next step's forward (defer_outputs, forced) delivered before generate returns."""
    with _engine("llama", "cpu") as engine:
        engine.defer_outputs = True
        heard = []
        params = [SamplingParams(max_tokens=3 + 4 * i, temperature=0) for i in range(2)]
        outs = engine.generate(PROMPTS[:2], params, on_output=heard.append)
        for out in outs:
            mine = [o for o in heard if o.request_id == out.request_id]
            assert [t for o in mine for t in o.new_token_ids] == out.new_token_ids
            assert [o.finished for o in mine].count(True) == 1 and mine[-1].finished
        assert outs[1].new_token_ids == _expected(engine, PROMPTS[1], 7) and not engine._held


@pytest.mark.cpu_kernels
def test_bad_requests_are_refused_and_change_nothing():
    with _engine("llama", "cpu") as engine:
        cases = [
            ([], GREEDY, "the prompt is empty"),
            ([1, VOCAB], GREEDY, f"token id {VOCAB} is not in the vocabulary"),
            ([1, -1], GREEDY, "token id -1 is not in the vocabulary"),
            (list(range(128)), GREEDY, "the prompt has 128 tokens; this model's max_seq_len is 128"),
            ("text", GREEDY, "has no tokenizer: give the prompt as token ids"),
            ([1, 2], {"max_tokens": 3}, "params must be a SamplingParams"),
        ]
        for prompt, params, message in cases:
            with pytest.raises(InvalidRequestError, match=message):
                engine.add_request(prompt, params)
        with pytest.raises(InvalidRequestError, match="on_output must be a callable taking a RequestOutput, got list"):
            engine.generate([PROMPTS[0], PROMPTS[1]], GREEDY, on_output=[])
        assert not engine.has_work()  # nothing queued
        for bad, message in [
            ({"max_tokens": 0}, "max_tokens must be an int >= 1"),
            ({"temperature": -1}, "temperature must be a finite number >= 0"),
            ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
            ({"top_k": -2}, "top_k must be an int >= 0"),
            ({"stop_token_ids": [1, "x"]}, "stop_token_ids must be a list of token ids"),
            ({"min_tokens": 5, "max_tokens": 2}, r"min_tokens must be an int in \[0, max_tokens = 2\]"),
        ]:
            with pytest.raises(InvalidRequestError, match=message):
                SamplingParams(**bad)
        engine.add_request([1, 2], GREEDY, request_id="x")
        with pytest.raises(InvalidRequestError, match="request id 'x' is in use"):
            engine.add_request([1, 2], GREEDY, request_id="x")
        assert not engine.scheduler.has_work() and engine.kv.stats().slots_in_use == 0
        while engine.has_work():
            engine.step()
        assert engine.generate([PROMPTS[0]], GREEDY)[0].new_token_ids == _expected(engine, PROMPTS[0], 12)
    small = PagePool(get_driver("host", page_size=PAGE), 2 * PAGE)  # 16 tokens at most
    with _engine("llama", "cpu", small) as engine:
        with pytest.raises(InvalidRequestError, match="needs 3 pages of KV but the pool's whole budget is 2"):
            engine.add_request(list(range(20)), GREEDY)
        out = engine.generate([list(range(10))], SamplingParams(max_tokens=30, temperature=0))[0]
        # 16 tokens of KV (the budget) sample the 17th: 10 + 7; the next would need a third page
        assert out.finish_reason == "length" and out.num_output_tokens == 7
    small.close()


@pytest.mark.cpu_kernels
def test_two_models_that_cannot_both_fit_take_turns():
    """Two models on a pool of 10 pages (80 tokens), each with one request growing to 49 tokens (7 pages),
    prompts cut in chunks of 8: they cannot run together, and neither may keep preempting itself and taking its
    own pages back (a livelock): stepped in turn, both finish with generate()'s tokens."""
    pool = PagePool(get_driver("host", page_size=PAGE), 10 * PAGE)
    engines = [_engine(f, "cpu", pool, max_num_batched_tokens=8) for f in ("llama", "qwen3")]
    try:
        prompt, params = list(range(30, 59)), SamplingParams(max_tokens=20, temperature=0)
        requests = [e.add_request(prompt, params) for e in engines]
        for _ in range(300):
            if not any(e.has_work() for e in engines):
                break
            for engine in engines:
                engine.step()
        assert all(r.finish_reason == "length" for r in requests), [e.stats() for e in engines]
        for engine, request in zip(engines, requests, strict=True):
            assert request.output_ids == _expected(engine, prompt, 20)
        assert pool.stats().live <= 10
    finally:
        for engine in engines:
            engine.close()
        pool.close()


@pytest.mark.cpu_kernels
def test_two_models_share_one_budget_and_idle_pages_move():
    """Llama and Qwen3 on one pool of 10 pages, stepped in turn by one EngineGroup thread, 6 requests each: the
    pool never holds more than its budget, every output is generate()'s; an idle engine gives its kept pages back
    and serves its next request."""
    pool = PagePool(get_driver("host", page_size=PAGE), 10 * PAGE)
    engines = [_engine(f, "cpu", pool, idle_release_s=0.2) for f in ("llama", "qwen3")]
    over, done, stop = [], threading.Event(), threading.Event()

    def watch():
        while not stop.is_set():
            s = pool.stats()
            if s.live > s.budget_pages:
                over.append(s)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        streams = {(e.name, str(i)): [] for e in engines for i in range(6)}
        prompts = PROMPTS + PROMPTS[:2]
        group = EngineGroup(engines)
        group.start()
        for engine in engines:
            for i, prompt in enumerate(prompts):
                sink = streams[engine.name, str(i)].append
                engine.add_request(
                    prompt, SamplingParams(max_tokens=20, temperature=0), request_id=str(i), on_output=sink
                )
        deadline = time.monotonic() + 300
        while not all(o and o[-1].finished for o in streams.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for engine in engines:
            for i, prompt in enumerate(prompts):
                outs = streams[engine.name, str(i)]
                assert outs and outs[-1].finish_reason == "length", (engine.name, i, outs[-1:])
                assert [t for o in outs for t in o.new_token_ids] == _expected(engine, prompt, 20), (engine.name, i)
        time.sleep(0.6)  # both idle past idle_release_s: their kept pages go back to the pool
        kept = [(e.name, e.kv.stats().mapped_pages, e.trims) for e in engines]
        assert all(mapped == 0 for _, mapped, _ in kept) and pool.stats().in_use == 0, kept
        assert sum(trims for _, _, trims in kept) >= 1  # the last to finish kept its pages until idle
        assert not over, over[:3]
        again = engines[0].add_request(PROMPTS[0], GREEDY, on_output=lambda o: done.set() if o.finished else None)
        assert done.wait(60) and again.output_ids == _expected(engines[0], PROMPTS[0], 12)
    finally:
        stop.set()
        watcher.join()
        group.stop()
        for engine in engines:
            engine.close()
        pool.close()
