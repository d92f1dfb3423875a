# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism (issue 17) on the CPU: two processes over gloo, each with its host pool (device = rank) and its
half of the KV heads, give the greedy outputs of one process. Rank 0 decides growth; a tight budget makes it
preempt, so the followers replay admissions, growth, frees and releases of idle pages."""

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vkv import CacheConfig, InvalidRequestError  # noqa: E402
from vkv.engine import Engine, SamplingParams, load_model  # noqa: E402
from vkv.engine.presets import preset  # noqa: E402
from vkv.engine.tp import generate_on_ranks  # noqa: E402
from vkv.parallel import (  # noqa: E402
    RowParallelLinear,
    TensorParallel,
    join_ranks,
    local_init_method,
    shard_cache_config,
    shard_heads,
    shard_model,
    start_ranks,
)

PAGE = 4096
PROMPTS = [[5, 9, 2], list(range(10, 27)), [7], list(range(40, 70)), [3, 1, 4, 1, 5, 9, 2, 6]]
GREEDY = SamplingParams(max_tokens=10, temperature=0)


def _config(family: str = "llama", **overrides) -> transformers.PretrainedConfig:
    common = {
        "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **overrides,
    }  # fmt: skip
    return {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family](**common)


def _saved(config: transformers.PretrainedConfig, folder) -> tuple[transformers.PreTrainedModel, str]:
    """A random model of ``config`` and the directory it is saved in (config.json, model.safetensors)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return model, str(folder)


@pytest.mark.cpu_kernels
def test_two_ranks_give_the_outputs_of_one(tmp_path):
    """Llama with biases (o/down's bias added once, after the all-reduce), loaded from a directory (each rank reads
    its share of the safetensors), and Qwen3 (its per-head q/k norms replicated) with padded decode steps (the
    DECODE plans) and its layers compiled (the all-reduces traced; aot_eager on the CPU), one spawn of two ranks
    for both (CI time)."""
    args = {"max_num_seqs": 4, "max_seq_len": 64, "max_num_batched_tokens": 24, "backend": "host", "page_size": PAGE}
    models = [
        (_saved(_config("llama", attention_bias=True, mlp_bias=True), tmp_path / "llama")[1], args),
        (_config("qwen3"), {**args, "pad_decode": True, "compile": {"backend": "aot_eager"}}),
    ]
    expected = []
    for config, model_args in models:
        with Engine(config, budget_bytes=64 * PAGE, **model_args) as single:
            expected.append([o.new_token_ids for o in single.generate(PROMPTS, GREEDY)])
    jobs = [(config, PROMPTS, GREEDY, {**model_args, "budget_bytes": 4 * PAGE}) for config, model_args in models]
    out = tmp_path / "rank0.pt"
    ranks = start_ranks(2, generate_on_ranks, (jobs, str(out)), init_method=local_init_method())
    assert join_ranks(ranks, timeout_s=150) == [0, 0], "a rank failed or hung"
    got = torch.load(out)
    assert [job["tokens"] for job in got] == expected
    # llama: 4 pages of 16 tokens for 4 requests of up to 40, so rank 0 preempts (replayed frees and regrowth);
    # qwen3's padding slot holds one of its pages, and admission then waits rather than preempts
    assert got[0]["preemptions"] > 0


def test_heads_must_divide_by_the_world():
    with pytest.raises(InvalidRequestError, match=r"num_kv_heads = 2 cannot be split .* world of 3: expected"):
        shard_heads(6, 2, TensorParallel(0, 3))
    with pytest.raises(InvalidRequestError, match=r"query heads\) = 6 cannot be split over a tensor-parallel world"):
        shard_heads(6, 4, TensorParallel(1, 4))
    assert shard_heads(32, 8, TensorParallel(3, 4)) == (8, 2)
    with pytest.raises(InvalidRequestError, match="rank 2 is out of range: expected 0 to 1"):
        TensorParallel(2, 2)


def test_the_cache_config_holds_a_rank_s_heads():
    config = CacheConfig(num_layers=2, num_kv_heads=8, head_dim=128, max_slots=4, max_seq_len=256)
    half = shard_cache_config(config, TensorParallel(1, 2))
    assert half.num_kv_heads == 4 and half.token_bytes * 2 == config.token_bytes
    with pytest.raises(InvalidRequestError, match="num_kv_heads = 8 cannot be split"):
        shard_cache_config(config, TensorParallel(0, 3))


def test_shard_model_splits_whole_heads_and_changes_nothing_on_an_error():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config())
    odd = transformers.AutoModelForCausalLM.from_config(
        _config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    )
    full, odd_full = copy.deepcopy(model), copy.deepcopy(odd)
    with pytest.raises(InvalidRequestError, match="num_kv_heads = 2 cannot be split"):
        shard_model(model, TensorParallel(0, 4))
    with pytest.raises(InvalidRequestError, match=r"intermediate_size = 128 cannot be split .* world of 3"):
        shard_model(odd, TensorParallel(0, 3))  # the heads divide, the MLP does not
    for changed, before in ((model, full), (odd, odd_full)):
        assert all(torch.equal(a, b) for a, b in zip(changed.parameters(), before.parameters(), strict=True))
    shard_model(model, TensorParallel(1, 2))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    full_attn, full_mlp = full.model.layers[0].self_attn, full.model.layers[0].mlp
    assert torch.equal(attn.q_proj.weight, full_attn.q_proj.weight[32:64])  # query heads 2, 3 of 16 each
    assert torch.equal(attn.k_proj.weight, full_attn.k_proj.weight[16:32])  # KV head 1: GQA pairs them
    assert isinstance(attn.o_proj, RowParallelLinear)
    assert torch.equal(attn.o_proj.weight, full_attn.o_proj.weight[:, 32:])
    assert torch.equal(mlp.up_proj.weight, full_mlp.up_proj.weight[64:])
    assert torch.equal(mlp.down_proj.weight, full_mlp.down_proj.weight[:, 64:])


@pytest.mark.parametrize("tied", [False, True])
def test_a_rank_reads_its_share_of_the_checkpoint(tmp_path, tied):
    """Each rank's parameters from the safetensors are the slices shard_model cuts from the whole loaded model
    (tied embeddings stay one parameter); a checkpoint with a key missing, in excess or misshapen is refused."""
    from safetensors.torch import load_file, save_file

    config = _config("llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=tied)
    _, folder = _saved(config, tmp_path / "m")
    transformers.GenerationConfig(eos_token_id=[1, 7, 9]).save_pretrained(folder)  # an instruct model's end tokens
    for rank in range(2):
        tp = TensorParallel(rank, 2)
        whole = transformers.AutoModelForCausalLM.from_pretrained(folder)
        expected = dict(shard_model(whole, tp).named_parameters())
        model, _ = load_model(folder, dtype=torch.float32, device="cpu", tensor_parallel=tp)
        got = dict(model.named_parameters())
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), whole.buffers(), strict=True))  # rotary
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        assert model.generation_config.eos_token_id == [1, 7, 9]  # the engine stops at every one of them
        assert model.model.layers[1].mlp.down_proj.bias.shape == (64,)  # a row-parallel bias is whole
    weights = load_file(f"{folder}/model.safetensors")
    for change, error in [
        (lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), r"the checkpoint has no model\.layers\.1\.mlp\.up_proj"),
        (lambda w: w.update(extra=torch.zeros(1)), "extra is no parameter of LlamaForCausalLM"),
        (lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(48, 64)}),
         r"k_proj.weight has shape \[48, 64\]; this model expects \[32, 64\]"),
    ]:  # fmt: skip
        broken = dict(weights)
        change(broken)
        save_file(broken, f"{folder}/model.safetensors", metadata={"format": "pt"})
        with pytest.raises(InvalidRequestError, match=error):
            load_model(folder, dtype=torch.float32, device="cpu", tensor_parallel=TensorParallel(1, 2))


def test_an_engine_refuses_a_world_that_does_not_divide_its_heads():
    with pytest.raises(
        InvalidRequestError, match=r"num_kv_heads = 2 cannot be split over a tensor-parallel world of 3"
    ):
        Engine(_config(), tensor_parallel=TensorParallel(0, 3), backend="host", budget_bytes=16 * PAGE)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize(
    "flags, said",
    [(["--tensor-parallel", "2"], "tensor-parallel ranks)"), (["--engine-process"], "(engine process)")],
    ids=["tensor-parallel-2", "engine-process"],
)
def test_vkv_serve_in_two_processes(tmp_path, flags, said):
    """`vkv serve --tensor-parallel 2` on the CPU (rank 0 serves, rank 1 follows), or `--engine-process` (the
    server in one process, the engines in another): greedy tokens as one process gives; Ctrl-C stops both."""
    with Engine(preset("tiny-llama"), backend="host", budget_bytes=64 << 20, max_seq_len=128) as single:
        expected = single.generate([[9, 10, 11]], GREEDY)[0].new_token_ids
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "vkv.cli", "serve", "random:tiny-llama", *flags, "--port",
           str(port), "--budget", "64MiB", "--max-seq-len", "128", "--max-num-seqs", "4"]  # fmt: skip
    server = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp_path
    )  # not the repository: its kernels/ would shadow the PyPI package transformers probes
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if "Uvicorn running on" in line:  # listening
                break
        assert any(said in line for line in lines), lines
        body = json.dumps({"model": "tiny-llama", "prompt": [9, 10, 11], "max_tokens": 10, "temperature": 0})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body.encode(),
                                         {"content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.load(reply)["choices"][0]["token_ids"] == expected
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C at a terminal: every process of the session gets it
        try:
            server.wait(timeout=60)
            rest = server.stdout.read()
            gone = _session_ends(server.pid, timeout_s=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # the session: rank 1 too, if it outlived rank 0
    assert gone, "the second process outlived the first"
    assert server.returncode == 0 and "could not tell the other ranks" not in rest, (server.returncode, rest[-3000:])


def _session_ends(session: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_model_is_sharded_once_and_a_tensor_parallel_engine_needs_an_agreed_budget():
    model = transformers.AutoModelForCausalLM.from_config(_config())
    shard_model(model, TensorParallel(0, 2))
    with pytest.raises(InvalidRequestError, match="sharded already"):
        shard_model(model, TensorParallel(0, 2))
    with pytest.raises(InvalidRequestError, match="needs budget_bytes"):
        Engine(_config(), tensor_parallel=TensorParallel(0, 2), backend="host")
    with pytest.raises(InvalidRequestError, match="tensor_parallel must be a vkv.parallel.TensorParallel, got int"):
        load_model(_config(), tensor_parallel=2)


def test_closing_an_engine_twice_is_harmless():
    engine = Engine(preset("tiny-llama"), backend="host", budget_bytes=16 << 20, max_seq_len=64)
    engine.close()
    engine.close()


def test_building_on_the_meta_device_touches_no_other_thread_and_is_undone():
    """parameters_on_meta: this thread's modules get meta parameters; a module another thread builds meanwhile gets
    real ones; afterwards (also after an error inside) every module is built as usual."""
    import threading

    from vkv.engine.weights import parameters_on_meta

    register = torch.nn.Module.register_parameter
    other = []
    with parameters_on_meta():
        mine = torch.nn.Linear(4, 4)
        thread = threading.Thread(target=lambda: other.append(torch.nn.Linear(4, 4)))
        thread.start()
        thread.join()
    assert mine.weight.device.type == "meta" and other[0].weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="inside"), parameters_on_meta():
        raise RuntimeError("inside")
    assert torch.nn.Module.register_parameter is register and torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_a_rank_draws_only_its_share_and_an_engine_takes_it_as_it_is():
    """random_rank_share: every parameter has the shape the whole model's shard_model gives this rank, on the
    device, none left on meta; norms 1, matrices drawn at the config's scale, reproducible by seed and rank; each
    rank draws its split weights, the replicated ones alike. An Engine of the same rank takes the share unsharded
    again; another rank's is refused."""
    from vkv.engine.weights import random_rank_share

    config = _config()
    whole = transformers.AutoModelForCausalLM.from_config(config)
    shard_model(whole, TensorParallel(1, 2))
    expected = {k: p.shape for k, p in whole.named_parameters()}
    share = random_rank_share(config, TensorParallel(1, 2), dtype=torch.float32, device="cpu", seed=3)
    got = dict(share.named_parameters())
    assert {k: p.shape for k, p in got.items()} == expected
    assert all(p.device.type == "cpu" and not p.requires_grad for p in got.values())
    assert all(torch.equal(p, torch.ones_like(p)) for k, p in got.items() if "norm" in k)
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - config.initializer_range) < 0.2 * config.initializer_range
    again = random_rank_share(config, TensorParallel(1, 2), dtype=torch.float32, device="cpu", seed=3)
    other = random_rank_share(config, TensorParallel(0, 2), dtype=torch.float32, device="cpu", seed=3)
    assert torch.equal(dict(again.named_parameters())["model.layers.0.self_attn.q_proj.weight"], q)
    assert not torch.equal(dict(other.named_parameters())["model.layers.0.self_attn.q_proj.weight"], q)
    embed = "model.embed_tokens.weight"  # replicated: alike on every rank
    assert torch.equal(dict(other.named_parameters())[embed], got[embed])
    with pytest.raises(InvalidRequestError, match="rank 1's share of a world of 2 .* this engine is rank 0 of 2"):
        load_model(share, tensor_parallel=TensorParallel(0, 2), device="cpu")
    model, _ = load_model(share, tensor_parallel=TensorParallel(1, 2), device="cpu")
    assert model is share and dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"] is q


@pytest.mark.cpu_kernels
def test_the_tensor_parallel_benchmark_runs_on_cpu_ranks(tmp_path):
    """bench/tp.py --tiny over two CPU ranks (gloo), each drawing its share: the row is timed, not failed, and a rank
    holds the whole model's bytes less half its attention and MLP weights (CI time: the one-rank case is left out)."""
    out = tmp_path / "tp.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "tp.py"
    cmd = [sys.executable, str(bench), "--tiny", "--cases", "tiny-llama@2", "--batches", "2", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["tp"] == 2 and row["what"] == "step B=2" and "error" not in row and row["step_ms"] > 0
    whole = transformers.AutoModelForCausalLM.from_config(preset("tiny-llama"))
    split = sum(p.numel() for name, p in whole.named_parameters() if name.endswith("proj.weight"))
    total = sum(p.numel() for p in whole.parameters())
    assert row["weights_gib_a_rank"] * 2**30 == pytest.approx((total - split / 2) * 4)  # float32
