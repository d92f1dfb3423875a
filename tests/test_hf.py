# SPDX-License-Identifier: Apache-2.0
"""vkv as transformers' attention backend, against transformers' own sdpa attention and default cache.

Tiny random-init models built from configs (no downloads) of every family the integration claims: generate's
tokens must equal sdpa's, the logits must be close at the dtype's tolerance, for left-padded batches. CPU:
float32 in Triton's interpreter over the host backend; GPU (marked gpu): float32 and bf16.
"""

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vkv import InvalidRequestError, OutOfPagesError, PagePool  # noqa: E402
from vkv.allocator import cuda_usable  # noqa: E402
from vkv.integrations import hf  # noqa: E402

from .conftest import kernels_run_on_the_cpu  # noqa: E402

VOCAB = 256


def _families() -> dict[str, transformers.PretrainedConfig]:
    """One tiny config per family: GQA ratios 1 to 8, head_dim 64, 96, 128 and 256."""
    t = transformers
    common = {
        "vocab_size": VOCAB,
        "num_hidden_layers": 2,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": None,
    }
    return {
        "llama": t.LlamaConfig(
            hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=1, head_dim=64, **common
        ),  # GQA 8
        "qwen2": t.Qwen2Config(
            hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, **common
        ),  # MHA, head_dim 64, qkv bias
        "qwen3": t.Qwen3Config(
            hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128, **common
        ),  # GQA 2, q/k norms
        "mistral": t.MistralConfig(
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=64,
            sliding_window=None,
            **common,
        ),  # GQA 4
        "phi3": t.Phi3Config(
            hidden_size=192,
            intermediate_size=256,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=None,
            **common,
        ),  # head_dim 96, fused qkv
        "gemma": t.GemmaConfig(
            hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=256, **common
        ),  # head_dim 256
    }


FAMILIES = list(_families())
DEVICES = [
    pytest.param(("cpu", torch.float32), id="cpu-f32"),
    pytest.param(("cuda", torch.float32), id="cuda-f32", marks=[pytest.mark.gpu]),
    pytest.param(("cuda", torch.bfloat16), id="cuda-bf16", marks=[pytest.mark.gpu]),
]
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 5e-2}  # max |logit difference| / max |logit|


@pytest.fixture(autouse=True)
def registered():
    hf.register()
    yield
    hf.unregister()


@pytest.fixture(params=DEVICES)
def where(request):
    device, dtype = request.param
    if device == "cuda" and not cuda_usable():
        pytest.skip("needs a CUDA GPU")
    if device == "cpu" and not kernels_run_on_the_cpu():
        pytest.skip("the kernels are compiled for the GPU here; the CPU needs TRITON_INTERPRET=1")
    return torch.device(device), dtype


def _models(family: str, device, dtype, seed: int = 0):
    """(sdpa model, vkv model) with the same random weights."""
    config = _families()[family]
    torch.manual_seed(seed)
    cls = transformers.AutoModelForCausalLM
    ref = cls.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=torch.float32)
    model = cls.from_config(copy.deepcopy(config), attn_implementation="vkv", dtype=torch.float32)
    model.load_state_dict(ref.state_dict())
    return ref.to(device, dtype).eval(), model.to(device, dtype).eval()


def _prompts(device, lens=(5, 9, 1), seed: int = 1):
    """A left-padded batch as a tokenizer makes it: pads (id 0) first, mask 0 there."""
    g = torch.Generator().manual_seed(seed)
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lens):
        ids[row, width - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids.to(device), mask.to(device)


def _generate(model, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kwargs}
    out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1).float()  # [B, steps, vocab]


def _check_same(ref_out, out, dtype):
    """Tokens equal up to the first step where the reference's top two logits are closer than the tolerance
    (a near-tie that rounding may break either way; in float32 there are none here); logits close up to it."""
    (ref_ids, ref_logits), (ids, logits) = ref_out, out
    scale = ref_logits.abs().max()
    tol = TOLERANCE[dtype] * scale
    top2 = ref_logits.topk(2, dim=-1).values
    ties = (top2[..., 0] - top2[..., 1]) < 2 * tol  # [B, steps]
    prompt = ref_ids.shape[1] - ref_logits.shape[1]
    for row in range(ref_ids.shape[0]):
        steps = ref_logits.shape[1] if not ties[row].any() else int(ties[row].nonzero()[0])
        assert torch.equal(ids[row, : prompt + steps + 1], ref_ids[row, : prompt + steps + 1]) or steps == 0, row
        if steps:
            err = (logits[row, :steps] - ref_logits[row, :steps]).abs().max()
            assert err <= tol, f"row {row}: logits differ by {err:.3g} (tolerance {tol:.3g})"
    if dtype == torch.float32:
        assert not ties.any() and torch.equal(ids, ref_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_padded_batch_matches_sdpa(family, where):
    device, dtype = where
    ref, model = _models(family, device, dtype)
    ids, mask = _prompts(device)
    with hf.VkvCache(model, max_batch_size=4, max_seq_len=64) as cache:
        out = _generate(model, ids, mask, **hf.cache_kwargs(cache))
        _check_same(_generate(ref, ids, mask), out, dtype)
        # pads are never stored: each row holds its prompt and the tokens fed back (the last one is not fed)
        assert cache.batch.lens == [n + 5 for n in (5, 9, 1)]
        kv = cache.kv
        pages = sum(kv.layout.pages_per_plane(n) for n in cache.batch.lens) * kv.layout.planes  # <= held + 1 a plane
        assert kv.stats().mapped_bytes <= pages * kv.pool.page_size


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sampling_with_a_seed_matches_sdpa(family, where):
    device, dtype = where
    if dtype != torch.float32:
        pytest.skip("sampled tokens are compared exactly in float32")
    ref, model = _models(family, device, dtype)
    ids, mask = _prompts(device)
    kwargs = {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 0.8}
    torch.manual_seed(7)
    want = _generate(ref, ids, mask, **kwargs)[0]
    torch.manual_seed(7)
    with hf.VkvCache(model, max_batch_size=3, max_seq_len=64) as cache:
        assert torch.equal(_generate(model, ids, mask, **hf.cache_kwargs(cache), **kwargs)[0], want)


def test_beam_search_matches_sdpa(where):
    device, dtype = where
    if dtype != torch.float32:
        pytest.skip("beams are compared exactly in float32")
    ref, model = _models("llama", device, dtype)
    ids, mask = _prompts(device, lens=(4, 7))
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    want = ref.generate(ids, attention_mask=mask, **kwargs)
    with hf.VkvCache(model, max_batch_size=6, max_seq_len=64) as cache:
        assert torch.equal(model.generate(ids, attention_mask=mask, **hf.cache_kwargs(cache), **kwargs), want)


def test_crop_then_continue_equals_one_generation(where):
    """Assisted generation's pattern: crop the cache back, feed the kept tokens again, continue."""
    device, dtype = where
    _, model = _models("qwen2", device, dtype)
    ids, mask = _prompts(device)
    width = ids.shape[1]
    with hf.VkvCache(model, max_batch_size=3, max_seq_len=64) as cache:
        full, _ = _generate(model, ids, mask, **hf.cache_kwargs(cache))
        cache.crop(width + 2)  # keeps the prompt and 2 generated positions
        assert cache.get_seq_length() == width + 2
        head = full[:, : width + 3]
        mask3 = torch.cat([mask, torch.ones_like(mask[:, :3])], dim=1)
        again, _ = _generate(model, head, mask3, **hf.cache_kwargs(cache), max_new_tokens=3)
        assert torch.equal(again, full[:, : width + 6])
        cache.crop(-100)  # cropping everything frees the slots
        assert cache.get_seq_length() == 0 and cache.kv.stats().slots_in_use == 0


def test_reset_serves_a_new_batch_and_reuses_pages(where):
    device, dtype = where
    ref, model = _models("llama", device, dtype)
    with hf.VkvCache(model, max_batch_size=4, max_seq_len=64) as cache:
        ids, mask = _prompts(device)
        _generate(model, ids, mask, **hf.cache_kwargs(cache))
        with pytest.raises(InvalidRequestError, match="reset"):  # a different batch over a full cache
            _generate(model, *_prompts(device, lens=(3, 3)), **hf.cache_kwargs(cache))
        cache.reset()
        assert cache.kv.stats().slots_in_use == 0
        created = cache.kv.pool.stats().created
        ids, mask = _prompts(device, lens=(6, 2), seed=3)
        _check_same(_generate(ref, ids, mask), _generate(model, ids, mask, **hf.cache_kwargs(cache)), dtype)
        assert cache.kv.pool.stats().created == created  # the freed slots' pages served the new batch


# ------------------------------------------------------------------------------------------------- bad use
def _usable_after(cache, model, ref, device, dtype):
    cache.reset()
    ids, mask = _prompts(device, lens=(3, 2))
    _check_same(
        _generate(ref, ids, mask, max_new_tokens=3),
        _generate(model, ids, mask, **hf.cache_kwargs(cache), max_new_tokens=3),
        dtype,
    )


def test_bad_use_raises_clearly_and_leaves_the_cache_usable(where):
    device, dtype = where
    ref, model = _models("llama", device, dtype)
    with hf.VkvCache(model, max_batch_size=2, max_seq_len=16) as cache:
        with pytest.raises(InvalidRequestError, match="max_batch_size=2"):
            _generate(model, *_prompts(device), **hf.cache_kwargs(cache))  # 3 sequences, 2 slots
        assert cache.kv.stats().slots_in_use == 0
        _usable_after(cache, model, ref, device, dtype)
        cache.reset()
        with pytest.raises(InvalidRequestError, match="max_seq_len is 16"):
            _generate(model, *_prompts(device, lens=(9, 4)), **hf.cache_kwargs(cache), max_new_tokens=12)
        _usable_after(cache, model, ref, device, dtype)
        cache.reset()
        ids, mask = _prompts(device, lens=(4, 6))
        with pytest.raises(InvalidRequestError, match="left padding"):
            _generate(model, ids, mask.flip(1), **hf.cache_kwargs(cache))  # right padding
        _usable_after(cache, model, ref, device, dtype)


def test_cache_of_another_geometry_is_refused(where):
    device, dtype = where
    _, llama = _models("llama", device, dtype)
    ref, qwen = _models("qwen3", device, dtype)
    with hf.VkvCache(llama, max_batch_size=3, max_seq_len=32) as cache:
        with pytest.raises(InvalidRequestError, match="made for another model"):
            _generate(qwen, *_prompts(device), **hf.cache_kwargs(cache))
        assert cache.kv.stats().slots_in_use == 3 and cache.get_seq_length() == 0  # nothing stored or advanced
        cache.reset()
        _generate(llama, *_prompts(device), **hf.cache_kwargs(cache))  # still serves its own model


def test_exhausted_budget_raises_and_leaves_the_cache_usable(where):
    device, dtype = where
    ref, model = _models("llama", device, dtype)
    pool = PagePool("cuda" if device.type == "cuda" else "host", budget_bytes=2 << 20)  # one page
    try:
        with hf.VkvCache(model, max_batch_size=3, max_seq_len=64, pool=pool) as cache:
            with pytest.raises(OutOfPagesError):
                _generate(model, *_prompts(device), **hf.cache_kwargs(cache))  # 3 slots need 3 pages
            assert cache.kv.stats().slots_in_use == 0 and pool.stats().in_use == 0
            ids, mask = _prompts(device, lens=(5,))
            _check_same(_generate(ref, ids, mask), _generate(model, ids, mask, **hf.cache_kwargs(cache)), dtype)
    finally:
        pool.close()


def test_models_vkv_cannot_serve_are_refused_when_the_cache_is_made():
    t = transformers
    sliding = t.MistralConfig(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1, sliding_window=16
    )
    with pytest.raises(InvalidRequestError, match="sliding-window"):
        hf.VkvCache(sliding, max_batch_size=1, max_seq_len=64, dtype=torch.float32, device="cpu")
    with hf.VkvCache(sliding, max_batch_size=1, max_seq_len=16, dtype=torch.float32, device="cpu"):
        pass  # a window that covers every token is full attention
    capped = t.Gemma2Config(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2, head_dim=32
    )
    with pytest.raises(InvalidRequestError, match="soft-capped|sliding"):
        hf.VkvCache(capped, max_batch_size=1, max_seq_len=8, dtype=torch.float32, device="cpu")
    with pytest.raises(InvalidRequestError, match="cross attention"):
        hf.VkvCache(t.T5Config(), max_batch_size=1, max_seq_len=8, dtype=torch.float32, device="cpu")
    with pytest.raises(InvalidRequestError, match="dtype and device"):
        hf.VkvCache(sliding, max_batch_size=1, max_seq_len=8)
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        hf.VkvCache(sliding, max_batch_size=0, max_seq_len=8, dtype=torch.float32, device="cpu")


def test_vkv_attention_without_a_vkv_cache_says_what_to_pass():
    if not kernels_run_on_the_cpu():
        pytest.skip("CPU model")
    _, model = _models("llama", "cpu", torch.float32)
    ids, mask = _prompts("cpu")
    with pytest.raises(InvalidRequestError, match="VkvCache"):
        model(ids, attention_mask=mask, use_cache=False)


def test_unregister_undoes_register():
    config = _families()["llama"]
    hf.unregister()
    with pytest.raises(ValueError, match="vkv"):
        transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="vkv")
    hf.register()
    transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="vkv")


def test_import_vkv_does_not_import_transformers():
    code = "import sys, vkv; assert 'transformers' not in sys.modules and 'vkv.integrations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compiled_decode_matches_sdpa(where):
    """compile_decode: generate() compiles the decode step with no graph break (fullgraph); on the GPU with
    transformers' default mode, reduce-overhead, so the steps replay CUDA graphs. The CPU traces the same
    graph (aot_eager: transformers compiles only on accelerators unless told to)."""
    device, dtype = where
    ref, model = _models("llama", device, dtype)
    ids, mask = _prompts(device)
    config = transformers.CompileConfig(fullgraph=True)
    if device.type == "cpu":
        config = transformers.CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
        config._compile_all_devices = True
    torch._dynamo.reset()
    want = _generate(ref, ids, mask, max_new_tokens=8)
    with hf.VkvCache(model, max_batch_size=3, max_seq_len=64, compile_decode=True) as cache:
        for _ in range(2):  # the second call replays what the first compiled
            got = _generate(model, ids, mask, max_new_tokens=8, compile_config=config, **hf.cache_kwargs(cache))
            assert hasattr(model, "_compiled_call")
            _check_same(want, got, dtype)
            assert cache.get_seq_length() == ids.shape[1] + 7 and cache.batch.lens == [n + 7 for n in (5, 9, 1)]
            cache.reset()
